"""The admin API: bearer secret, sessions, tokens. Real HTTP parsing, no sockets, a Clock."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.fakes import FakeNameResolver
from tests.support import Response
from tests.webtesting import fetch, http_site, open_session
from vncmux.admin import (
    FAILURE_INTERVAL,
    FAILURE_LIMIT,
    LocalSessions,
    admin_resources,
    read_admin_secret,
)
from vncmux.backendpolicy import BackendPolicy, parse_backend_networks, system_resolver
from vncmux.events import Observers
from vncmux.health import Readiness
from vncmux.interfaces import ISessionDirectory, ITokenStore
from vncmux.metrics import Metrics
from vncmux.observability import build_http_root
from vncmux.relay import RelayStats
from vncmux.supervisor import Supervisor
from vncmux.tokens import (
    FileTokenStore,
    MemoryTokenStore,
    TokenRecord,
    TokenStoreUnavailable,
    hash_token,
)

SECRET = b"admin-secret-0123456789"
GOOD = {"Authorization": f"Bearer {SECRET.decode()}"}
NOW = 1_700_000_000.0


class _DownStore(MemoryTokenStore):
    """A store whose writes fail as if Redis were down."""

    def issue(self, record: TokenRecord, token: str) -> Deferred[None]:
        return fail(TokenStoreUnavailable("connection refused"))


@implementer(ITokenStore)
class _LookupOnlyStore:
    """A store that can look tokens up but not issue or revoke them."""

    def lookup(self, token: str) -> Deferred[TokenRecord | None]:
        return fail(TokenStoreUnavailable("unused"))

    def ping(self) -> Deferred[None]:
        return fail(TokenStoreUnavailable("unused"))


class AdminTestCase(SynchronousTestCase):
    """A supervisor, an in-memory store and the admin API on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.observers = Observers()
        self.supervisor = Supervisor(self.clock, self.observers)
        self.stats = RelayStats()
        self.metrics = Metrics(self.supervisor.sessions, self.stats)
        self.observers.add(self.metrics)
        self.store = MemoryTokenStore()
        self.site = self.site_for(self.store)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def site_for(self, store: object, *allowed_backends: str) -> Any:
        readiness = Readiness(MemoryTokenStore(), self.clock, lambda: True, self.supervisor)
        resolver = FakeNameResolver({"h": ["10.0.0.1"], "metadata.example": ["169.254.169.254"]})
        policy = BackendPolicy(
            parse_backend_networks(allowed_backends),
            resolve=system_resolver(resolver),
            clock=self.clock,
        )
        admin = admin_resources(
            SECRET,
            LocalSessions(self.supervisor),
            store,
            self.clock,
            "https://console.example/vnc.html",
            backend_policy=policy,
        )
        return http_site(build_http_root(self.metrics, readiness, admin), self.clock)

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = GOOD,
        site: Any = None,
        client: str = "10.1.2.3",
    ) -> Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body else b""
        return fetch(site or self.site, method, path, headers, raw, client=client)


class AuthTests(AdminTestCase):
    """No secret: 401; a wrong one: 403; nothing happens either way."""

    REQUESTS = [
        ("GET", "/sessions"),
        ("GET", "/sessions/s1"),
        ("DELETE", "/sessions/s1"),
        ("POST", "/tokens"),
        ("DELETE", "/tokens/secret-token-1"),
        ("DELETE", "/tokens?instance_uuid=inst-1"),
        ("PUT", "/sessions"),
    ]

    def setUp(self) -> None:
        super().setUp()
        self.session, self.client, _ = open_session(self.supervisor, self.stats)
        self.store.add("secret-token-1", "10.0.0.5", 5901, instance_uuid="inst-1")

    def _nothing_happened(self) -> None:
        self.assertIsNone(self.session.ending)
        self.assertIsNotNone(self.successResultOf(self.store.lookup("secret-token-1")))
        self.assertEqual(len(self.store._records), 1)

    def test_missing(self) -> None:
        """Without Authorization, or with another scheme, every admin request is 401."""
        for headers in ({}, {"Authorization": "Basic YWRtaW46eA=="}, {"Authorization": "Bearer"}):
            for method, path in self.REQUESTS:
                response = self.call(method, path, {"host": "h", "port": 1}, headers=headers)
                self.assertEqual(response.status, 401, (method, path, headers))
                self.assertEqual(response.headers["www-authenticate"], 'Bearer realm="vncmux"')
        self._nothing_happened()

    def test_wrong(self) -> None:
        """A wrong secret (same length, shorter, longer) is 403 (one try per interval here,
        so none is limited and each is logged)."""
        for wrong in (b"admin-secret-0123456788", b"admin", SECRET + b"x"):
            headers = {"Authorization": f"Bearer {wrong.decode()}"}
            for method, path in self.REQUESTS:
                response = self.call(method, path, {"host": "h", "port": 1}, headers=headers)
                self.assertEqual(response.status, 403, (method, path, wrong))
                self.assertEqual(response.json(), {"error": "wrong secret"})
                self.clock.advance(FAILURE_INTERVAL)
        self._nothing_happened()
        refused = [e for e in self.events if e.get("vncmux_event") == "admin_refused"]
        self.assertEqual(len(refused), 3 * len(self.REQUESTS))
        self.assertEqual(refused[0]["client"], "10.1.2.3")

    def test_wrong_secrets_limited_and_collapsed(self) -> None:
        """Past FAILURE_LIMIT wrong secrets in an interval an address gets 429 even with the
        right secret (guessing cannot go on); other addresses are not affected. The log
        holds one warning at the first try and one count when the interval ends, not one
        line per try; after the interval the address may try again."""
        wrong = {"Authorization": "Bearer guess"}
        tries = 452
        statuses = [self.call("GET", "/sessions", headers=wrong).status for _ in range(tries)]
        self.assertEqual(statuses, [403] * FAILURE_LIMIT + [429] * (tries - FAILURE_LIMIT))
        blocked = self.call("GET", "/sessions")
        self.assertEqual((blocked.status, blocked.headers["retry-after"]), (429, "60"))
        self.assertEqual(self.call("GET", "/sessions", client="10.9.9.9").status, 200)
        refused = [e for e in self.events if e.get("vncmux_event", "").startswith("admin_ref")]
        self.assertEqual([e["vncmux_event"] for e in refused], ["admin_refused"])
        self.clock.advance(FAILURE_INTERVAL)
        self.assertEqual(self.call("GET", "/sessions").status, 200)
        refused = [e for e in self.events if e.get("vncmux_event", "").startswith("admin_ref")]
        self.assertEqual(len(refused), 2)
        self.assertEqual((refused[1]["count"], refused[1]["client"]), (tries, "10.1.2.3"))

    def test_right(self) -> None:
        """The right secret, with any case of the scheme, is let through."""
        for scheme in ("Bearer", "bearer"):
            response = self.call(
                "GET", "/sessions", headers={"Authorization": f"{scheme} {SECRET.decode()}"}
            )
            self.assertEqual(response.status, 200)
        refused = self.call("PUT", "/sessions/s1")
        self.assertEqual((refused.status, refused.headers["allow"]), (405, "DELETE, GET, HEAD"))
        self.assertEqual(self.call("HEAD", "/tokens").status, 405)

    def test_secret_file(self) -> None:
        """The secret is the file's first line without surrounding whitespace."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"  s3cret \nsecond line\n")
        self.assertEqual(read_admin_secret(path), b"s3cret")


class SessionTests(AdminTestCase):
    """GET /sessions and DELETE /sessions/<id>."""

    def test_local_sessions_is_a_directory(self) -> None:
        """The admin API's view of this process provides the directory interface."""
        self.assertTrue(verifyObject(ISessionDirectory, LocalSessions(self.supervisor)))

    def test_list(self) -> None:
        """Live sessions are listed oldest first with what an operator needs, never a token."""
        one, _, _ = open_session(self.supervisor, self.stats, session_id="s1")
        self.clock.advance(5)
        self.supervisor.sweep()  # refreshes the coarse clock that activity is stamped with
        two, _, _ = open_session(
            self.supervisor,
            self.stats,
            token="t2",
            session_id="s2",
            host="fd00::5",
            port=5902,
            instance_uuid="",
            client_address="2001:db8::9",
            console_type="serial",
        )
        one.from_client((b"k" * 8,))
        two.from_backend(b"f" * 300)
        response = self.call("GET", "/sessions")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(
            response.json(),
            [
                {
                    "session_id": "s1",
                    "client_address": "192.0.2.7",
                    "backend_host": "10.0.0.5",
                    "backend_port": 5901,
                    "instance_uuid": "inst-1",
                    "console_type": "novnc",
                    "token_id": hash_token("secret-token-1")[:12],
                    "started_at": NOW,
                    "last_activity_at": NOW + 5,
                    "bytes_to_backend": 8,
                    "bytes_to_client": 0,
                },
                {
                    "session_id": "s2",
                    "client_address": "2001:db8::9",
                    "backend_host": "fd00::5",
                    "backend_port": 5902,
                    "instance_uuid": "",
                    "console_type": "serial",
                    "token_id": hash_token("t2")[:12],
                    "started_at": NOW + 5,
                    "last_activity_at": NOW + 5,
                    "bytes_to_backend": 0,
                    "bytes_to_client": 300,
                },
            ],
        )
        self.assertNotIn(b"secret-token-1", response.body)
        self.assertEqual(self.call("GET", "/sessions/s2").json()["backend_port"], 5902)
        self.assertEqual(self.call("GET", "/sessions/").status, 200)

    def test_end(self) -> None:
        """DELETE ends the session with 4002 'token revoked' on both sides, once."""
        session, client, backend = open_session(self.supervisor, self.stats)
        response = self.call("DELETE", "/sessions/s1")
        self.assertEqual((response.status, response.json()), (200, {"ended": "s1"}))
        self.assertEqual(client.closed, (4002, "token revoked"))
        self.assertEqual(backend.closed, (4002, "token revoked"))
        self.assertEqual(self.supervisor.sessions, {})
        self.assertEqual(self.metrics.closed["revoked"], 1)
        self.assertEqual(self.call("DELETE", "/sessions/s1").status, 404)
        self.assertEqual(self.call("GET", "/sessions/s1").status, 404)


class TokenTests(AdminTestCase):
    """POST /tokens and DELETE /tokens, as `vncmux token add/revoke`."""

    def test_issue(self) -> None:
        """POST issues a token: the answer has the token, its id and the noVNC URL (never
        the VNC password); the store holds the record with the expiry and options asked
        for."""
        response = self.call(
            "POST",
            "/tokens",
            {
                "host": "10.0.0.8",
                "port": "5900",
                "ttl": 600,
                "instance_uuid": "inst-9",
                "single_use": True,
                "max_sessions": 2,
                "password": "vnc-pass-xyz",
            },
        )
        self.assertEqual(response.status, 201)
        self.assertNotIn(b"vnc-pass-xyz", response.body)  # the answer never echoes it
        answer = response.json()
        token = answer["token"]
        self.assertGreaterEqual(len(token), 40)
        self.assertEqual(answer["token_id"], hash_token(token)[:12])
        self.assertEqual(answer["expires_at"], NOW + 600)
        url = urlsplit(answer["access_url"])
        self.assertEqual(url._replace(query="").geturl(), "https://console.example/vnc.html")
        self.assertEqual(parse_qs(url.query), {"path": [f"websockify?token={token}"]})
        record = self.successResultOf(self.store.lookup(token))
        self.assertEqual(
            record,
            TokenRecord(
                token_hash=hash_token(token),
                host="10.0.0.8",
                port=5900,
                instance_uuid="inst-9",
                access_url="https://console.example/vnc.html",
                issued_at=NOW,
                expires_at=NOW + 600,
                max_sessions=2,
                single_use=True,
                password="vnc-pass-xyz",
            ),
        )
        logged = json.dumps([{k: str(v) for k, v in e.items()} for e in self.events])
        self.assertIn(answer["token_id"], logged)
        self.assertNotIn(token, logged)
        self.assertNotIn("vnc-pass-xyz", logged)

    def test_issue_minimal(self) -> None:
        """Only host and port are required; base_url may be given per request."""
        response = self.call(
            "POST", "/tokens", {"host": "[::1]", "port": 5900, "base_url": "http://h/vnc.html"}
        )
        self.assertEqual(response.status, 201)
        answer = response.json()
        self.assertIsNone(answer["expires_at"])
        self.assertTrue(answer["access_url"].startswith("http://h/vnc.html?path=websockify"))
        record = self.successResultOf(self.store.lookup(answer["token"]))
        self.assertEqual((record.host, record.port, record.single_use), ("::1", 5900, False))
        self.assertEqual(record.console_type, "novnc")

    def test_issue_console_type(self) -> None:
        """A token for another listener, as `vncmux token add --console-type` issues."""
        body = {"host": "h", "port": 7000, "console_type": "serial"}
        response = self.call("POST", "/tokens", body)
        self.assertEqual(response.status, 201)
        record = self.successResultOf(self.store.lookup(response.json()["token"]))
        self.assertEqual(record.console_type, "serial")

    def test_bad_bodies(self) -> None:
        """Malformed requests are 400 with a reason, and store nothing."""
        bad = [
            (b"{not json", "the body is not valid JSON"),
            (b"", "the body must be a JSON object"),
            ([1, 2], "the body must be a JSON object"),
            ({"port": 5900}, "host must be a host name or address"),
            ({"host": "a b", "port": 5900}, "host must be a host name or address"),
            ({"host": "h"}, "port is required"),
            ({"host": "h", "port": 0}, "port 0 of port is out of range"),
            ({"host": "h", "port": True}, "port must not be a boolean"),
            ({"host": "h", "port": 1, "ttl": -5}, "ttl must be a positive number of seconds"),
            ({"host": "h", "port": 1, "ttl": "10"}, "ttl has the wrong type"),
            ({"host": "h", "port": 1, "max_sessions": 0}, "max_sessions must be positive"),
            ({"host": "h", "port": 1, "token": "mine"}, "unknown fields: token"),
            ({"host": "h", "port": 1, "single_use": "yes"}, "single_use has the wrong type"),
            (
                {"host": "h", "port": 1, "console_type": "rdp"},
                "console_type must be one of novnc, serial, spice-html5",
            ),
            (
                {"host": "h", "port": 1, "base_url": "javascript:alert(1)//"},
                "base_url: 'javascript:alert(1)//' is not an http:// or https:// URL with a host",
            ),
        ]
        for body, error in bad:
            response = self.call("POST", "/tokens", body)
            self.assertEqual((response.status, response.json()), (400, {"error": error}), body)
        self.assertEqual(self.store._records, {})

    def test_issue_refuses_disallowed_backends(self) -> None:
        """Targets the proxy would refuse get 403 and no token: outside --allowed-backend,
        or link-local (cloud metadata) by default, also behind a name. A name that does not
        resolve here is issued: the proxy checks again before dialling."""
        cases = [
            (self.site, {"host": "169.254.169.254", "port": 80}, "link-local"),
            (self.site, {"host": "metadata.example", "port": 80}, "link-local"),
            (self.site_for(self.store, "10.0.0.0/8"), {"host": "192.0.2.1", "port": 1}, "outside"),
        ]
        for site, body, why in cases:
            response = self.call("POST", "/tokens", body, site=site)
            self.assertEqual(response.status, 403, body)
            self.assertIn("backend not allowed", response.json()["error"])
            self.assertIn(why, response.json()["error"])
        self.assertEqual(self.store._records, {})
        allowed = self.site_for(self.store, "10.0.0.0/8", "169.254.169.254/32")
        for host in ("h", "169.254.169.254", "unknown.example"):
            self.assertEqual(self.call("POST", "/tokens", {"host": host, "port": 1},
                                       site=allowed).status, 201, host)  # fmt: skip

    def test_issue_store_down(self) -> None:
        """A store that cannot write answers 503 with the store's reason."""
        response = self.call(
            "POST", "/tokens", {"host": "h", "port": 1}, site=self.site_for(_DownStore())
        )
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json(), {"error": "token store unavailable: connection refused"})

    def test_issue_unsupported(self) -> None:
        """A token file cannot keep a TTL: 400 with the store's explanation."""
        path = self.mktemp()
        open(path, "w").close()
        site = self.site_for(FileTokenStore(path, self.clock))
        response = self.call("POST", "/tokens", {"host": "h", "port": 1, "ttl": 60}, site=site)
        self.assertEqual(response.status, 400)
        self.assertIn("cannot keep expires_at", response.json()["error"])
        ok = self.call("POST", "/tokens", {"host": "h", "port": 1}, site=site)
        self.assertEqual(ok.status, 201)
        with open(path) as f:
            self.assertEqual(f.read(), f"{ok.json()['token']}: h:1\n")

    def test_no_admin_interface(self) -> None:
        """A store without ITokenAdmin answers 501 to issuing and revoking."""
        site = self.site_for(_LookupOnlyStore())
        issuing = self.call("POST", "/tokens", {"host": "h", "port": 1}, site=site)
        self.assertEqual(issuing.status, 501)
        self.assertEqual(self.call("DELETE", "/tokens/x", site=site).status, 501)

    def test_revoke(self) -> None:
        """DELETE /tokens/<token> deletes the record and ends this process's sessions of it
        with 4002; other sessions go on. An unknown token is 404."""
        self.store.add("secret-token-1", "10.0.0.5", 5901)
        doomed, client, _ = open_session(self.supervisor, self.stats, session_id="a")
        other, _, _ = open_session(self.supervisor, self.stats, token="t2", session_id="b")
        response = self.call("DELETE", "/tokens/secret-token-1")
        self.assertEqual(response.status, 200)
        self.assertEqual(
            response.json(),
            {"revoked": True, "token_id": hash_token("secret-token-1")[:12], "sessions_ended": 1},
        )
        self.assertIsNone(self.successResultOf(self.store.lookup("secret-token-1")))
        self.assertEqual(client.closed, (4002, "token revoked"))
        self.assertIsNone(other.ending)
        again = self.call("DELETE", "/tokens/secret-token-1")
        self.assertEqual((again.status, again.json()["revoked"]), (404, False))
        logged = json.dumps([{k: str(v) for k, v in e.items()} for e in self.events])
        self.assertNotIn("secret-token-1", logged)

    def test_issue_never_starts_with_dash(self) -> None:
        """Issued tokens come from the CLI's new_token(): one that would start with '-'
        (and read as an option to `vncmux token revoke`) is drawn again."""
        drawn: Iterator[str] = iter(["-looks-like-an-option", "plain-token-value"])
        self.patch(secrets, "token_urlsafe", lambda nbytes=None: next(drawn))
        response = self.call("POST", "/tokens", {"host": "h", "port": 1})
        self.assertEqual((response.status, response.json()["token"]), (201, "plain-token-value"))

    def test_revoke_token_with_percent_and_slash(self) -> None:
        """The token in the path is percent-decoded once, as for any URL: ``ab%41cd`` sent
        as ``ab%2541cd`` revokes ``ab%41cd`` (not ``abAcd``) and ends its session, and a
        ``/`` in a token travels as ``%2F``. Unencoded, the extra segment names no token."""
        for token, path in (("ab%41cd", "ab%2541cd"), ("sl/ash%2F", "sl%2Fash%252F")):
            self.store.add(token, "10.0.0.5", 5901)
            self.store.add(token.replace("%41", "A"), "10.0.0.5", 5902)  # the decoy
            session, client, _ = open_session(self.supervisor, self.stats, token, token)
            response = self.call("DELETE", f"/tokens/{path}")
            self.assertEqual(response.status, 200, token)
            self.assertEqual(response.json()["token_id"], hash_token(token)[:12])
            self.assertEqual(client.closed, (4002, "token revoked"))
            self.assertIsNone(self.successResultOf(self.store.lookup(token)))
        self.assertIsNotNone(self.successResultOf(self.store.lookup("abAcd")))
        self.store.add("sl", "10.0.0.5", 5901)
        unencoded = self.call("DELETE", "/tokens/sl/ash")
        self.assertEqual((unencoded.status, unencoded.json()), (404, {"error": "no such token"}))
        self.assertIsNotNone(self.successResultOf(self.store.lookup("sl")))
        self.assertEqual(self.call("DELETE", "/tokens/%FF%FE").status, 404)

    def test_revoke_instance(self) -> None:
        """DELETE /tokens?instance_uuid= revokes every token of the instance and ends its
        sessions here."""
        self.store.add("t1", "h", 1, instance_uuid="inst-1")
        self.store.add("t2", "h", 2, instance_uuid="inst-1")
        self.store.add("t3", "h", 3, instance_uuid="inst-2")
        session, client, _ = open_session(self.supervisor, self.stats, token="t1")
        response = self.call("DELETE", "/tokens?instance_uuid=inst-1")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json(), {"revoked": 2, "sessions_ended": 1})
        self.assertEqual(client.closed, (4002, "token revoked"))
        self.assertIsNotNone(self.successResultOf(self.store.lookup("t3")))
        self.assertEqual(self.call("DELETE", "/tokens?instance_uuid=inst-1").status, 404)
        self.assertEqual(self.call("DELETE", "/tokens").status, 400)
