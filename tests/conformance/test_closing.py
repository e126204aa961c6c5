"""
Autobahn|Testsuite 7.x: the closing handshake started by the browser.

The proxy answers a close frame once, with the browser's code (an empty close frame gets an
empty answer or 1000), closes the TCP connection, relays nothing that came after the close, and
closes the VNC server connection after flushing what it was sent. A malformed close frame
(one byte of payload, a code RFC 6455 section 7.4 does not allow, a reason of invalid UTF-8,
more than 125 bytes) is answered with a close frame carrying 1002 (1007 for the reason), never
with a reset. Autobahn's 7.1.x send text; the ported cases send binary, vncmux's only data.
Autobahn's 7.13.x (codes 5000 and 65535) are informational there; vncmux must answer 1002.
"""

from __future__ import annotations

from tests.conformance.harness import ConformanceCase, per_write_mode
from tests.conformance.wsframes import (
    CLOSE,
    CONTINUATION,
    PING,
    TEXT,
    close_payload,
    frame,
)

PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
NORMAL = 1000
HELLO = b"Hello World!"
#: Autobahn 7.7.x: codes a close frame may carry.
VALID_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999)
#: Autobahn 7.9.x: codes no endpoint may send.
INVALID_CODES = (0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999)
#: A string that is not UTF-8 (a UTF-16 surrogate encoded as if it were a character).
NOT_UTF8 = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"


class ClosingCases(ConformanceCase):
    """Autobahn 7.x: closing handshakes started by the browser."""

    def close_echoed(self, code: int) -> None:
        self.open()
        self.closeCleanly(code)

    def close_refused(self, payload: bytes, code: int = PROTOCOL_ERROR) -> None:
        self.open()
        self.send(frame(b"before"), frame(payload, CLOSE), frame(b"after"))
        self.assertFailed(code, b"before")

    def test_case_7_1_1(self) -> None:
        """A binary message, then a normal close: the message is relayed, the close echoed."""
        self.open()
        self.send(frame(HELLO), frame(close_payload(NORMAL), CLOSE))
        self.assertClientCloseAnswered({NORMAL}, HELLO)

    def test_case_7_1_2(self) -> None:
        """A second close frame after the first is ignored: one answer only."""
        self.open()
        self.send(frame(close_payload(NORMAL), CLOSE), frame(b"", CLOSE))
        self.assertClientCloseAnswered({NORMAL}, b"")

    def test_case_7_1_3(self) -> None:
        """A ping after the close frame gets no pong."""
        self.open()
        self.send(frame(close_payload(NORMAL), CLOSE), frame(b"", PING))
        assert self.h.pongs() == [], self.h.pongs()
        self.assertClientCloseAnswered({NORMAL}, b"")

    def test_case_7_1_4(self) -> None:
        """A binary message after the close frame is not relayed."""
        self.open()
        self.send(frame(close_payload(NORMAL), CLOSE), frame(HELLO))
        self.assertClientCloseAnswered({NORMAL}, b"")

    def test_case_7_1_5(self) -> None:
        """A fragment, the close, the final fragment: only the first fragment is relayed."""
        self.open()
        self.send(
            frame(b"fragment1", fin=False),
            frame(close_payload(NORMAL), CLOSE),
            frame(b"fragment2", CONTINUATION),
        )
        self.assertClientCloseAnswered({NORMAL}, b"fragment1")

    def test_case_7_1_6(self) -> None:
        """A 256 KiB message, a short one, the close, a ping: both messages are relayed,
        the close answered, the ping ignored."""
        self.open()
        big = b"BAsd7&jh23" * (256 * 1024 // 10)
        self.send(frame(big), frame(HELLO), frame(close_payload(NORMAL), CLOSE), frame(b"", PING))
        assert self.h.pongs() == [], self.h.pongs()
        self.assertClientCloseAnswered({NORMAL}, big + HELLO)

    def test_case_7_3_1(self) -> None:
        """An empty close frame is answered with an empty close frame or 1000."""
        self.open()
        self.send(frame(b"", CLOSE))
        self.assertClientCloseAnswered({None, NORMAL}, b"")

    def test_case_7_3_2(self) -> None:
        """A close frame of one byte (half a code) is answered with 1002."""
        self.close_refused(b"a")

    def test_case_7_3_3(self) -> None:
        """A close with 1000 and no reason is answered with 1000."""
        self.close_echoed(NORMAL)

    def test_case_7_3_4(self) -> None:
        """A close with 1000 and a reason is answered with 1000."""
        self.open()
        self.send(frame(close_payload(NORMAL, b"Hello World!"), CLOSE))
        self.assertClientCloseAnswered({NORMAL}, b"")

    def test_case_7_3_5(self) -> None:
        """A close with 1000 and a 123-byte reason (125 bytes, the limit) gets 1000."""
        self.open()
        self.send(frame(close_payload(NORMAL, b"*" * 123), CLOSE))
        self.assertClientCloseAnswered({NORMAL}, b"")

    def test_case_7_3_6(self) -> None:
        """A close whose reason makes the payload 126 bytes is answered with 1002."""
        self.close_refused(close_payload(NORMAL, b"*" * 124))

    def test_case_7_5_1(self) -> None:
        """A close reason of invalid UTF-8 is answered with 1007."""
        self.close_refused(close_payload(NORMAL, NOT_UTF8), INVALID_PAYLOAD)

    def test_case_7_13_1(self) -> None:
        """Close code 5000 (out of range) is answered with 1002 in a close frame."""
        self.close_refused(close_payload(5000))

    def test_case_7_13_2(self) -> None:
        """Close code 65535 is answered with 1002 in a close frame."""
        self.close_refused(close_payload(65535))

    def test_close_code_1015(self) -> None:
        """Close code 1015 (TLS failure, never sent on the wire) is answered with 1002."""
        self.close_refused(close_payload(1015))

    def test_text_after_close(self) -> None:
        """A text frame after the close is ignored, not answered with 1003."""
        self.open()
        self.send(frame(close_payload(NORMAL), CLOSE), frame(b"late", TEXT))
        self.assertClientCloseAnswered({NORMAL}, b"")

    def test_backend_output_flushed_before_close(self) -> None:
        """What the VNC server sent before the browser's close still reaches the browser,
        and what the browser sent reaches the VNC server before its connection closes."""
        backend = self.open()
        self.send(frame(b"key press"))
        backend.protocol.dataReceived(b"screen update")
        self.send(frame(close_payload(NORMAL), CLOSE))
        assert [f.payload for f in self.h.data_frames()] == [b"screen update"]
        self.assertClientCloseAnswered({NORMAL}, b"key press")


def _code_case(code: int, expected: int | None, number: str) -> object:
    def test(self: ClosingCases) -> None:
        if expected is None:
            self.close_echoed(code)
        else:
            self.close_refused(close_payload(code), expected)

    test.__name__ = f"test_case_{number}"
    test.__doc__ = (
        f"Close code {code} is answered with the same code."
        if expected is None
        else f"Close code {code} (not allowed) is answered with {expected} in a close frame."
    )
    return test


for _i, _code in enumerate(VALID_CODES, 1):
    setattr(ClosingCases, f"test_case_7_7_{_i}", _code_case(_code, None, f"7_7_{_i}"))
for _i, _code in enumerate(INVALID_CODES, 1):
    setattr(ClosingCases, f"test_case_7_9_{_i}", _code_case(_code, PROTOCOL_ERROR, f"7_9_{_i}"))

globals().update(per_write_mode(ClosingCases))
