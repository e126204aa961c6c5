"""
Autobahn|Testsuite 3.x: a frame with any RSV bit set (no extension is negotiated) fails the
connection with 1002, and nothing after it is processed: no relay, no pong.

Autobahn sends text frames here; text is itself refused with 1003 by vncmux, so the ported
cases send binary frames to test the RSV bits alone (3.7 keeps its close frame). Autobahn's 3.3
and 3.4 repeat 3.2 frame by frame and byte by byte, which the write modes cover.
"""

from __future__ import annotations

from tests.conformance.harness import ConformanceCase, per_write_mode
from tests.conformance.wsframes import BINARY, CLOSE, PING, TEXT, close_payload, frame

PROTOCOL_ERROR = 1002
HELLO = b"Hello, world!"


class ReservedBitsCases(ConformanceCase):
    """Autobahn 3.x: RSV bits set without an extension."""

    def rsv_fails(self, rsv: int, opcode: int = BINARY, payload: bytes = HELLO) -> None:
        self.open()
        self.send(frame(HELLO), frame(payload, opcode, rsv=rsv), frame(b"", PING))
        self.assertFailed(PROTOCOL_ERROR, HELLO)
        assert self.h.pongs() == [], f"pong after the failure: {self.h.pongs()}"

    def test_case_3_1(self) -> None:
        """RSV1 on a binary frame fails with 1002."""
        self.rsv_fails(4)

    def test_case_3_2(self) -> None:
        """A good message, then RSV2 on the next, then a ping: the first is relayed, 1002,
        no pong (3.3 and 3.4 send the same frames synchronously and chopped)."""
        self.rsv_fails(2)

    def test_case_3_5(self) -> None:
        """RSV1 and RSV3 on a binary frame fail with 1002."""
        self.rsv_fails(5, payload=b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff")

    def test_case_3_6(self) -> None:
        """RSV1 and RSV2 on a binary frame fail with 1002."""
        self.rsv_fails(6)

    def test_case_3_7(self) -> None:
        """All three RSV bits on a close frame fail with 1002, not a normal close."""
        self.rsv_fails(7, CLOSE, close_payload(1000))

    def test_rsv_on_ping(self) -> None:
        """RSV1 on a ping fails with 1002 and the ping gets no pong."""
        self.rsv_fails(4, PING, b"ping")

    def test_rsv_on_continuation(self) -> None:
        """RSV3 on the continuation of a fragmented binary message fails with 1002; the
        first fragment was relayed already."""
        self.open()
        self.send(frame(b"first", fin=False), frame(b"second", 0, rsv=1))
        self.assertFailed(PROTOCOL_ERROR, b"first")

    def test_rsv_on_text(self) -> None:
        """RSV1 on a text frame: the frame header is wrong before its type matters, 1002."""
        self.rsv_fails(4, TEXT)


globals().update(per_write_mode(ReservedBitsCases))
