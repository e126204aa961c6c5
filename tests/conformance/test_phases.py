"""
WebSocket frames outside the relaying phase, which Autobahn|Testsuite does not reach:

- the refusal phase (token unknown): the proxy plays a refusing VNC server (RFB greeting, then
  zero security types and the reason) and closes with 4401; pings are answered; protocol
  errors still fail the connection; nothing is ever dialled;
- before the 101 answer: frames pipelined after the upgrade request (in the same read, in
  later reads while the VNC server is being dialled, or while the token lookup is pending)
  and a second upgrade request on the same connection are protocol errors: no session starts,
  and a reservation already taken is given back.
"""

from __future__ import annotations

import gc
import struct

from tests.conformance.harness import (
    ConformanceCase,
    Harness,
    HeldTokenStore,
    per_write_mode,
    upgrade_request,
)
from tests.conformance.wsframes import BINARY, CLOSE, PING, close_payload, frame

VERSION = b"RFB 003.008\n"
INVALID_TOKEN = 4401
REFUSAL = b"\x00" + struct.pack("!I", len(b"invalid token")) + b"invalid token"
PROTOCOL_ERROR = 1002


class RefusalCases(ConformanceCase):
    """The refusal phase: an unknown token gets an RFB-level refusal over WebSocket."""

    def setUp(self) -> None:
        super().setUp()
        self.h.open_refused("unknown")

    def assertRefused(self) -> None:
        """The refusal message went out as binary data, then the close with 4401."""
        data = [f for f in self.h.frames_since_open() if f.is_data]
        assert [f.opcode for f in data] == [BINARY] * len(data), data
        assert b"".join(f.payload for f in data) == REFUSAL, data
        self.assertFailed(INVALID_TOKEN, b"")
        assert self.h.dialled() == [], self.h.dialled()

    def test_refusal(self) -> None:
        """The client's RFB version in one binary frame gets the refusal and 4401."""
        self.send(frame(VERSION))
        self.assertRefused()

    def test_refusal_version_fragmented(self) -> None:
        """The version spread over a fragmented message and several messages still counts."""
        self.send(frame(VERSION[:3], fin=False), frame(VERSION[3:5], 0), frame(VERSION[5:]))
        self.assertRefused()

    def test_ping_answered(self) -> None:
        """A ping before the version gets its pong; the refusal follows."""
        self.send(frame(b"are you there", PING), frame(VERSION))
        assert self.h.pongs() == [b"are you there"], self.h.pongs()
        self.assertRefused()

    def test_burst_of_20_pings(self) -> None:
        """Twenty pings in the refusal phase get twenty pongs."""
        payloads = [b"%d" % i for i in range(20)]
        self.send(*(frame(p, PING) for p in payloads))
        assert self.h.pongs() == payloads, self.h.pongs()
        assert self.h.dialled() == []

    def test_protocol_error(self) -> None:
        """An RSV bit in the refusal phase fails the connection with 1002."""
        self.send(frame(VERSION[:4], rsv=4))
        self.assertFailed(PROTOCOL_ERROR, b"")
        assert self.h.dialled() == []

    def test_client_close(self) -> None:
        """The client closing first gets the close answered; nothing is dialled."""
        self.send(frame(close_payload(1000), CLOSE))
        closes = self.h.close_frames()
        assert len(closes) == 1 and self.h.frames()[-1] == closes[0], self.h.frames()
        assert closes[0].close_code in (1000, INVALID_TOKEN), closes
        self.h.wait_close_timeout()
        assert self.h.transport.disconnecting
        self.assertForgotten()
        assert self.h.dialled() == []


class EarlyFrameCases(ConformanceCase):
    """Bytes after the upgrade request and before the 101 answer are a protocol error."""

    early = (frame(b"early bird"), frame(b"", PING))

    def assertNoSession(self) -> None:
        """
        No session started, no byte reached a VNC server, every dialled connection is being
        closed (or was abandoned), the browser connection is closed once the close timeout
        has passed, and no reservation is left.
        """
        h = self.h
        h.answer_pending_dials()
        # A failure left in an abandoned Deferred is only logged when it is collected.
        gc.collect()
        assert h.console.supervisor.sessions == {}, h.console.supervisor.sessions
        h.wait_close_timeout()
        assert h.transport.disconnecting, "the browser connection is still open"
        for backend in h.backends:
            assert backend.received == b"", backend.received
            assert backend.closing, "a VNC server connection stays open"
        self.assertForgotten()
        gc.collect()
        self.assertNothingLogged()

    def test_frames_pipelined_after_request(self) -> None:
        """Frames right behind the upgrade request (same read in one-write mode, later reads
        while the VNC server is dialled otherwise) start no session."""
        self.h.connect()
        self.send(upgrade_request(), *self.early)
        self.assertNoSession()

    def test_frames_while_dialling(self) -> None:
        """Frames after the request was read, while the dial is pending: no session."""
        self.h.connect()
        self.h.send([upgrade_request()])
        assert self.h.dialled(), "the proxy did not dial"
        self.send(*self.early)
        self.assertNoSession()

    def test_frames_while_lookup_pending(self) -> None:
        """Frames while the token lookup is pending: nothing is ever dialled."""
        self.h.stop()
        store = HeldTokenStore(self.h.memory_store)
        self.h = Harness.for_test(self, store=store)  # type: ignore[arg-type]
        self.h.connect()
        self.send(upgrade_request(), *self.early)
        store.answer_all()
        self.h.pump()
        assert self.h.dialled() == [], self.h.dialled()
        self.assertNoSession()

    def test_second_upgrade_request(self) -> None:
        """A second upgrade request on the same connection: no session at all."""
        self.h.connect()
        self.send(upgrade_request(), upgrade_request())
        self.assertNoSession()
        assert len(self.h.dialled()) <= 1, self.h.dialled()

    def test_second_upgrade_request_while_lookup_pending(self) -> None:
        """A second upgrade request while the lookup is pending: one lookup at most is
        answered into a dial, and no session starts."""
        self.h.stop()
        store = HeldTokenStore(self.h.memory_store)
        self.h = Harness.for_test(self, store=store)  # type: ignore[arg-type]
        self.h.connect()
        self.send(upgrade_request(), upgrade_request())
        store.answer_all()
        self.h.pump()
        assert len(self.h.dialled()) <= 1, self.h.dialled()
        self.assertNoSession()

    def test_request_then_nothing_early(self) -> None:
        """The counterpart: the same request with nothing behind it starts a session."""
        self.h.connect()
        self.send(upgrade_request())
        self.h.answer_pending_dials()
        assert len(self.h.console.supervisor.sessions) == 1
        assert self.h.upgraded()


globals().update(per_write_mode(RefusalCases))
globals().update(per_write_mode(EarlyFrameCases))
