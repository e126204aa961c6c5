"""The client's WebSocket stream after the upgrade, read by one owner.

Once the upgrade is answered, every byte from the browser goes through L{ClientFrameReader}:
it checks every frame header (RFC 6455 section 5), unmasks binary data frames and hands their
payload on as it arrives, never assembled, and collects each control frame (close, ping,
pong: at most 125 bytes) whole, for autobahn to act on. autobahn therefore never sees a data
frame, and only this reader knows whether a fragmented message is open: there is no second
idea of the stream's state to drift out of step.

The payload of one read goes on as one list of pieces, which the relay sends to the VNC
server in one call (scatter/gather): a burst of pointer events or a read of bulk frames is one
send, not one per frame. Consecutive small payloads are joined into one piece; bulk pieces
(from 1 KiB) stay as they were unmasked, never joined, which would copy them once more.
Message boundaries mean nothing to a console, so this is the stream the browser sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# autobahn defines it by a conditional import (its C version or Python's), which mypy reads
# as a private import.
from autobahn.websocket.xormasker import create_xor_masker  # type: ignore[attr-defined]

#: Below this many bytes, unmasking with Python integers beats autobahn's C masker, whose
#: every call costs about 3 us (a masker object, a copy into a C buffer and one out). Measured
#: on CPython 3.11, x86-64 (us per call, integers / autobahn 26.10's NVX / wsaccel 0.6.7 /
#: numpy 2.4): 6 bytes 0.4 / 2.9 / 0.3 / 1.1; 512 B 1.5 / 2.9 / 0.6 / 1.2; 1 KiB 2.8 / 3.0 /
#: 1.0 / 1.4; 4 KiB 8.9 / 3.2 / 2.8 / 1.5; 64 KiB 135 / 9.2 / 40 / 6.4. wsaccel (byte by
#: byte) is slower than NVX from 4 KiB on and its last release is from 2024; numpy is faster
#: only above 1 KiB, by 3 us at 64 KiB (a 64 KiB frame costs the relay some 120 us in all),
#: and would be a large dependency for it.
_SMALL = 1024

PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003

_CONTINUATION, _TEXT, _BINARY = 0, 1, 2
_CLOSE = 8
_CONTROL = frozenset((_CLOSE, 9, 10))  # close, ping, pong
_MAX_CONTROL_PAYLOAD = 125


def unmask(payload: bytes | memoryview, mask: bytes, offset: int) -> bytes:
    """XOR C{payload} with the 4-byte C{mask}, starting C{offset} bytes into the frame."""
    shift = offset & 3
    if shift:
        mask = mask[shift:] + mask[:shift]
    size = len(payload)
    if size < _SMALL:
        key = (mask * ((size >> 2) + 1))[:size]
        xored = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
        return xored.to_bytes(size, "little")
    return create_xor_masker(mask, size).process(payload)  # type: ignore[no-any-return]


class ClientFrameReader:
    """
    Splits the client stream into unmasked binary payload chunks and whole control frames,
    and fails the stream at the first frame RFC 6455 forbids.

    C{deliver(pieces)} gets the data payload of each read (a fresh list, in order);
    C{control(raw_frame)} gets each control frame as it came over the wire (header and
    masked payload); C{fail(code, why)} is called once, for a protocol error (1002) or a
    text frame (1003, vncmux relays binary only), and nothing is read after it: RFC 6455
    section 7.1.7 says to stop processing.
    """

    __slots__ = (
        "deliver",
        "_control",
        "_fail",
        "_head",
        "_mask",
        "_offset",
        "_remaining",
        "_in_message",
        "_control_frame",
        "_failed",
        "_why_failed",
    )

    def __init__(
        self,
        deliver: Callable[[Sequence[bytes]], None],
        control: Callable[[bytes], None],
        fail: Callable[[int, str], None],
    ) -> None:
        #: Where binary payload goes; the connection points it at the session or the refusal.
        self.deliver = deliver
        self._control = control
        self._fail = fail
        self._head = b""  # an incomplete frame header
        self._mask = b""
        self._offset = 0  # payload bytes of the current data frame already delivered
        self._remaining = 0  # payload bytes of the current frame still to come
        self._in_message = False  # inside a fragmented binary message
        self._control_frame: bytes | None = None  # a control frame being collected
        self._failed = False
        self._why_failed = (PROTOCOL_ERROR, "")  # the code and reason of a failure

    def feed(self, data: bytes) -> None:
        """Read C{data}, the next bytes of the client stream, whatever their split."""
        if self._failed:
            return
        if self._head:
            data = self._head + data
            self._head = b""
        size = len(data)
        pos = 0
        pieces: list[bytes] = []  # what this read hands on, in order
        small: list[bytes] = []  # small unmasked payloads, joined into one piece
        while pos < size:
            remaining = self._remaining
            if remaining:
                end = min(size, pos + remaining)
                self._remaining = remaining - (end - pos)
                control = self._control_frame
                if control is not None:
                    self._control_frame = control = control + data[pos:end]
                    pos = end
                    if not self._remaining:
                        self._control_frame = None
                        self._deliver(pieces, small)
                        pieces = []
                        self._control(control)
                else:
                    offset = self._offset
                    self._offset = offset + (end - pos)
                    if end - pos < _SMALL:
                        small.append(unmask(data[pos:end], self._mask, offset))
                    else:
                        # A view, not a slice, of the read is unmasked.
                        chunk = memoryview(data)[pos:end] if pos or end < size else data
                        if small:
                            _join_into(pieces, small)
                        pieces.append(unmask(chunk, self._mask, offset))
                    pos = end
                continue
            header_end = self._parse_header(data, pos, size)
            if header_end < 0:
                # What came before the bad frame is relayed, then the stream fails.
                self._deliver(pieces, small)
                self._failed = True
                self._fail(*self._why_failed)
                return
            if header_end == pos:  # incomplete header, kept for the next call
                self._head = data[pos:]
                break
            pos = header_end
            if self._control_frame is not None and not self._remaining:
                control, self._control_frame = self._control_frame, None
                self._deliver(pieces, small)
                pieces = []
                self._control(control)  # an empty control frame
        self._deliver(pieces, small)

    def _deliver(self, pieces: list[bytes], small: list[bytes]) -> None:
        """Hand on the payload read so far: at the end of a read, and before a control frame
        or a failure, so that the order holds. C{pieces} is handed over, not copied: a read
        that goes on collects into a new list."""
        if small:
            _join_into(pieces, small)
        if pieces:
            self.deliver(pieces)

    def _parse_header(self, data: bytes, pos: int, size: int) -> int:
        """
        The position after the frame header at C{pos}; C{pos} itself when the header is
        incomplete; -1 when the frame failed the stream. What the first two bytes tell is
        checked at once, so a bad frame fails even if the rest of its header never comes.
        """
        if size - pos < 2:
            return pos
        b0, b1 = data[pos], data[pos + 1]
        opcode = b0 & 0x0F
        final = b0 & 0x80
        length = b1 & 0x7F
        if b0 & 0x70:
            return self._failure(PROTOCOL_ERROR, "reserved bits set")
        if not b1 & 0x80:
            return self._failure(PROTOCOL_ERROR, "unmasked client frame")
        if opcode in (_BINARY, _CONTINUATION):
            if (opcode == _BINARY) == self._in_message:
                why = "new message inside a fragmented one" if opcode else "stray continuation"
                return self._failure(PROTOCOL_ERROR, why)
        elif opcode in _CONTROL:
            if not final:
                return self._failure(PROTOCOL_ERROR, "fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                return self._failure(PROTOCOL_ERROR, "control frame too long")
            if opcode == _CLOSE and length == 1:
                return self._failure(PROTOCOL_ERROR, "close frame with a one-byte payload")
        elif opcode == _TEXT and not self._in_message:
            return self._failure(UNSUPPORTED_DATA, "binary frames only")
        elif opcode == _TEXT:
            return self._failure(PROTOCOL_ERROR, "new message inside a fragmented one")
        else:
            return self._failure(PROTOCOL_ERROR, f"reserved opcode {opcode}")
        start = pos + 2
        if length == 126:
            if size - start < 6:
                return pos
            length = int.from_bytes(data[start : start + 2], "big")
            start += 2
            if length < 126:
                return self._failure(PROTOCOL_ERROR, "non-minimal frame length")
        elif length == 127:
            if size - start < 12:
                return pos
            length = int.from_bytes(data[start : start + 8], "big")
            start += 8
            if length >> 63:
                return self._failure(PROTOCOL_ERROR, "frame length with the top bit set")
            if length < 65536:
                return self._failure(PROTOCOL_ERROR, "non-minimal frame length")
        elif size - start < 4:
            return pos
        if opcode in _CONTROL:
            self._control_frame = data[pos : start + 4]
        else:
            self._in_message = not final
            self._offset = 0
            self._mask = data[start : start + 4]
        self._remaining = length
        return start + 4

    def _failure(self, code: int, why: str) -> int:
        """Note why the stream fails (L{feed} reports it, after the payload before it)."""
        self._why_failed = (code, why)
        return -1


def _join_into(pieces: list[bytes], small: list[bytes]) -> None:
    """Append the small payloads as one piece to C{pieces}, and forget them."""
    pieces.append(small[0] if len(small) == 1 else b"".join(small))
    small.clear()
