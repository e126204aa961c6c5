"""
Console types: each listener admits only tokens of its own ``console_type``, and a serial
console (nova-serialproxy's ``serial``) is raw bytes both ways, with refusals by close code
only and idle time from the client's bytes. Whole connections in memory
(L{tests.conformance.harness}); the real shell behind a TCP port is in
tests/integration/test_serial.py.
"""

from __future__ import annotations

import os

from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.conformance.harness import (
    CLIENT_ADDRESS,
    GOOD_TOKEN,
    Harness,
    TcpLikeTransport,
    upgrade_request,
)
from tests.conformance.wsframes import (
    BINARY,
    CLOSE,
    TEXT,
    close_payload,
    frame,
    parse_server_frames,
)
from tests.test_admission import attempt, harness
from vncmux.consoles import NOVNC, SERIAL
from vncmux.settings import Limits, Settings

RFB_VERSION = b"RFB 003.008\n"
SERIAL_TOKEN = "serial-token"


class ConsoleKindTests(SynchronousTestCase):
    """What each console type answers to the lifecycle's questions."""

    def test_serial_activity_is_any_client_byte(self) -> None:
        """On a serial console every client byte is input (RFB parsing would fall back on
        the first byte anyway); ``--idle-activity any`` counts both directions instead."""
        scanner = SERIAL.activity_scanner("input")
        assert scanner is not None
        self.assertEqual([scanner.feed(b"l"), scanner.feed(b"")], [True, False])
        self.assertIsNone(SERIAL.activity_scanner("any"))

    def test_novnc_activity_is_rfb_input(self) -> None:
        """On noVNC a framebuffer update request is no activity, a key event is."""
        scanner = NOVNC.activity_scanner("input")
        assert scanner is not None
        self.assertFalse(scanner.feed(RFB_VERSION + b"\x01\x01"))  # version, None, ClientInit
        self.assertFalse(scanner.feed(b"\x03\x01" + bytes(8)))
        self.assertTrue(scanner.feed(b"\x04\x01\x00\x00\x00\x00\x00\x61"))

    def test_refusals(self) -> None:
        """noVNC refuses inside RFB (a greeting, then the reason); serial has no in-band way."""
        refusal = NOVNC.refusal("invalid token")
        assert refusal is not None
        self.assertEqual(refusal.greeting(), RFB_VERSION)
        self.assertEqual(refusal.receive(RFB_VERSION), b"\x00\x00\x00\x00\x0dinvalid token")
        self.assertIsNone(SERIAL.refusal("invalid token"))


class SerialConsoleTests(SynchronousTestCase):
    """The serial listener, one browser connection at a time."""

    def harness(self, **limits: float) -> Harness:
        settings = Settings(
            listen="tcp:0",
            serial_listen="tcp:0",
            metrics=None,
            limits=Limits(ping_interval=0, **limits),  # type: ignore[arg-type]
        )
        h = Harness.for_test(self, settings=settings, console_type="serial")
        h.memory_store.add(GOOD_TOKEN, "127.0.0.1", 5900, console_type="serial")
        h.memory_store.add("vnc-token", "127.0.0.1", 5901)
        return h

    def open(self, h: Harness) -> None:
        """Connect and upgrade; the serial port accepts and says nothing."""
        h.connect()
        h.send([upgrade_request(GOOD_TOKEN)])
        self.assertEqual(h.dialled(), [("127.0.0.1", 5900)])
        self.assertFalse(h.upgraded(), "upgraded before the console answered")
        h.answer_dial(greeting=b"")

    def test_raw_bytes_both_ways(self) -> None:
        """A serial port that sends nothing first is admitted as soon as it is connected;
        the client's binary payload reaches it unchanged, and its output comes back as
        binary frames: no RFB anywhere."""
        h = self.harness()
        self.open(h)
        self.assertTrue(h.upgraded())
        self.assertEqual(h.frames(), [])
        self.assertEqual(h.backend.transport.producerState, "producing")
        h.send([frame(b"uname -a\r"), frame(b"\x03")])
        self.assertEqual(h.backend.received, b"uname -a\r\x03")
        h.backend.protocol.dataReceived(b"Linux guest 6.1\r\n$ ")
        self.assertEqual(
            [(f.opcode, f.payload) for f in h.frames()], [(BINARY, b"Linux guest 6.1\r\n$ ")]
        )
        h.send([frame(close_payload(1000), CLOSE)])
        self.assertEqual(h.close_frames()[0].close_code, 1000)
        self.assertTrue(h.backend.closing)

    def test_unknown_token_closes_with_its_code(self) -> None:
        """An unknown token gets the 101, then only a close frame with 4401 and the reason:
        no RFB greeting (a serial client would print it), nothing dialled, and the
        connection closes once the client answers."""
        h = self.harness()
        h.connect()
        h.send([upgrade_request("never-issued")])
        frames = h.frames()
        self.assertEqual([f.opcode for f in frames], [CLOSE])
        self.assertEqual((frames[0].close_code, frames[0].payload[2:]), (4401, b"invalid token"))
        self.assertEqual(h.dialled(), [])
        h.send([frame(close_payload(4401), CLOSE)])
        h.deliver_losses()
        self.assertTrue(h.client_lost)
        self.assertEqual(h.console.supervisor.pending.total, 0)

    def test_store_down_closes_with_4503(self) -> None:
        """A refusal other than the token's (the store is down) has its own code too."""
        h = self.harness()
        h.memory_store.available = False
        h.connect()
        h.send([upgrade_request(GOOD_TOKEN)])
        self.assertEqual([f.close_code for f in h.frames()], [4503])

    def test_other_console_type_refused_as_invalid(self) -> None:
        """A noVNC token on the serial listener is refused as an invalid token (the user is
        not told it exists), nothing is dialled, and the operator's log says which type it
        was."""
        h = self.harness()
        h.connect()
        h.send([upgrade_request("vnc-token")])
        self.assertEqual([f.close_code for f in h.frames()], [4401])
        self.assertEqual(h.dialled(), [])
        logged = [formatEvent(e) for e in h.log.events]
        self.assertTrue(
            any("console type 'novnc' on the 'serial' listener" in line for line in logged),
            logged,
        )
        self.assertFalse(any("vnc-token" in line for line in logged))

    def test_idle_from_client_bytes(self) -> None:
        """A console that prints all the time (a log scrolling) does not keep an idle
        session open; a keystroke does."""
        h = self.harness(idle_timeout=60)
        h.console.supervisor.startService()
        self.addCleanup(h.console.supervisor.stopService)
        self.open(h)
        for _ in range(5):
            h.advance(10)
            h.backend.protocol.dataReceived(b"[ 12.34] kernel: scrolling\r\n")
        h.send([frame(b"\r")])  # a keystroke at 50 s
        h.advance(55)
        self.assertEqual(h.close_frames(), [])
        h.advance(10)
        self.assertEqual(
            [(f.close_code, f.payload[2:]) for f in h.close_frames()], [(4000, b"idle timeout")]
        )

    def test_no_web_pages(self) -> None:
        """The serial listener serves no ``--web`` pages (nova-serialproxy serves none); the
        noVNC listener of the same proxy does."""
        web = self.mktemp()
        os.makedirs(web)
        with open(os.path.join(web, "vnc.html"), "w") as f:
            f.write("<html></html>")
        settings = Settings(listen="tcp:0", serial_listen="tcp:0", metrics=None, web=web)
        # HEAD: twisted.web streams a GET's body through the global reactor's cooperator.
        request = b"HEAD /vnc.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        statuses = []
        for console_type in ("serial", "novnc"):
            h = Harness.for_test(self, settings=settings, console_type=console_type)
            h.connect()
            h.send([request])
            statuses.append(h.output.split(b"\r\n", 1)[0])
        self.assertEqual(statuses, [b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK"])

    def test_text_frame_refused(self) -> None:
        """A text frame fails the session with 1003, as nova-serialproxy (websockify) does;
        its clients (Horizon's serial console, websockify's) send binary frames."""
        h = self.harness()
        self.open(h)
        h.send([frame(b"ls\r", TEXT)])
        self.assertEqual([f.close_code for f in h.close_frames()], [1003])
        self.assertEqual(h.backend.received, b"")


class NovncListenerTests(SynchronousTestCase):
    """The noVNC listener keeps its RFB behaviour and admits only noVNC tokens."""

    def test_serial_token_refused_in_rfb(self) -> None:
        """A serial token on the noVNC listener gets noVNC's refusal (RFB greeting, then
        the reason) with 4401; nothing is dialled."""
        h = Harness.for_test(self)
        h.memory_store.add(SERIAL_TOKEN, "127.0.0.1", 5900, console_type="serial")
        h.open_refused(SERIAL_TOKEN)
        h.send([frame(RFB_VERSION)])
        data = b"".join(f.payload for f in h.frames() if f.opcode == BINARY)
        self.assertEqual(data, RFB_VERSION + b"\x00\x00\x00\x00\x0dinvalid token")
        self.assertEqual(h.close_frames()[0].close_code, 4401)
        self.assertEqual(h.dialled(), [])

    def test_other_type_is_no_failed_attempt(self) -> None:
        """A token of another console type is a real token, not a guess: three of them do
        not block a client that may fail only once (``--max-failed-tokens 1``)."""
        h = harness(self, max_failed_tokens=1)
        h.memory_store.add(SERIAL_TOKEN, "127.0.0.1", 5900, console_type="serial")
        codes = [attempt(h, SERIAL_TOKEN)[0] for _ in range(3)]
        self.assertEqual(codes, [4401] * 3)
        self.assertEqual(h.dialled(), [])
        attempt(h, GOOD_TOKEN)
        self.assertEqual(h.dialled(), [("127.0.0.1", 5900)])

    def test_shared_limits(self) -> None:
        """The session limits count every console type together: the one place is taken
        by a serial session, so a noVNC session on the same proxy is refused with 4429."""
        settings = Settings(
            listen="tcp:0",
            serial_listen="tcp:0",
            metrics=None,
            limits=Limits(max_sessions=1, ping_interval=0),
        )
        h = Harness.for_test(self, settings=settings, console_type="serial")
        h.memory_store.add("vnc", "127.0.0.1", 5901)
        h.connect()
        h.send([upgrade_request(GOOD_TOKEN)])
        h.answer_dial(greeting=b"")
        self.assertTrue(h.upgraded())
        transport = TcpLikeTransport(peerAddress=CLIENT_ADDRESS)
        novnc = h.console.factories["novnc"].buildProtocol(transport.getPeer())
        novnc.makeConnection(transport)
        novnc.dataReceived(upgrade_request("vnc"))
        novnc.dataReceived(frame(RFB_VERSION))
        head, _, rest = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "))
        self.assertEqual(
            [f.close_code for f in parse_server_frames(rest) if f.opcode == CLOSE], [4429]
        )
        self.assertEqual(h.dialled(), [("127.0.0.1", 5900)])
