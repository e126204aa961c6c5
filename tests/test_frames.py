"""The fast-path reader of client frames: every payload byte, in order, whatever the split."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from vncmux.frames import BinaryFrameReader, unmask


def masked_frame(payload: bytes, mask: bytes, opcode: int = 2, fin: bool = True) -> bytes:
    """A client frame as a browser sends it."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65536:
        header = struct.pack("!BBH", first, 0xFE, size)
    else:
        header = struct.pack("!BBQ", first, 0xFF, size)
    key = (mask * (size // 4 + 1))[:size]
    return header + mask + bytes(a ^ b for a, b in zip(payload, key, strict=True))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


def read_all(pieces: list[bytes]) -> tuple[bytes, bytes]:
    """Feed every piece; return what was delivered and what was handed back."""
    delivered: list[bytes] = []
    reader = BinaryFrameReader(delivered.append)
    rest = b""
    for piece in pieces:
        if rest:
            rest += piece
            continue
        rest = reader.feed(piece)
    return b"".join(delivered), rest


payloads = st.lists(st.binary(max_size=700) | st.binary(min_size=65530, max_size=65540), max_size=6)
masks = st.binary(min_size=4, max_size=4)


@given(payloads, masks, st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_binary_frames_any_split(
    chunks: list[bytes], mask: bytes, cuts: list[int], fragmented: bool
) -> None:
    """Binary frames, whole or as one fragmented message, split anywhere: every payload byte
    comes out unmasked and in order, and nothing is handed back."""
    if fragmented and chunks:
        frames = [
            masked_frame(c, mask, opcode=0 if i else 2, fin=i == len(chunks) - 1)
            for i, c in enumerate(chunks)
        ]
    else:
        frames = [masked_frame(c, mask) for c in chunks]
    stream = b"".join(frames)
    delivered, rest = read_all(split(stream, cuts))
    assert delivered == b"".join(chunks)
    assert rest == b""


@given(
    payloads, masks, st.lists(st.integers(min_value=0), max_size=12), st.sampled_from([9, 10, 8, 1])
)
def test_stops_at_other_frames(
    before: list[bytes], mask: bytes, cuts: list[int], opcode: int
) -> None:
    """At a ping, pong, close or text frame the reader stops and hands back exactly the
    bytes from that frame's header on."""
    other = masked_frame(b"xy", mask, opcode=opcode)
    after = masked_frame(b"after", mask)
    stream = b"".join(masked_frame(c, mask) for c in before) + other + after
    delivered, rest = read_all(split(stream, cuts))
    assert delivered == b"".join(before)
    assert rest == other + after


def test_unmasked_or_reserved_bits_handed_back() -> None:
    """Frames a browser may not send are left to autobahn, which fails the connection."""
    unmasked = b"\x82\x03abc"
    assert read_all([unmasked]) == (b"", unmasked)
    rsv = bytearray(masked_frame(b"abc", b"\x01\x02\x03\x04"))
    rsv[0] |= 0x40
    assert read_all([bytes(rsv)]) == (b"", bytes(rsv))


def test_continuation_outside_message_handed_back() -> None:
    """A continuation frame that does not follow a binary fragment is not taken."""
    frame = masked_frame(b"abc", b"\x01\x02\x03\x04", opcode=0)
    assert read_all([frame]) == (b"", frame)


@given(st.binary(max_size=2000), masks, st.integers(min_value=0, max_value=7))
def test_unmask_matches_reference(payload: bytes, mask: bytes, offset: int) -> None:
    """Both unmasking paths (Python integers, C) equal the byte-by-byte definition."""
    expected = bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(payload))
    assert unmask(payload, mask, offset) == expected
