"""The client's WebSocket stream on the relay's fast path.

Once a session relays, nearly every frame from the browser is a masked binary data frame.
L{BinaryFrameReader} unmasks those and hands their payload over as it arrives, without
autobahn's per-read bookkeeping; at the first frame it does not handle (ping, pong, close,
text, anything odd) it stops and returns the rest, for autobahn to take from there.
"""

from __future__ import annotations

from collections.abc import Callable

from autobahn.websocket.xormasker import create_xor_masker

#: Below this many bytes, unmasking with Python integers beats a call into C.
_SMALL = 512


def unmask(payload: bytes, mask: bytes, offset: int) -> bytes:
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


class BinaryFrameReader:
    """
    Splits the client stream into unmasked payload chunks of binary data frames.

    A frame may arrive in any number of pieces; its payload is delivered piece by piece, as
    it comes, never assembled. Continuation frames are taken only inside a binary message
    this reader started.
    """

    __slots__ = ("_deliver", "_head", "_mask", "_offset", "_remaining", "_in_message")

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver
        self._head = b""  # an incomplete frame header
        self._mask = b""
        self._offset = 0  # payload bytes of the current frame already delivered
        self._remaining = 0  # payload bytes of the current frame still to come
        self._in_message = False  # inside a fragmented binary message

    @property
    def in_message(self) -> bool:
        """Inside a fragmented binary message: what autobahn must know when it takes over."""
        return self._in_message

    @in_message.setter
    def in_message(self, value: bool) -> None:
        self._in_message = value

    def feed(self, data: bytes) -> bytes:
        """
        Deliver the payload in C{data}; return the unread rest, which starts with the header
        of a frame this reader does not handle (empty when all was consumed).
        """
        if self._head:
            data = self._head + data
            self._head = b""
        size = len(data)
        pos = 0
        while pos < size:
            remaining = self._remaining
            if remaining:
                end = min(size, pos + remaining)
                chunk = data[pos:end] if pos or end < size else data
                self._deliver(unmask(chunk, self._mask, self._offset))
                taken = end - pos
                self._offset += taken
                self._remaining = remaining - taken
                pos = end
                continue
            header_end = self._parse_header(data, pos, size)
            if header_end < 0:
                return data[pos:]
            if header_end == pos:  # incomplete header, kept for the next call
                self._head = data[pos:]
                return b""
            pos = header_end
        return b""

    def _parse_header(self, data: bytes, pos: int, size: int) -> int:
        """
        The position after a data-frame header at C{pos}; C{pos} itself when the header is
        incomplete; -1 when the frame is not one this reader handles.
        """
        if size - pos < 2:
            return pos
        b0, b1 = data[pos], data[pos + 1]
        opcode = b0 & 0x0F
        if b0 & 0x70 or not b1 & 0x80:  # reserved bits, or an unmasked client frame
            return -1
        if opcode == 2 and not self._in_message:
            pass
        elif not (opcode == 0 and self._in_message):
            return -1
        length = b1 & 0x7F
        start = pos + 2
        if length == 126:
            if size - start < 6:
                return pos
            length = int.from_bytes(data[start : start + 2], "big")
            start += 2
        elif length == 127:
            if size - start < 12:
                return pos
            length = int.from_bytes(data[start : start + 8], "big")
            start += 8
        elif size - start < 4:
            return pos
        self._mask = data[start : start + 4]
        self._offset = 0
        self._remaining = length
        self._in_message = not b0 & 0x80
        return start + 4
