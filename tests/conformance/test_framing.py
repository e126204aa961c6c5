"""
Autobahn|Testsuite 1.x (framing), re-expressed for a binary relay, plus the header encodings
RFC 6455 section 5.2 forbids (unmasked client frames, non-minimal lengths, a 64-bit length with
its top bit set), which Autobahn's fuzzingclient does not send.

1.1.x send text messages: vncmux relays binary only, so each must fail with 1003 and nothing
reaches the VNC server. 1.2.x send binary messages: every byte must reach the VNC server once,
in order, and what the VNC server sends back must reach the browser; then the browser closes
and the proxy answers the close handshake. Autobahn's 1.1.8/1.2.8 send 65536 bytes in writes
of 997 bytes; here every case runs in every write mode, byte by byte included.
"""

from __future__ import annotations

from tests.conformance.harness import ConformanceCase, per_write_mode
from tests.conformance.wsframes import BINARY, LONG, MEDIUM, PING, SHORT, TEXT, chop, frame

# Payload sizes of Autobahn's 1.1.x and 1.2.x, around the three length encodings.
SIZES = {1: 0, 2: 125, 3: 126, 4: 127, 5: 128, 6: 65535, 7: 65536}
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003


class FramingCases(ConformanceCase):
    """Autobahn 1.x: single-frame messages of every length encoding."""

    def text_fails(self, size: int) -> None:
        self.open()
        self.send(frame(b"*" * size, TEXT))
        self.assertFailed(UNSUPPORTED_DATA, b"")

    def binary_relayed(self, size: int) -> None:
        self.open()
        payload = b"\xfe" * size
        self.send(frame(payload))
        self.assertRelaying(payload)
        self.assertEchoed(payload)
        self.closeCleanly()

    def test_case_1_1_1(self) -> None:
        """An empty text message fails with 1003."""
        self.text_fails(SIZES[1])

    def test_case_1_1_2(self) -> None:
        """A 125-byte text message fails with 1003."""
        self.text_fails(SIZES[2])

    def test_case_1_1_3(self) -> None:
        """A 126-byte text message (16-bit length) fails with 1003."""
        self.text_fails(SIZES[3])

    def test_case_1_1_4(self) -> None:
        """A 127-byte text message fails with 1003."""
        self.text_fails(SIZES[4])

    def test_case_1_1_5(self) -> None:
        """A 128-byte text message fails with 1003."""
        self.text_fails(SIZES[5])

    def test_case_1_1_6(self) -> None:
        """A 65535-byte text message fails with 1003."""
        self.text_fails(SIZES[6])

    def test_case_1_1_7(self) -> None:
        """A 65536-byte text message (64-bit length) fails with 1003 (1.1.8 chops it)."""
        self.text_fails(SIZES[7])

    def test_case_1_2_1(self) -> None:
        """An empty binary message is relayed (as nothing) and the session goes on."""
        self.binary_relayed(SIZES[1])

    def test_case_1_2_2(self) -> None:
        """A 125-byte binary message reaches the VNC server."""
        self.binary_relayed(SIZES[2])

    def test_case_1_2_3(self) -> None:
        """A 126-byte binary message (16-bit length) reaches the VNC server."""
        self.binary_relayed(SIZES[3])

    def test_case_1_2_4(self) -> None:
        """A 127-byte binary message reaches the VNC server."""
        self.binary_relayed(SIZES[4])

    def test_case_1_2_5(self) -> None:
        """A 128-byte binary message reaches the VNC server."""
        self.binary_relayed(SIZES[5])

    def test_case_1_2_6(self) -> None:
        """A 65535-byte binary message (largest 16-bit length) reaches the VNC server."""
        self.binary_relayed(SIZES[6])

    def test_case_1_2_7(self) -> None:
        """A 65536-byte binary message (64-bit length) reaches the VNC server."""
        self.binary_relayed(SIZES[7])

    def test_case_1_2_8(self) -> None:
        """65536 bytes read in pieces of 997 bytes (the same in every write mode)."""
        self.open()
        payload = bytes(range(256)) * 256
        self.h.send(chop(frame(payload), 997))
        self.assertRelaying(payload)
        self.closeCleanly()

    def test_one_byte_messages(self) -> None:
        """A run of one-byte binary messages arrives as one byte stream, in order."""
        self.open()
        payload = bytes(range(40))
        self.send(*(frame(payload[i : i + 1]) for i in range(len(payload))))
        self.assertRelaying(payload)
        self.closeCleanly()

    def test_messages_of_every_encoding_in_a_row(self) -> None:
        """Messages of each length encoding back to back are relayed as one stream."""
        self.open()
        payloads = [bytes([n % 251]) * size for n, size in enumerate(SIZES.values())]
        self.send(*(frame(p) for p in payloads))
        self.assertRelaying(b"".join(payloads))
        self.closeCleanly()

    def test_unmasked_client_frame(self) -> None:
        """An unmasked client frame fails with 1002; the frames before it were relayed."""
        self.open()
        self.send(frame(b"before"), frame(b"unmasked", mask=None), frame(b"after"))
        self.assertFailed(PROTOCOL_ERROR, b"before")

    def test_unmasked_ping(self) -> None:
        """An unmasked ping fails with 1002 and gets no pong."""
        self.open()
        self.send(frame(b"hello", PING, mask=None))
        self.assertFailed(PROTOCOL_ERROR, b"")
        assert self.h.pongs() == [], self.h.pongs()

    def test_non_minimal_16_bit_length(self) -> None:
        """A 16-bit length for fewer than 126 bytes fails with 1002, nothing of it relayed."""
        self.open()
        self.send(frame(b"ok"), frame(b"x" * 125, length_form=MEDIUM), frame(b"after"))
        self.assertFailed(PROTOCOL_ERROR, b"ok")

    def test_non_minimal_16_bit_length_empty(self) -> None:
        """A 16-bit length field holding 0 fails with 1002."""
        self.open()
        self.send(frame(b"", length_form=MEDIUM))
        self.assertFailed(PROTOCOL_ERROR, b"")

    def test_non_minimal_64_bit_length(self) -> None:
        """A 64-bit length for fewer than 65536 bytes fails with 1002."""
        self.open()
        self.send(frame(b"ok"), frame(b"y" * 65535, length_form=LONG), frame(b"after"))
        self.assertFailed(PROTOCOL_ERROR, b"ok")

    def test_non_minimal_64_bit_length_small(self) -> None:
        """A 64-bit length field holding 5 fails with 1002."""
        self.open()
        self.send(frame(b"hello", length_form=LONG))
        self.assertFailed(PROTOCOL_ERROR, b"")

    def test_64_bit_length_with_top_bit_set(self) -> None:
        """
        A 64-bit length with its most significant bit set fails with 1002, and none of the
        bytes after that header reaches the VNC server (they must not be unmasked as data).
        """
        self.open()
        rest = frame(b"looks like data") + frame(b"more data") * 20
        bad = frame(b"", declared_length=2**63 + 5, length_form=LONG)
        self.send(frame(b"ok"), bad + rest)
        self.assertFailed(PROTOCOL_ERROR, b"ok")

    def test_minimal_encodings_accepted(self) -> None:
        """The minimal encoding at each boundary is accepted (the counterpart of the above)."""
        self.open()
        payloads = [b"a" * 125, b"b" * 126, b"c" * 65535, b"d" * 65536]
        forms = [SHORT, MEDIUM, MEDIUM, LONG]
        self.send(*(frame(p, BINARY, length_form=f) for p, f in zip(payloads, forms, strict=True)))
        self.assertRelaying(b"".join(payloads))


globals().update(per_write_mode(FramingCases))
