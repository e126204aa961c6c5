"""The reader of client frames: every payload byte in order, control frames whole, and every
forbidden frame failed with its code, whatever the split."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from vncmux.frames import ClientFrameReader, unmask


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


class Reader:
    """A L{ClientFrameReader} that records what it delivers, hands over and fails with."""

    def __init__(self) -> None:
        #: What each delivery handed on, kept as it came: the reader must not reuse it.
        self.deliveries: list[Sequence[bytes]] = []
        self.controls: list[bytes] = []
        self.failures: list[tuple[int, str]] = []
        self.reader = ClientFrameReader(self.deliveries.append, self.controls.append, self.fail)

    def fail(self, code: int, why: str) -> None:
        self.failures.append((code, why))

    def feed(self, pieces: list[bytes]) -> Reader:
        for piece in pieces:
            self.reader.feed(piece)
        return self

    @property
    def data(self) -> bytes:
        return b"".join(piece for pieces in self.deliveries for piece in pieces)


payloads = st.lists(st.binary(max_size=700) | st.binary(min_size=65530, max_size=65540), max_size=6)
masks = st.binary(min_size=4, max_size=4)


@given(payloads, masks, st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_binary_frames_any_split(
    chunks: list[bytes], mask: bytes, cuts: list[int], fragmented: bool
) -> None:
    """Binary frames, whole or as one fragmented message, split anywhere: every payload byte
    comes out unmasked and in order, and nothing fails."""
    if fragmented and chunks:
        frames = [
            masked_frame(c, mask, opcode=0 if i else 2, fin=i == len(chunks) - 1)
            for i, c in enumerate(chunks)
        ]
    else:
        frames = [masked_frame(c, mask) for c in chunks]
    reader = Reader().feed(split(b"".join(frames), cuts))
    assert reader.data == b"".join(chunks)
    assert reader.failures == []


@given(
    payloads,
    masks,
    st.lists(st.integers(min_value=0), max_size=12),
    st.sampled_from([8, 9, 10]),
    st.binary(max_size=125),
)
def test_control_frames_handed_over_whole(
    chunks: list[bytes], mask: bytes, cuts: list[int], opcode: int, control: bytes
) -> None:
    """A ping, pong or close between the fragments of a binary message is handed over as it
    came on the wire, whatever the split, and the message around it stays intact."""
    if opcode == 8 and len(control) == 1:
        control += b"x"
    frames = [
        masked_frame(c, mask, opcode=0 if i else 2, fin=i == len(chunks) - 1)
        for i, c in enumerate(chunks)
    ]
    other = masked_frame(control, mask, opcode=opcode)
    frames.insert(len(frames) // 2, other)
    reader = Reader().feed(split(b"".join(frames), cuts))
    assert reader.controls == [other]
    assert reader.data == b"".join(chunks)
    assert reader.failures == []


def _header_with(first: int, length_bytes: bytes) -> bytes:
    return bytes((first,)) + length_bytes + b"\x01\x02\x03\x04"


BAD_FRAMES = {
    "unmasked": (b"\x82\x03abc", 1002),
    "reserved bit": (bytes((0xC2,)) + masked_frame(b"abc", b"\x01\x02\x03\x04")[1:], 1002),
    "stray continuation": (masked_frame(b"abc", b"\x01\x02\x03\x04", opcode=0), 1002),
    "text": (masked_frame(b"abc", b"\x01\x02\x03\x04", opcode=1), 1003),
    "reserved data opcode": (masked_frame(b"abc", b"\x01\x02\x03\x04", opcode=3), 1002),
    "reserved control opcode": (masked_frame(b"", b"\x01\x02\x03\x04", opcode=11), 1002),
    "fragmented ping": (masked_frame(b"a", b"\x01\x02\x03\x04", opcode=9, fin=False), 1002),
    "long ping": (masked_frame(b"a" * 126, b"\x01\x02\x03\x04", opcode=9), 1002),
    "one-byte close": (masked_frame(b"\x03", b"\x01\x02\x03\x04", opcode=8), 1002),
    "16-bit length below 126": (_header_with(0x82, b"\xfe\x00\x10"), 1002),
    "64-bit length below 65536": (_header_with(0x82, b"\xff" + (100).to_bytes(8, "big")), 1002),
    "64-bit length, top bit set": (_header_with(0x82, b"\xff" + b"\x80" + bytes(7)), 1002),
}


@given(st.sampled_from(sorted(BAD_FRAMES)), st.lists(st.integers(min_value=0), max_size=6))
def test_forbidden_frames_fail_once(name: str, cuts: list[int]) -> None:
    """Each frame RFC 6455 forbids (or vncmux does not relay) fails the stream once with its
    code; what came before it is delivered, nothing after it is read."""
    bad, code = BAD_FRAMES[name]
    good = masked_frame(b"before", b"\x05\x06\x07\x08")
    after = masked_frame(b"after", b"\x05\x06\x07\x08")
    reader = Reader().feed(split(good + bad + after + after, cuts))
    assert reader.data == b"before"
    assert [c for c, _ in reader.failures] == [code]


def test_new_message_inside_a_fragmented_one() -> None:
    """A binary or text frame while a fragmented message is open is a protocol error."""
    mask = b"\x01\x02\x03\x04"
    for opcode in (1, 2):
        start = masked_frame(b"one", mask, fin=False)
        reader = Reader().feed([start + masked_frame(b"two", mask, opcode=opcode)])
        assert reader.data == b"one"
        assert [c for c, _ in reader.failures] == [1002]


@given(st.binary(max_size=2000), masks, st.integers(min_value=0, max_value=7))
def test_unmask_matches_reference(payload: bytes, mask: bytes, offset: int) -> None:
    """Both unmasking paths (Python integers, C) equal the byte-by-byte definition."""
    expected = bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(payload))
    assert unmask(payload, mask, offset) == expected


class OrderedReader(Reader):
    """A L{Reader} that also records the order of deliveries, control frames and failures."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, bytes]] = []
        self.reader = ClientFrameReader(self.on_data, self.on_control, self.fail)

    def on_data(self, pieces: Sequence[bytes]) -> None:
        self.deliveries.append(pieces)
        self.events.append(("data", b"".join(pieces)))

    def on_control(self, frame: bytes) -> None:
        self.controls.append(frame)
        self.events.append(("control", frame))

    def fail(self, code: int, why: str) -> None:
        super().fail(code, why)
        self.events.append(("fail", str(code).encode()))


def test_frames_of_one_read_delivered_at_once() -> None:
    """Several data frames that arrive in one read (a burst of pointer events) go on as one
    piece, i.e. one write to the VNC server, not one per frame."""
    frames = [masked_frame(bytes([5, i, 0, 1, 0, 2]), bytes([i, 2, 3, 4])) for i in range(10)]
    reader = Reader().feed([b"".join(frames)])
    assert reader.deliveries == [[b"".join(bytes([5, i, 0, 1, 0, 2]) for i in range(10))]]


def test_bulk_pieces_not_joined_to_the_rest() -> None:
    """A read with bulk frames (1 KiB and more) between small ones is one delivery (one
    send): each bulk payload a piece by itself, never joined (a copy), the small ones around
    them joined, in order. The next read is a delivery of its own."""
    mask = b"\x0a\x0b\x0c\x0d"
    bulk = bytes(range(256)) * 8
    wire = b"".join(masked_frame(p, mask) for p in (b"k1", b"k2", bulk, bulk, b"k3", b"k4"))
    reader = Reader().feed([wire, masked_frame(b"k5", mask)])
    assert reader.deliveries == [[b"k1k2", bulk, bulk, b"k3k4"], [b"k5"]]


def test_payload_before_a_control_frame_goes_first() -> None:
    """Payload read before a control frame is delivered before the control frame is handed
    over (a close must not overtake the bytes sent before it), and what follows comes after."""
    mask = b"\x09\x08\x07\x06"
    close = masked_frame(b"\x03\xe8", mask, opcode=8)
    reader = OrderedReader().feed(
        [
            masked_frame(b"one", mask)
            + masked_frame(b"two", mask)
            + close
            + masked_frame(b"three", mask)
        ]
    )
    assert reader.events == [
        ("data", b"onetwo"),
        ("control", close),
        ("data", b"three"),
    ]


def test_payload_before_a_bad_frame_goes_first() -> None:
    """Payload of the same read before a forbidden frame reaches the session before the
    failure (which ends the session and stops deliveries)."""
    mask = b"\x01\x01\x02\x02"
    reader = OrderedReader().feed(
        [
            masked_frame(b"kept", mask)
            + masked_frame(b"text", mask, opcode=1)
            + masked_frame(b"dropped", mask)
        ]
    )
    assert reader.events == [("data", b"kept"), ("fail", b"1003")]


def test_mask_offsets_across_reads_on_both_unmasking_paths() -> None:
    """A frame split at every offset: the mask continues where the last read stopped, on the
    Python-integer path (small pieces) and the C path (pieces of 1 KiB and more)."""
    payload = bytes(range(256)) * 12  # 3,072 bytes: pieces on both sides of _SMALL
    mask = b"\xa1\xb2\xc3\xd4"
    wire = masked_frame(payload, mask)
    header = len(wire) - len(payload)
    for first in (*range(header, header + 9), header + 1023, header + 1024, header + 1025):
        for second in (first + 1, first + 3, first + 1024, first + 2047):
            reader = Reader().feed([wire[:first], wire[first:second], wire[second:]])
            assert reader.data == payload, (first, second)
            assert reader.failures == []


def test_length_encodings_at_their_boundaries() -> None:
    """Payloads of 125, 126, 65535 and 65536 bytes (the edges of the 7-bit, 16-bit and 64-bit
    length forms) are read whole, alone and back to back, whole or a byte at a time around
    the header."""
    mask = b"\x11\x22\x33\x44"
    payloads = [bytes([n % 251]) * n for n in (0, 125, 126, 65535, 65536)]
    wire = b"".join(masked_frame(p, mask) for p in payloads)
    assert Reader().feed([wire]).data == b"".join(payloads)
    for p in payloads:
        frame = masked_frame(p, mask)
        pieces = [frame[i : i + 1] for i in range(16)] + [frame[16:]]
        reader = Reader().feed(pieces)
        assert reader.data == p
        assert reader.failures == []
