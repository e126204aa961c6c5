"""Issuing a token: the one path of ``vncmux token add`` and ``POST /tokens``."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vncmux.backendpolicy import BackendPolicy, parse_backend_networks
from vncmux.issuing import DEFAULT_BASE_URL, TokenRequest, access_url, issue_token, new_token
from vncmux.refusals import Refused
from vncmux.tokens import MemoryTokenStore, TokenRecord, hash_token


class AccessUrlTests(SynchronousTestCase):
    """The access URL noVNC understands."""

    def test_default_base(self) -> None:
        """``?path=websockify%3Ftoken%3D<token>`` after the base URL."""
        self.assertEqual(
            access_url(DEFAULT_BASE_URL, "abc_-9"),
            "http://127.0.0.1:6080/vnc_lite.html?path=websockify%3Ftoken%3Dabc_-9",
        )

    def test_base_with_query(self) -> None:
        """A base URL with a query gets ``&path=…``."""
        self.assertEqual(
            access_url("https://c.example/vnc.html?autoconnect=1", "t"),
            "https://c.example/vnc.html?autoconnect=1&path=websockify%3Ftoken%3Dt",
        )


class NewTokenTests(SynchronousTestCase):
    """Generated tokens."""

    def test_never_an_option(self) -> None:
        """43 URL-safe characters (256 bits), never starting with '-', all different."""
        tokens = {new_token() for _ in range(2000)}
        self.assertEqual(len(tokens), 2000)
        for token in tokens:
            self.assertRegex(token, r"\A[A-Za-z0-9_][A-Za-z0-9_-]{42}\Z")


class RecordingStore(MemoryTokenStore):
    """A memory store that remembers every record it was asked to store."""

    def __init__(self) -> None:
        super().__init__()
        self.issued: list[TokenRecord] = []

    def issue(self, record: TokenRecord, token: str) -> Deferred[None]:
        self.issued.append(record)
        return super().issue(record, token)


class IssueTokenTests(SynchronousTestCase):
    """issue_token checks the target, stores the record and names the URL."""

    def policy(self, *allowed: str) -> BackendPolicy:
        return BackendPolicy(
            resolve=lambda host: fail(OSError(host)) if host != "10.0.0.5" else succeed(host),
            clock=Clock(),
            allowed=parse_backend_networks(allowed),
        )

    def test_stores_the_request(self) -> None:
        """The stored record is the request's, under the hash of the token handed out."""
        store = RecordingStore()
        request = TokenRequest(
            "10.0.0.5",
            5901,
            ttl=60,
            instance_uuid="i-1",
            console_type="serial",
            max_sessions=2,
            base_url="https://c.example/vnc.html",
        )
        issued = self.successResultOf(issue_token(request, store, self.policy(), 1000.0))
        self.assertEqual(issued.record.token_hash, hash_token(issued.token))
        self.assertEqual(issued.access_url, access_url("https://c.example/vnc.html", issued.token))
        stored = self.successResultOf(store.lookup(issued.token))
        self.assertEqual(
            (stored.target, stored.expires_at, stored.console_type, stored.max_sessions),
            ("10.0.0.5:5901", 1060.0, "serial", 2),
        )

    def test_refused_target_stores_nothing(self) -> None:
        """A target outside --allowed-backend is refused and no token exists afterwards."""
        store = RecordingStore()
        issuing = issue_token(
            TokenRequest("10.0.0.5", 5901), store, self.policy("192.0.2.0/24"), 1000.0
        )
        self.failureResultOf(issuing, Refused)
        self.assertEqual(store.issued, [])
