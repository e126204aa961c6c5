"""
Autobahn|Testsuite 9.x: large messages, one frame or many, read whole or in small pieces.

Message sizes are a quarter of Autobahn's (its 16 MiB becomes 4 MiB, its fragmented 4 MiB
messages 1 MiB, fragment and read sizes unchanged) so the module runs in seconds;
in the byte-per-write variant every message is cut to 16 KiB, since a read per byte of several
MiB would take minutes (1.2.6-1.2.8 read 64 KiB byte by byte). Text messages (9.1, 9.3, 9.5)
fail with 1003 at their first frame. Binary messages (9.2, 9.4, 9.6) reach the VNC server
whole, and 9.2's come back from it to the browser intact. 9.5 and 9.6 prescribe their own
reads (Autobahn's chopsize), so they run once, not once per write mode. 9.7/9.8 measure round
trip times and 9.9 streams a never-ending text message; neither has a pass/fail meaning for a
relay.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.conformance.harness import ConformanceCase, per_write_mode
from tests.conformance.wsframes import (
    BYTE_PER_WRITE,
    ONE_WRITE,
    TEXT,
    chop,
    fragments,
    frame,
)

KiB = 1024
MiB = 1024 * KiB
UNSUPPORTED_DATA = 1003
#: Autobahn's sizes divided by this.
SCALE = 4
#: The largest message a byte-per-write case sends.
BYTEWISE_LIMIT = 16 * KiB
#: 9.1.x / 9.2.x message sizes (Autobahn's).
SINGLE_FRAME_SIZES = (64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 8 * MiB, 16 * MiB)
#: 9.3.x / 9.4.x: a 4 MiB message in fragments of these sizes (Autobahn's).
FRAGMENT_SIZES = (64, 256, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)
FRAGMENTED_SIZE = 4 * MiB
#: 9.5.x / 9.6.x: a 1 MiB message read in pieces of these sizes.
CHOP_SIZES = (64, 128, 256, 512, 1024, 2048)
CHOPPED_SIZE = 1 * MiB


def pattern(seed: bytes, size: int) -> bytes:
    """C{size} bytes repeating C{seed} (Autobahn's payload_len)."""
    return (seed * (size // len(seed) + 1))[:size]


class LargeMessageCases(ConformanceCase):
    """Autobahn 9.1-9.4: large messages in one frame or many."""

    def size(self, autobahn_size: int) -> int:
        size = autobahn_size // SCALE
        return min(size, BYTEWISE_LIMIT) if self.mode == BYTE_PER_WRITE else size

    def text_fails(self, frames: list[bytes]) -> None:
        self.open()
        self.send(*frames)
        self.assertFailed(UNSUPPORTED_DATA, b"")

    def binary_relayed(self, payload: bytes, frames: list[bytes], echo: bool) -> None:
        self.open()
        self.send(*frames)
        self.assertRelaying(payload)
        if echo:
            self.assertEchoed(payload)
        self.closeCleanly()

    def single_text(self, index: int) -> None:
        self.text_fails([frame(pattern(b"BAsd7&jh23", self.size(SINGLE_FRAME_SIZES[index])), TEXT)])

    def single_binary(self, index: int) -> None:
        payload = pattern(b"\x00\xfe\x23\xfa\xf0", self.size(SINGLE_FRAME_SIZES[index]))
        self.binary_relayed(payload, [frame(payload)], echo=True)

    def fragmented_text(self, index: int) -> None:
        payload = b"*" * self.size(FRAGMENTED_SIZE)
        self.text_fails(fragments(payload, FRAGMENT_SIZES[index], TEXT))

    def fragmented_binary(self, index: int) -> None:
        payload = pattern(b"\xfe\x01\x7f", self.size(FRAGMENTED_SIZE))
        self.binary_relayed(payload, fragments(payload, FRAGMENT_SIZES[index]), echo=False)


class ChoppedMessageTests(ConformanceCase, SynchronousTestCase):
    """Autobahn 9.5/9.6: one large frame read in small pieces of a fixed size."""

    mode = ONE_WRITE

    def chopped(self, seed: bytes, opcode: int, chop_size: int) -> None:
        self.open()
        payload = pattern(seed, CHOPPED_SIZE // SCALE)
        self.h.send(chop(frame(payload, opcode), chop_size))
        if opcode == TEXT:
            self.assertFailed(UNSUPPORTED_DATA, b"")
        else:
            self.assertRelaying(payload)
            self.closeCleanly()


def _case(group: str, number: int, method: str, doc: str) -> object:
    def test(self: LargeMessageCases) -> None:
        getattr(self, method)(number - 1)

    test.__name__ = f"test_case_9_{group}_{number}"
    test.__doc__ = doc
    return test


def _chopped_case(group: str, number: int, seed: bytes, opcode: int) -> object:
    chop_size = CHOP_SIZES[number - 1]

    def test(self: ChoppedMessageTests) -> None:
        self.chopped(seed, opcode, chop_size)

    test.__name__ = f"test_case_9_{group}_{number}"
    kind = "text message fails with 1003" if opcode == TEXT else "binary message is relayed"
    test.__doc__ = f"A large {kind} when read {chop_size} bytes at a time."
    return test


for _n, _size in enumerate(SINGLE_FRAME_SIZES, 1):
    _what = f"{_size // SCALE // KiB} KiB (Autobahn: {_size // KiB} KiB) in one frame"
    setattr(
        LargeMessageCases,
        f"test_case_9_1_{_n}",
        _case("1", _n, "single_text", f"A text message of {_what} fails with 1003."),
    )
    setattr(
        LargeMessageCases,
        f"test_case_9_2_{_n}",
        _case("2", _n, "single_binary", f"A binary message of {_what} is relayed both ways."),
    )
for _n, _size in enumerate(FRAGMENT_SIZES, 1):
    _what = f"in fragments of {_size} bytes"
    setattr(
        LargeMessageCases,
        f"test_case_9_3_{_n}",
        _case("3", _n, "fragmented_text", f"A large text message {_what} fails with 1003."),
    )
    setattr(
        LargeMessageCases,
        f"test_case_9_4_{_n}",
        _case("4", _n, "fragmented_binary", f"A large binary message {_what} is relayed."),
    )
for _n in range(1, len(CHOP_SIZES) + 1):
    setattr(ChoppedMessageTests, f"test_case_9_5_{_n}", _chopped_case("5", _n, b"BAsd7&jh23", TEXT))
    setattr(
        ChoppedMessageTests,
        f"test_case_9_6_{_n}",
        _chopped_case("6", _n, b"\x00\xfe\x23\xfa\xf0", 2),
    )

globals().update(per_write_mode(LargeMessageCases))
