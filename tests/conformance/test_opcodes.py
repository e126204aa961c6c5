"""
Autobahn|Testsuite 4.x: the reserved non-control opcodes 3-7 and control opcodes 11-15 fail the
connection with 1002; frames after them are not processed.

Autobahn sends a text message before the reserved opcode in 4.1.3-4.1.5 and 4.2.3-4.2.5; the
ported cases send a binary message, which must reach the VNC server. 4.1.5 and 4.2.5 chop
their frames into single bytes, as every case here does in its byte-per-write variant.
"""

from __future__ import annotations

from tests.conformance.harness import ConformanceCase, per_write_mode
from tests.conformance.wsframes import PING, frame

PROTOCOL_ERROR = 1002
HELLO = b"Hello, world!"


class OpcodeCases(ConformanceCase):
    """Autobahn 4.x: reserved opcodes."""

    def reserved_alone(self, opcode: int, payload: bytes = b"") -> None:
        self.open()
        self.send(frame(payload, opcode))
        self.assertFailed(PROTOCOL_ERROR, b"")

    def reserved_after_message(self, opcode: int, payload: bytes = b"") -> None:
        self.open()
        self.send(frame(HELLO), frame(payload, opcode), frame(b"", PING))
        self.assertFailed(PROTOCOL_ERROR, HELLO)
        assert self.h.pongs() == [], f"pong after the failure: {self.h.pongs()}"

    def test_case_4_1_1(self) -> None:
        """Opcode 3 without payload fails with 1002."""
        self.reserved_alone(3)

    def test_case_4_1_2(self) -> None:
        """Opcode 4 with payload fails with 1002; the payload is not relayed."""
        self.reserved_alone(4, b"reserved opcode payload")

    def test_case_4_1_3(self) -> None:
        """A binary message, opcode 5, a ping: the message is relayed, 1002, no pong."""
        self.reserved_after_message(5)

    def test_case_4_1_4(self) -> None:
        """A binary message, opcode 6 with payload, a ping: 1002 after the message."""
        self.reserved_after_message(6, HELLO)

    def test_case_4_1_5(self) -> None:
        """A binary message, opcode 7 with payload, a ping: 1002 after the message."""
        self.reserved_after_message(7, HELLO)

    def test_case_4_2_1(self) -> None:
        """Opcode 11 without payload fails with 1002."""
        self.reserved_alone(11)

    def test_case_4_2_2(self) -> None:
        """Opcode 12 with payload fails with 1002."""
        self.reserved_alone(12, b"reserved opcode payload")

    def test_case_4_2_3(self) -> None:
        """A binary message, opcode 13, a ping: 1002 after the message."""
        self.reserved_after_message(13)

    def test_case_4_2_4(self) -> None:
        """A binary message, opcode 14 with payload, a ping: 1002 after the message."""
        self.reserved_after_message(14, HELLO)

    def test_case_4_2_5(self) -> None:
        """A binary message, opcode 15 with payload, a ping: 1002 after the message."""
        self.reserved_after_message(15, HELLO)

    def test_reserved_opcode_inside_fragmented_message(self) -> None:
        """Opcode 3 between two fragments of a binary message: the first fragment was
        relayed, then 1002."""
        self.open()
        self.send(frame(b"first", fin=False), frame(b"x", 3), frame(b"last", 0))
        self.assertFailed(PROTOCOL_ERROR, b"first")


globals().update(per_write_mode(OpcodeCases))
