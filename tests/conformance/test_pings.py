"""
Autobahn|Testsuite 2.x (pings and pongs) on a relaying session.

A ping with 0..125 bytes of payload gets a pong with the same payload; a longer one fails with
1002; an unsolicited pong is ignored. Autobahn's 2.6 and 2.11 repeat 2.4 and 2.10 in one-byte
writes, which every case here does in its byte-per-write variant. Bursts stay at 20 pings at
most: the proxy may rate-limit pongs beyond that.
"""

from __future__ import annotations

from tests.conformance.harness import ConformanceCase, Harness, per_write_mode
from tests.conformance.wsframes import PING, PONG, frame

PROTOCOL_ERROR = 1002
#: The most pings a test sends before the proxy's clock moves on.
BURST = 20


class PingCases(ConformanceCase):
    """Autobahn 2.x: pings answered with identical pongs, unsolicited pongs ignored."""

    def ping_answered(self, payload: bytes) -> None:
        self.open()
        self.send(frame(payload, PING))
        assert self.h.pongs() == [payload], self.h.pongs()
        self.assertRelaying(b"")
        self.closeCleanly()

    def test_case_2_1(self) -> None:
        """A ping without payload gets an empty pong."""
        self.ping_answered(b"")

    def test_case_2_2(self) -> None:
        """A ping with a short text payload gets it back."""
        self.ping_answered(b"Hello, world!")

    def test_case_2_3(self) -> None:
        """A ping with arbitrary bytes gets them back."""
        self.ping_answered(b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff")

    def test_case_2_4(self) -> None:
        """A ping with 125 bytes, the most a control frame holds, gets them back (2.6 too)."""
        self.ping_answered(b"\xfe" * 125)

    def test_case_2_5(self) -> None:
        """A ping with 126 bytes fails with 1002 and gets no pong."""
        self.open()
        self.send(frame(b"\xfe" * 126, PING))
        self.assertFailed(PROTOCOL_ERROR, b"")
        assert self.h.pongs() == [], self.h.pongs()

    def test_case_2_7(self) -> None:
        """An unsolicited empty pong gets no answer; the close handshake follows normally."""
        self.open()
        self.send(frame(b"", PONG))
        assert self.h.frames_since_open() == [], self.h.frames_since_open()
        self.closeCleanly()

    def test_case_2_8(self) -> None:
        """An unsolicited pong with payload gets no answer."""
        self.open()
        self.send(frame(b"unsolicited pong payload", PONG))
        assert self.h.frames_since_open() == [], self.h.frames_since_open()
        self.closeCleanly()

    def test_case_2_9(self) -> None:
        """After an unsolicited pong, a ping still gets its own pong."""
        self.open()
        self.send(frame(b"unsolicited pong payload", PONG), frame(b"ping payload", PING))
        assert self.h.pongs() == [b"ping payload"], self.h.pongs()
        self.closeCleanly()

    def test_case_2_10(self) -> None:
        """Ten pings in a row get ten pongs, in order (2.11 sends them byte by byte)."""
        self.open()
        payloads = [b"payload-%d" % i for i in range(10)]
        self.send(*(frame(p, PING) for p in payloads))
        assert self.h.pongs() == payloads, self.h.pongs()
        self.closeCleanly()

    def test_burst_of_20_pings(self) -> None:
        """A burst of 20 pings is answered ping for ping."""
        self.open()
        payloads = [b"burst-%02d" % i for i in range(BURST)]
        self.send(*(frame(p, PING) for p in payloads))
        assert self.h.pongs() == payloads, self.h.pongs()
        self.assertRelaying(b"")

    def test_pings_between_binary_messages(self) -> None:
        """Pings between binary messages are answered and the messages relayed in order."""
        self.open()
        frames = []
        for i in range(BURST):
            frames += [frame(b"data-%02d;" % i), frame(b"p%d" % i, PING)]
        self.send(*frames)
        assert self.h.pongs() == [b"p%d" % i for i in range(BURST)], self.h.pongs()
        self.assertRelaying(b"".join(b"data-%02d;" % i for i in range(BURST)))
        self.closeCleanly()

    def test_ping_payload_lengths(self) -> None:
        """
        Every payload length from 0 to 125 comes back unchanged, in bursts of at most 20
        pings per connection.
        """
        lengths = list(range(126))
        for start in range(0, len(lengths), BURST):
            self.h = Harness.for_test(self)  # type: ignore[arg-type]
            self.open()
            payloads = [bytes((n + i) % 256 for i in range(n)) for n in lengths[start:][:BURST]]
            self.send(*(frame(p, PING) for p in payloads))
            assert self.h.pongs() == payloads, (start, self.h.pongs())
            self.assertRelaying(b"")
            self.assertNothingLogged()

    def test_unsolicited_pong_then_data(self) -> None:
        """An unsolicited pong does not disturb the relay: the data after it arrives."""
        self.open()
        self.send(frame(b"before"), frame(b"whatever", PONG), frame(b"after"))
        self.assertRelaying(b"beforeafter")
        assert self.h.frames_since_open() == [], self.h.frames_since_open()

    def test_pong_with_126_bytes(self) -> None:
        """A pong with 126 bytes of payload breaks the control frame limit too: 1002."""
        self.open()
        self.send(frame(b"ok"), frame(b"\x01" * 126, PONG))
        self.assertFailed(PROTOCOL_ERROR, b"ok")


globals().update(per_write_mode(PingCases))
