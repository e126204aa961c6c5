"""
The RFB security proxy and the CONNECT tunnel in whole connections, in memory (the conformance
harness): the VNC server's side is played byte by byte, the browser's through WebSocket frames.
"""

from __future__ import annotations

import json
import struct

from twisted.trial.unittest import SynchronousTestCase

from tests.conformance.harness import GOOD_TOKEN, Backend, Harness, upgrade_request
from tests.conformance.wsframes import (
    BINARY,
    CLOSE,
    WRITE_MODES,
    close_payload,
    fragments,
    frame,
)
from vncmux.admin import session_json
from vncmux.rfbsecurity import vnc_auth_response
from vncmux.settings import Settings
from vncmux.tokens import MemoryTokenStore

V38 = b"RFB 003.008\n"
V33 = b"RFB 003.003\n"
CHALLENGE = bytes(range(100, 116))
OK = b"\x00\x00\x00\x00"
PASSWORD = "Pa55-w0rd"
CLIENT_INIT = b"\x01"
SERVER_INIT = struct.pack(">HH", 640, 400) + bytes(16) + struct.pack(">I", 3) + b"vnc"


def code_of(payload: bytes) -> int:
    return int(struct.unpack(">H", payload[:2])[0])


class SecurityProxyTests(SynchronousTestCase):
    """A record with a password: vncmux does VncAuth itself and gives the browser None."""

    def harness(self, **fields: object) -> Harness:
        store = MemoryTokenStore()
        store.add(GOOD_TOKEN, "127.0.0.1", 5900, **fields)
        h = Harness.for_test(self, store=store, settings=Settings(listen="tcp:0", metrics=None))
        self.addCleanup(lambda: self.assertEqual(h.log.failures(), []))
        return h

    def authenticated(self, h: Harness) -> Backend:
        """Upgrade request, then the VNC server's side of VncAuth, accepted."""
        h.connect()
        h.send([upgrade_request()])
        backend = h.answer_dial(greeting=V38)
        self.assertEqual(backend.received, V38)
        self.assertFalse(h.upgraded(), "no 101 before the security handshake is done")
        backend.protocol.dataReceived(b"\x01\x02")
        backend.protocol.dataReceived(CHALLENGE)
        self.assertEqual(backend.received, V38 + b"\x02" + vnc_auth_response(PASSWORD, CHALLENGE))
        backend.protocol.dataReceived(OK)
        h.pump()
        self.assertTrue(h.upgraded())
        return backend

    def test_vnc_auth_then_none_then_relay(self) -> None:
        """The browser sees version, [None], OK; ClientInit and later bytes reach the VNC
        server, ServerInit comes back; the password is in no byte sent to the browser."""
        h = self.harness(password=PASSWORD)
        backend = self.authenticated(h)
        self.assertEqual([f.payload for f in h.frames()], [V38])
        self.assertEqual(h.console.supervisor.sessions, {})
        h.send([frame(V38), frame(b"\x01" + CLIENT_INIT)])
        self.assertEqual([f.payload for f in h.frames()], [V38, b"\x01\x01", OK])
        self.assertEqual(len(h.console.supervisor.sessions), 1)
        sent_before = len(backend.received)
        self.assertEqual(backend.received[-1:], CLIENT_INIT)
        backend.protocol.dataReceived(SERVER_INIT)
        self.assertEqual(h.frames()[-1].payload, SERVER_INIT)
        h.send([frame(b"\x04\x01\x00\x00\x00\x00\xff\xbe")])
        self.assertEqual(backend.received[sent_before:], b"\x04\x01\x00\x00\x00\x00\xff\xbe")
        self.assertNotIn(PASSWORD.encode(), h.output)
        self.assertNotIn(vnc_auth_response(PASSWORD, CHALLENGE), h.output)
        self.assertNotIn(PASSWORD, repr(h.log.events))
        session = next(iter(h.console.supervisor.sessions.values()))
        self.assertFalse(session.scanner.fallback)  # the scanner followed the handshake
        self.assertNotIn(PASSWORD, json.dumps(session_json(session)))
        (opened,) = [e for e in h.log.events if e.get("vncmux_event") == "session_opened"]
        self.assertEqual(opened["security"], "VncAuth to the VNC server, None to the browser")

    def test_relay_after_the_handshake_is_the_plain_path(self) -> None:
        """Once secured, the same relay as without the proxy: the client's frames go
        straight to Session.from_client, the VNC server's reads straight to the session,
        and each side's transport is the other's streaming producer (no per-byte filter)."""
        h = self.harness(password=PASSWORD)
        backend = self.authenticated(h)
        h.send([frame(V38 + b"\x01" + CLIENT_INIT)])
        (session,) = h.console.supervisor.sessions.values()
        self.assertEqual(h.protocol._reader.deliver, session.from_client)
        self.assertIs(session.backend.session, session)  # type: ignore[attr-defined]
        self.assertIs(session.backend.transport, backend.transport)  # type: ignore[attr-defined]
        self.assertTrue(h.transport.streaming and backend.transport.streaming)
        self.assertEqual(backend.transport.producerState, "producing")

    def test_handshake_in_any_framing(self) -> None:
        """The browser's handshake and first messages split across frames, fragments and
        reads in every way: the VNC server gets ClientInit and the messages exactly once,
        in order, and the browser gets the proxy's handshake as it should."""
        messages = CLIENT_INIT + b"\x03\x00\x00\x00\x00\x00\x02\x80\x01\x90"
        stream = V38 + b"\x01" + messages
        framings = {
            "one frame": [frame(stream)],
            "frame per byte": [frame(stream[i : i + 1]) for i in range(len(stream))],
            "fragmented": fragments(stream, 5),
        }
        for name, frames in framings.items():
            for mode in WRITE_MODES:
                with self.subTest(framing=name, mode=mode):
                    h = self.harness(password=PASSWORD)
                    backend = self.authenticated(h)
                    sent_before = len(backend.received)
                    h.send_frames(frames, mode)
                    payloads = [f.payload for f in h.frames()]
                    self.assertEqual(payloads[0], V38)
                    self.assertEqual(b"".join(payloads[1:]), b"\x01\x01" + OK)
                    self.assertEqual(backend.received[sent_before:], messages)
                    self.assertEqual(len(h.console.supervisor.sessions), 1)

    def test_closing_a_paused_vnc_side_reads_on(self) -> None:
        """A VNC side paused by a full browser buffer is read again when the session
        closes it (a TLS close waits for the server's close_notify), and what it sends then
        is dropped, not sent to the browser or kept."""
        h = self.harness(password=PASSWORD)
        backend = self.authenticated(h)
        h.send([frame(V38 + b"\x01" + CLIENT_INIT)])
        (session,) = h.console.supervisor.sessions.values()
        vnc_side = session.backend
        h.transport.producer.pauseProducing()  # the browser's buffer is full
        self.assertEqual(backend.transport.producerState, "paused")
        h.client_closes_tcp()
        self.assertTrue(backend.closing)
        self.assertEqual(backend.transport.producerState, "producing")
        frames_before = len(h.frames())
        backend.protocol.dataReceived(b"late screen update")
        self.assertEqual(len(h.frames()), frames_before)
        self.assertEqual(vnc_side.greeting, b"")  # type: ignore[attr-defined]

    def test_3_3_browser(self) -> None:
        """An RFB 3.3 browser is told None and its ClientInit is relayed."""
        h = self.harness(password=PASSWORD)
        backend = self.authenticated(h)
        h.send([frame(V33 + CLIENT_INIT)])
        self.assertEqual([f.payload for f in h.frames()], [V38, struct.pack(">I", 1)])
        self.assertEqual(backend.received[-1:], CLIENT_INIT)
        self.assertEqual(len(h.console.supervisor.sessions), 1)

    def test_browser_choosing_another_type(self) -> None:
        """A browser that picks VncAuth gets an RFB failure and 4400; the VNC connection
        closes and its place under the limits is given back."""
        h = self.harness(password=PASSWORD)
        backend = self.authenticated(h)
        h.send([frame(V38 + b"\x02")])
        frames = h.frames()
        self.assertEqual(frames[1].payload[:2], b"\x01\x01")
        self.assertEqual(frames[1].payload[2:6], b"\x00\x00\x00\x01")
        self.assertEqual(frames[-1].opcode, CLOSE)
        self.assertEqual(code_of(frames[-1].payload), 4400)
        self.assertTrue(backend.closing)
        self.assertEqual(h.console.supervisor.reserved, 0)
        self.assertEqual(h.console.supervisor.pending.total, 0)

    def test_browser_leaves_during_the_handshake(self) -> None:
        """The browser's connection lost while securing: the VNC side closes, nothing held."""
        h = self.harness(password=PASSWORD)
        backend = self.authenticated(h)
        h.client_closes_tcp()
        self.assertTrue(backend.closing)
        self.assertEqual(h.console.supervisor.reserved, 0)
        self.assertEqual(h.console.supervisor.pending.total, 0)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_browser_closes_during_the_handshake(self) -> None:
        """The browser's close frame while securing: answered, the VNC side closes."""
        h = self.harness(password=PASSWORD)
        backend = self.authenticated(h)
        h.send([frame(close_payload(1000), CLOSE)])
        self.assertEqual(code_of(h.close_frames()[0].payload), 1000)
        self.assertTrue(backend.closing)
        self.assertEqual(h.console.supervisor.reserved, 0)

    def test_browser_silent(self) -> None:
        """A browser that never answers the greeting is cut after the refusal timeout."""
        h = self.harness(password=PASSWORD)
        backend = self.authenticated(h)
        h.advance(h.settings.refusal_timeout + 1)
        self.assertTrue(h.transport.disconnecting)
        self.assertTrue(backend.closing)
        self.assertEqual(h.console.supervisor.reserved, 0)
        self.assertEqual(h.console.supervisor.pending.total, 0)

    def test_no_allowed_type(self) -> None:
        """A server offering only VeNCrypt (not allowed by default): the browser reads the
        4502 refusal, and the operator's log names what was offered."""
        h = self.harness(password=PASSWORD)
        h.connect()
        h.send([upgrade_request()])
        backend = h.answer_dial(greeting=V38)
        backend.protocol.dataReceived(b"\x01\x13")
        self.assertTrue(backend.closing)
        h.send([frame(V38)])
        reason = b"console offers no allowed security type"
        self.assertEqual(h.frames()[1].payload, b"\x00" + struct.pack(">I", len(reason)) + reason)
        self.assertEqual(code_of(h.close_frames()[0].payload), 4502)
        logged = " ".join(str(e.get("detail", "")) for e in h.log.events)
        self.assertIn("19 (VeNCrypt)", logged)
        self.assertEqual(h.console.supervisor.reserved, 0)

    def test_wrong_password(self) -> None:
        """The server refuses the password: 'console authentication failed' (4502)."""
        h = self.harness(password="wrong")
        h.connect()
        h.send([upgrade_request()])
        backend = h.answer_dial(greeting=V38)
        reason = b"Authentication failure"
        backend.protocol.dataReceived(
            b"\x01\x02" + CHALLENGE + b"\x00\x00\x00\x01" + struct.pack(">I", len(reason)) + reason
        )
        h.send([frame(V38)])
        self.assertIn(b"console authentication failed", h.frames()[1].payload)
        self.assertEqual(code_of(h.close_frames()[0].payload), 4502)

    def test_no_password_no_proxy(self) -> None:
        """Without a password (and --auth-schemes none) RFB passes through untouched."""
        h = self.harness()
        backend = h.open()
        self.assertEqual(backend.received, b"")
        (opened,) = [e for e in h.log.events if e.get("vncmux_event") == "session_opened"]
        self.assertEqual(opened["security"], "relayed")


class TunnelTests(SynchronousTestCase):
    """A record with internal_access_path: CONNECT first, a 200, then RFB."""

    def harness(self) -> Harness:
        store = MemoryTokenStore()
        store.add(GOOD_TOKEN, "127.0.0.1", 5900, internal_access_path="/console?ref=7")
        return Harness.for_test(self, store=store)

    def test_connect_then_rfb(self) -> None:
        """CONNECT with the path and Host; after the 200 the greeting reaches the browser."""
        h = self.harness()
        h.connect()
        h.send([upgrade_request()])
        backend = h.answer_dial(greeting=b"")
        self.assertEqual(
            backend.received, b"CONNECT /console?ref=7 HTTP/1.1\r\nHost: 127.0.0.1:5900\r\n\r\n"
        )
        backend.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n" + V38[:5])
        self.assertFalse(h.upgraded())
        backend.protocol.dataReceived(V38[5:])
        h.pump()
        self.assertEqual(h.frames()[0].payload, V38)
        self.assertEqual(h.frames()[0].opcode, BINARY)

    def test_path_with_a_line_break(self) -> None:
        """A path that would inject a header is refused before anything is dialled, and the
        reservation is given back."""
        store = MemoryTokenStore()
        store.add(GOOD_TOKEN, "127.0.0.1", 5900, internal_access_path="/p\r\nX-Evil: 1")
        h = Harness.for_test(self, store=store)
        h.connect()
        h.send([upgrade_request()])
        self.assertEqual(h.dialled(), [])
        h.send([frame(V38)])
        self.assertEqual(code_of(h.close_frames()[0].payload), 4502)
        self.assertEqual(h.console.supervisor.reserved, 0)
        self.assertEqual(h.log.failures(), [])

    def test_non_200_is_unreachable(self) -> None:
        """A 403 from the tunnel: 4502 'console unreachable', the status in the log only."""
        h = self.harness()
        h.connect()
        h.send([upgrade_request()])
        backend = h.answer_dial(greeting=b"")
        backend.protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        h.send([frame(V38)])
        self.assertIn(b"console unreachable", h.frames()[1].payload)
        self.assertEqual(code_of(h.close_frames()[0].payload), 4502)
        logged = [str(e.get("detail", "")) for e in h.log.events if e.get("detail")]
        self.assertTrue(any("403 Forbidden" in d for d in logged), logged)
        self.assertFalse(any("ref=7" in repr(e) for e in h.log.events))
