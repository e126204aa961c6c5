"""
A test-side WebSocket frame codec (RFC 6455 section 5), independent of autobahn and of vncmux.

It builds client frames with any header, including the malformed ones a conforming client never
sends (RSV bits, reserved opcodes, unmasked frames, non-minimal or overflowing lengths), and
parses the server's frames back, refusing anything a server must not send.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

#: A fixed mask: the tests stay byte-for-byte reproducible.
MASK = b"\x37\xfa\x21\x3d"

#: Length encodings: the 7-bit field alone, or its escape values 126 (16 bits) and 127 (64 bits).
SHORT, MEDIUM, LONG = 0, 126, 127


def _minimal_form(length: int) -> int:
    if length < 126:
        return SHORT
    return MEDIUM if length < 65536 else LONG


def masked(payload: bytes, mask: bytes) -> bytes:
    """XOR C{payload} with the 4-byte C{mask} (its own inverse)."""
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
        len(payload), "big"
    )


def frame(
    payload: bytes = b"",
    opcode: int = BINARY,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length_form: int | None = None,
    declared_length: int | None = None,
) -> bytes:
    """
    One client frame.

    @param rsv: the three RSV bits as a number 0..7 (RSV1 is 4, as Autobahn counts them).
    @param mask: the masking key, or None for an (illegal) unmasked client frame.
    @param length_form: L{SHORT}, L{MEDIUM} or L{LONG}; the minimal encoding if None.
    @param declared_length: the length written in the header, if it must differ from the
        payload's (e.g. 2**63 + n, whose top bit RFC 6455 forbids).
    """
    length = len(payload) if declared_length is None else declared_length
    form = _minimal_form(length) if length_form is None else length_form
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0xF])
    mask_bit = 0x80 if mask is not None else 0
    if form == SHORT:
        assert length < 126, "a 7-bit length field holds at most 125"
        head += bytes([mask_bit | length])
    elif form == MEDIUM:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if mask is None:
        return head + payload
    return head + mask + masked(payload, mask)


def close_payload(code: int | None = None, reason: bytes = b"") -> bytes:
    """The body of a close frame: nothing, or a 2-byte code and a reason."""
    if code is None:
        return reason
    return struct.pack("!H", code) + reason


def fragments(payload: bytes, size: int, opcode: int = BINARY) -> list[bytes]:
    """One message as frames of at most C{size} payload bytes (Autobahn's fragmentSize)."""
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return [
        frame(piece, opcode if i == 0 else CONTINUATION, fin=i == len(pieces) - 1)
        for i, piece in enumerate(pieces)
    ]


def chop(data: bytes, size: int) -> list[bytes]:
    """C{data} cut into writes of C{size} bytes (Autobahn's chopsize)."""
    return [data[i : i + size] for i in range(0, len(data), size)]


# Write modes: how a sequence of frames is cut into reads on the server side.
ONE_WRITE = "one_write"
WRITE_PER_FRAME = "write_per_frame"
BYTE_PER_WRITE = "byte_per_write"
WRITE_MODES = (ONE_WRITE, WRITE_PER_FRAME, BYTE_PER_WRITE)


def writes(frames: Sequence[bytes], mode: str) -> list[bytes]:
    """The reads the server sees when C{frames} are written in C{mode}."""
    if mode == ONE_WRITE:
        return [b"".join(frames)]
    if mode == WRITE_PER_FRAME:
        return list(frames)
    if mode == BYTE_PER_WRITE:
        data = b"".join(frames)
        return [data[i : i + 1] for i in range(len(data))]
    raise ValueError(f"unknown write mode {mode!r}")


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """C{data} cut at the given offsets (clamped, sorted, duplicates ignored)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@dataclass(frozen=True)
class Frame:
    """One frame as the server sent it."""

    fin: bool
    rsv: int
    opcode: int
    payload: bytes

    @property
    def is_data(self) -> bool:
        """Text, binary or continuation: part of a message."""
        return self.opcode in (CONTINUATION, TEXT, BINARY)

    @property
    def close_code(self) -> int | None:
        """The status code of a close frame (None if it carries none)."""
        assert self.opcode == CLOSE, f"not a close frame: {self}"
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> bytes:
        """The reason of a close frame, undecoded."""
        assert self.opcode == CLOSE, f"not a close frame: {self}"
        return self.payload[2:]


def parse_server_frames(data: bytes) -> list[Frame]:
    """
    Every frame in C{data}, which must hold whole, well-formed server frames only: unmasked,
    minimal lengths, no RSV bit, no reserved opcode, control frames final and short.
    """
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 2, f"truncated frame header at {pos}: {data[pos:]!r}"
        b0, b1 = data[pos], data[pos + 1]
        assert not b1 & 0x80, "the server masked a frame"
        length, pos = b1 & 0x7F, pos + 2
        if length == 126:
            (length,) = struct.unpack("!H", data[pos : pos + 2])
            assert length >= 126, "non-minimal 16-bit length from the server"
            pos += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[pos : pos + 8])
            assert 65536 <= length < 2**63, "bad 64-bit length from the server"
            pos += 8
        assert len(data) - pos >= length, "truncated frame payload"
        parsed = Frame(bool(b0 & 0x80), b0 >> 4 & 7, b0 & 0xF, data[pos : pos + length])
        pos += length
        assert parsed.rsv == 0, f"the server set RSV bits: {parsed}"
        assert parsed.opcode in (CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG), parsed
        if parsed.opcode >= CLOSE:
            assert parsed.fin and length <= 125, f"bad control frame from the server: {parsed}"
        frames.append(parsed)
    return frames


def messages(frames: Iterable[Frame]) -> list[tuple[int, bytes]]:
    """The server's data frames reassembled into (opcode, payload) messages."""
    done: list[tuple[int, bytes]] = []
    current: tuple[int, bytes] | None = None
    for f in frames:
        if not f.is_data:
            continue
        if f.opcode == CONTINUATION:
            assert current is not None, "continuation from the server outside a message"
            current = (current[0], current[1] + f.payload)
        else:
            assert current is None, "the server began a message inside another one"
            current = (f.opcode, f.payload)
        if f.fin:
            done.append(current)
            current = None
    return done
