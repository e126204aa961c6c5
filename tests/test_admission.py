"""Admission as a connection sees it: the backend policy and the brute-force limiter.

Each test drives a real connection in memory (tests/conformance/harness.py) and reads what
the browser got, what was dialled, and what was logged and counted.
"""

from __future__ import annotations

import ipaddress
import struct

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.conformance.harness import CLIENT_ADDRESS, Harness, TcpLikeTransport, upgrade_request
from tests.conformance.wsframes import CLOSE, frame, parse_server_frames
from tests.fakes import FakeNameResolver
from vncmux.interfaces import ISessionObserver
from vncmux.settings import Limits, Settings

VERSION = b"RFB 003.008\n"


def refusal(reason: bytes) -> bytes:
    return b"\x00" + struct.pack("!I", len(reason)) + reason


def harness(test: SynchronousTestCase, **settings: object) -> Harness:
    config = Settings(
        listen="tcp:0",
        metrics=None,
        limits=Limits(ping_interval=0),
        **settings,  # type: ignore[arg-type]
    )
    return Harness.for_test(test, settings=config)


class BackendPolicyTests(SynchronousTestCase):
    """The target of a token is checked before anything is dialled."""

    def refused_with(self, h: Harness, token: str = "good") -> tuple[int | None, bytes]:
        h.connect()
        h.send([upgrade_request(token)])
        h.send([frame(VERSION)])
        data = b"".join(f.payload for f in h.frames() if f.is_data)
        closes = h.close_frames()
        return closes[-1].close_code if closes else None, data

    def test_outside_the_allowed_networks(self) -> None:
        """A record pointing outside --allowed-backend: 4403 'backend not allowed', shown as
        an RFB refusal, nothing dialled, nothing held."""
        h = harness(self, allowed_backends=(ipaddress.ip_network("10.0.0.0/8"),))
        code, data = self.refused_with(h)
        self.assertEqual(code, 4403)
        self.assertTrue(data.endswith(refusal(b"backend not allowed")))
        self.assertEqual(h.dialled(), [])
        self.assertEqual(h.console.supervisor.reserved, 0)

    def test_metadata_address(self) -> None:
        """169.254.169.254 is never dialled by default."""
        h = harness(self)
        h.memory_store.add("meta", "169.254.169.254", 80)
        code, _ = self.refused_with(h, "meta")
        self.assertEqual(code, 4403)
        self.assertEqual(h.dialled(), [])

    def test_name_resolved_once_and_dialled_as_checked(self) -> None:
        """A host name is resolved once, and the address that was checked is the one dialled
        (a second answer from DNS cannot move the connection elsewhere)."""
        h = harness(self, allowed_backends=(ipaddress.ip_network("10.1.0.0/16"),))
        resolver = FakeNameResolver({"vnc.test": ["10.1.2.3"]})
        h.reactor.installNameResolver(resolver)
        h.memory_store.add("named", "vnc.test", 5901)
        h.connect()
        h.send([upgrade_request("named")])
        self.assertEqual(h.dialled(), [("10.1.2.3", 5901)])
        self.assertEqual(resolver.asked, ["vnc.test"])


def attempt(h: Harness, token: str) -> tuple[int | None, bytes]:
    """One more connection from the same client to the harness's proxy; its close code and
    the data it was sent."""
    transport = TcpLikeTransport(peerAddress=CLIENT_ADDRESS)
    protocol = h.console.factory.buildProtocol(CLIENT_ADDRESS)
    protocol.makeConnection(transport)
    protocol.dataReceived(upgrade_request(token))
    protocol.dataReceived(frame(VERSION))
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    frames = parse_server_frames(rest)
    closes = [f.close_code for f in frames if f.opcode == CLOSE]
    return closes[-1] if closes else None, b"".join(f.payload for f in frames if f.is_data)


class FailedTokenTests(SynchronousTestCase):
    """Past --max-failed-tokens unknown tokens a client is refused without a lookup."""

    def test_blocked_after_too_many(self) -> None:
        """With a limit of 3, four unknown tokens get 4401; the next upgrade, even with a
        good token, gets 4429 'too many failed attempts' and nothing is dialled."""
        h = harness(self, max_failed_tokens=3)
        codes = [attempt(h, "unknown")[0] for _ in range(4)]
        code, data = attempt(h, "good")
        self.assertEqual(codes, [4401] * 4)
        self.assertEqual(code, 4429)
        self.assertTrue(data.endswith(refusal(b"too many failed attempts")))
        self.assertEqual(h.dialled(), [])

    def test_blocked_asks_no_store_and_is_not_timed(self) -> None:
        """A blocked client's upgrade is refused before the store is asked (with the store
        down it still gets 4429, not 4503), and no token_lookup time is recorded for it."""
        h = harness(self, max_failed_tokens=1)
        stages = Stages()
        h.console.observers.add(stages)
        codes = [attempt(h, "unknown")[0] for _ in range(2)]
        self.assertEqual(stages.timed, ["token_lookup"] * 2)
        h.memory_store.available = False
        self.assertEqual(attempt(h, "good")[0], 4429)
        self.assertEqual((codes, stages.timed), ([4401] * 2, ["token_lookup"] * 2))


@implementer(ISessionObserver)
class Stages:
    """The connect stages timed, in order."""

    def __init__(self) -> None:
        self.timed: list[str] = []

    def session_rejected(self, *args: object) -> None:
        """Not a stage."""

    def session_opened(self, session: object) -> None:
        """Not a stage."""

    def session_closed(self, session: object, duration: float) -> None:
        """Not a stage."""

    def stage_timed(self, stage: str, seconds: float) -> None:
        self.timed.append(stage)
