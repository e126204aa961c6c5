"""
SPICE HTML5 consoles (nova-spicehtml5proxy's ``spice-html5``): every channel of a SPICE
session is its own WebSocket and TCP connection with the same token; the session (its main
channel, the token's first connection) counts against the limits once, its other channels
join it and end with it, idle time comes from the inputs channel, and a refusal is a SPICE
link reply that spice-html5 shows. Whole connections in memory
(L{tests.conformance.harness}); the real SPICE server and spice-html5 in Chromium are in
tests/e2e/test_spice.py.
"""

from __future__ import annotations

import struct

from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.conformance.harness import (
    CLIENT_ADDRESS,
    GOOD_TOKEN,
    Backend,
    Harness,
    TcpLikeTransport,
    upgrade_request,
)
from tests.conformance.wsframes import (
    BINARY,
    CLOSE,
    Frame,
    close_payload,
    frame,
    parse_server_frames,
)
from vncmux.consoles import SPICE_HTML5
from vncmux.settings import Limits, Settings

MAIN, DISPLAY, INPUTS, CURSOR = 1, 2, 3, 4
#: spice-html5's common caps: PROTOCOL_AUTH_SELECTION and MINI_HEADER.
HTML5_CAPS = (1 << 1) | (1 << 3)
TICKET = struct.pack("<I", 1) + bytes(128)
KEY_DOWN, MOUSE_MOTION, ACK, DISPLAY_INIT = 101, 111, 2, 101


def link(channel_type: int, connection_id: int = 0, caps: int = HTML5_CAPS) -> bytes:
    """The client's first bytes on a channel: SpiceLinkHeader and SpiceLinkMess, as
    spice-html5 sends them (one common caps word, no channel caps, caps right after)."""
    mess = struct.pack("<IBBIII", connection_id, channel_type, 0, 1, 0, 18)
    mess += struct.pack("<I", caps)
    return struct.pack("<4sIII", b"REDQ", 2, 2, len(mess)) + mess


def message(message_type: int, payload: bytes = b"") -> bytes:
    """A client message with spice-html5's mini header."""
    return struct.pack("<HI", message_type, len(payload)) + payload


class InputsActivityTests(SynchronousTestCase):
    """What counts as activity in one channel's client stream."""

    def test_inputs_channel(self) -> None:
        """On the inputs channel the link and the ticket are no activity, nor is an ACK;
        a key press or a mouse motion is, wherever the reads cut the stream."""
        scanner = SPICE_HTML5.activity_scanner("input")
        assert scanner is not None
        self.assertFalse(scanner.feed(link(INPUTS)))
        self.assertFalse(scanner.feed(TICKET[:50]))
        self.assertFalse(scanner.feed(TICKET[50:] + message(ACK)))
        key = message(KEY_DOWN, struct.pack("<I", 0x1E))
        self.assertEqual([scanner.feed(key[:3]), scanner.feed(key[3:])], [False, True])
        motion = message(MOUSE_MOTION, bytes(10))
        self.assertFalse(scanner.feed(message(ACK) + motion[:5]))
        self.assertTrue(scanner.feed(motion[5:]))

    def test_full_headers(self) -> None:
        """A client without the mini header sends full SpiceDataHeaders (serial, type, size,
        sub-list) and a bare 128-byte ticket: still parsed by message type."""
        scanner = SPICE_HTML5.activity_scanner("input")
        assert scanner is not None
        self.assertFalse(scanner.feed(link(INPUTS, caps=0) + bytes(128)))
        self.assertFalse(scanner.feed(struct.pack("<QHII", 1, ACK, 0, 0)))
        self.assertTrue(scanner.feed(struct.pack("<QHII", 2, KEY_DOWN, 4, 0) + bytes(4)))

    def test_oversized_link_is_not_buffered(self) -> None:
        """A link header announcing a huge link message (a hostile client) ends the parsing:
        nothing of the stream is held, nothing counts as input."""
        scanner = SPICE_HTML5.activity_scanner("input")
        assert scanner is not None
        self.assertFalse(scanner.feed(struct.pack("<4sIII", b"REDQ", 2, 2, 1 << 31)))
        self.assertFalse(scanner.feed(bytes(100_000)))
        self.assertEqual(scanner._buffer, b"")  # type: ignore[attr-defined]

    def test_other_channels(self) -> None:
        """On main or display nothing the client sends is input (its display init has the
        same type number as a key press: only the inputs channel is parsed)."""
        for channel in (MAIN, DISPLAY):
            scanner = SPICE_HTML5.activity_scanner("input")
            assert scanner is not None
            self.assertFalse(scanner.feed(link(channel) + TICKET + message(DISPLAY_INIT)))
            self.assertFalse(scanner.feed(message(KEY_DOWN, bytes(4))))
        self.assertIsNone(SPICE_HTML5.activity_scanner("any"))

    def test_refusal_is_a_link_reply(self) -> None:
        """The refusal says nothing first (a SPICE server does not), then answers the
        client's link header with a SpiceLinkReply whose error is PERMISSION_DENIED (7)."""
        refusal = SPICE_HTML5.refusal("invalid token")
        assert refusal is not None
        self.assertEqual(refusal.greeting(), b"")
        client_link = link(MAIN)
        self.assertIsNone(refusal.receive(client_link[:10]))
        reply = refusal.receive(client_link[10:])
        assert reply is not None
        magic, major, _, size = struct.unpack_from("<4sIII", reply)
        self.assertEqual((magic, major, size, len(reply)), (b"REDQ", 2, len(reply) - 16, 16 + 178))
        error, *_, caps_offset = struct.unpack_from("<I162sIII", reply, 16)
        self.assertEqual((error, caps_offset), (7, 178))


class Channel:
    """One spice-html5 WebSocket: connects, upgrades with the token, and (once its SPICE
    server connection is answered) sends its link message."""

    def __init__(self, h: Harness, token: str = GOOD_TOKEN) -> None:
        self.harness = h
        self.transport = TcpLikeTransport(peerAddress=CLIENT_ADDRESS)
        factory = h.console.factories["spice-html5"]
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6082))
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(upgrade_request(token))

    def open(self, channel_type: int) -> Backend:
        """The SPICE server accepts (it says nothing first); the client sends its link."""
        backend = self.harness.answer_dial(greeting=b"")
        self.send(link(channel_type))
        return backend

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(frame(data))

    def frames(self) -> list[Frame]:
        head, _, rest = self.transport.value().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return parse_server_frames(rest)

    def close_codes(self) -> list[int | None]:
        return [f.close_code for f in self.frames() if f.opcode == CLOSE]


class SpiceSessionTests(SynchronousTestCase):
    """The SPICE listener: channels of one token are one session."""

    def harness(self, **limits: float) -> Harness:
        settings = Settings(
            listen="tcp:0",
            spice_listen="tcp:0",
            metrics=None,
            limits=Limits(ping_interval=0, **limits),  # type: ignore[arg-type]
        )
        h = Harness.for_test(self, settings=settings, console_type="spice-html5")
        h.memory_store.add("other-token", "127.0.0.1", 5931, console_type="spice-html5")
        return h

    def open_session(self, h: Harness) -> list[tuple[Channel, Backend]]:
        """main, then display, inputs and cursor, as spice-html5 opens them."""
        opened = []
        for channel_type in (MAIN, DISPLAY, INPUTS, CURSOR):
            channel = Channel(h)
            opened.append((channel, channel.open(channel_type)))
        return opened

    def test_channels_relay_to_their_own_connections(self) -> None:
        """Each channel dials the SPICE server once and relays both ways on its own
        connection, the link message first: no byte is added or parsed away."""
        h = self.harness()
        (main, main_server), (display, display_server), *_ = self.open_session(h)
        self.assertEqual(h.dialled(), [("127.0.0.1", 5900)] * 4)
        self.assertEqual(main_server.received, link(MAIN))
        self.assertEqual(display_server.received, link(DISPLAY))
        display_server.protocol.dataReceived(b"REDQ display reply")
        self.assertEqual(
            [(f.opcode, f.payload) for f in display.frames()], [(BINARY, b"REDQ display reply")]
        )
        self.assertEqual(main.frames(), [])

    def test_one_session_under_the_limits(self) -> None:
        """Four channels are one session: one reservation, one entry in the supervisor's
        table, even with one session per token; another token's main channel is a second
        session, and a third one is refused by the process limit."""
        h = self.harness(max_sessions=2, max_sessions_per_token=1)
        opened = self.open_session(h)
        supervisor = h.console.supervisor
        self.assertEqual((supervisor.reserved, len(supervisor.sessions)), (1, 1))
        self.assertEqual([c.close_codes() for c, _ in opened], [[]] * 4)
        other = Channel(h, "other-token")
        other.open(MAIN)
        self.assertEqual((supervisor.reserved, len(supervisor.sessions)), (2, 2))
        h.memory_store.add("third-token", "127.0.0.1", 5932, console_type="spice-html5")
        third = Channel(h, "third-token")
        third.send(link(MAIN))
        self.assertEqual(third.close_codes(), [4429])

    def test_channels_end_with_their_session(self) -> None:
        """When the main channel ends (here its client closes), the other channels get the
        same close code and their SPICE connections close; the reservation is given back
        once, and the token can open a new session."""
        h = self.harness(max_sessions_per_token=1)
        opened = self.open_session(h)
        (main, _), *others = opened
        main.send(b"")
        main.protocol.dataReceived(frame(close_payload(1000), CLOSE))
        self.assertEqual(main.close_codes(), [1000])
        for channel, server in others:
            self.assertEqual(channel.close_codes(), [1000])
            self.assertTrue(server.closing)
        supervisor = h.console.supervisor
        self.assertEqual((supervisor.reserved, len(supervisor.sessions)), (0, 0))
        again = Channel(h)
        again.open(MAIN)
        self.assertEqual((supervisor.reserved, len(supervisor.sessions)), (1, 1))

    def test_a_channel_ending_leaves_the_session(self) -> None:
        """A closed display channel ends only itself: the session and its other channels
        go on, and the reservation is still held."""
        h = self.harness()
        _, (display, _), (inputs, _), _ = self.open_session(h)
        display.protocol.dataReceived(frame(close_payload(1000), CLOSE))
        self.assertEqual(display.close_codes(), [1000])
        self.assertEqual(inputs.close_codes(), [])
        self.assertEqual(h.console.supervisor.reserved, 1)

    def test_second_main_channel_is_a_second_session(self) -> None:
        """A main channel that joined a live session of its token (another tab) is a new
        SPICE session: once its link shows it, it counts against the limits on its own; the
        SPICE server then drops the older client, whose channels end with their session,
        while the new session and the channels it opens go on."""
        h = self.harness(max_sessions_per_token=2)
        (old_main, old_server), (old_display, _), *_ = self.open_session(h)
        supervisor = h.console.supervisor
        new_main = Channel(h)
        new_main.open(MAIN)
        self.assertEqual((supervisor.reserved, len(supervisor.sessions)), (2, 2))
        old_server.protocol.connectionLost(None)  # the server dropped the older client
        self.assertEqual(old_main.close_codes(), [1000])
        self.assertEqual(old_display.close_codes(), [1000])
        self.assertEqual(new_main.close_codes(), [])
        new_display = Channel(h)
        new_display.open(DISPLAY)
        self.assertEqual(new_display.close_codes(), [])
        self.assertEqual((supervisor.reserved, len(supervisor.sessions)), (1, 1))

    def test_second_main_channel_over_the_limit(self) -> None:
        """Over the token's limit, that main channel is closed with 4429 and its SPICE
        connection aborted (the link message being relayed is dropped); the first session
        goes on, and the refusal is logged with its reason."""
        h = self.harness(max_sessions_per_token=1)
        (main, _), (display, _), *_ = self.open_session(h)
        second = Channel(h)
        server = second.open(MAIN)
        self.assertEqual(second.close_codes(), [4429])
        assert server.transport is not None
        self.assertTrue(server.transport.disconnected, "aborted, not closed after a flush")
        self.assertEqual([main.close_codes(), display.close_codes()], [[], []])
        self.assertEqual(h.console.supervisor.reserved, 1)
        logged = [formatEvent(e) for e in h.log.events]
        self.assertTrue(any("second SPICE session on the token" in line for line in logged), logged)

    def test_idle_time_from_the_inputs_channel(self) -> None:
        """Display traffic keeps no session alive; a key press on the inputs channel does,
        stamped on the session (the main channel); without input the whole session ends
        with 4000 on every channel."""
        h = self.harness(idle_timeout=60)
        h.console.supervisor.startService()
        self.addCleanup(h.console.supervisor.stopService)
        (main, _), (_, display_server), (inputs, _), _ = self.open_session(h)
        inputs.send(TICKET)
        for _ in range(5):
            h.advance(10)
            display_server.protocol.dataReceived(b"frame update")
            inputs.send(message(ACK))
        inputs.send(message(KEY_DOWN, struct.pack("<I", 0x1E)))  # a key press at 50 s
        h.advance(55)
        self.assertEqual(main.close_codes(), [])
        h.advance(10)
        self.assertEqual(main.close_codes(), [4000])
        self.assertEqual(inputs.close_codes(), [4000])

    def test_refusal_reaches_spice_html5(self) -> None:
        """An unknown token is answered with a SPICE link reply carrying PERMISSION_DENIED
        (spice-html5 shows "reply link error 7"), then the close frame with 4401; nothing
        is dialled."""
        h = self.harness()
        refused = Channel(h, "unknown")
        self.assertEqual(refused.frames(), [])
        refused.send(link(MAIN))
        frames = refused.frames()
        self.assertEqual(frames[0].opcode, BINARY)
        self.assertEqual(frames[0].payload[:4], b"REDQ")
        self.assertEqual(struct.unpack_from("<I", frames[0].payload, 16), (7,))
        self.assertEqual(refused.close_codes(), [4401])
        self.assertEqual(h.dialled(), [])

    def test_other_console_types_refused(self) -> None:
        """A noVNC token is refused on the SPICE listener, and a SPICE token on noVNC's."""
        h = self.harness()
        h.memory_store.add("vnc-token", "127.0.0.1", 5901)
        refused = Channel(h, "vnc-token")
        refused.send(link(MAIN))
        self.assertEqual(refused.close_codes(), [4401])
        self.assertEqual(h.dialled(), [])
