"""The connection lifecycle in memory: every path gives back what it took, within a deadline.

The conformance suite (tests/conformance) covers what the client sends; these tests cover the
other events: timers, a failed upgrade after admission, a bug in a transition, the pending
caps, keepalive answers and a client whose queue does not drain.
"""

from __future__ import annotations

from automat import NoTransition
from automat._core import Automaton
from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.conformance.harness import (
    CLIENT_ADDRESS,
    Harness,
    TcpLikeTransport,
    upgrade_request,
)
from tests.conformance.wsframes import CLOSE, PING, PONG, close_payload, frame
from vncmux.lifecycle import Lifecycle
from vncmux.refusals import IDLE_TIMEOUT
from vncmux.settings import Limits, Settings
from vncmux.websocket import ConsoleProtocol


def harness(test: SynchronousTestCase, **limits: object) -> Harness:
    limits.setdefault("ping_interval", 0)
    settings = Settings(listen="tcp:0", metrics=None, limits=Limits(**limits))  # type: ignore[arg-type]
    return Harness.for_test(test, settings=settings)


class HeldNothing:
    """Mixin: the supervisor holds no session, reservation or pending slot."""

    h: Harness

    def assertNothingHeld(self) -> None:
        supervisor = self.h.console.supervisor
        held = (supervisor.sessions, supervisor.reserved, supervisor.pending.total)
        self.assertEqual(held, ({}, 0, 0))  # type: ignore[attr-defined]


class UpgradeFailsAfterAdmission(ConsoleProtocol):
    """autobahn refuses the upgrade while answering it (as it does for a bad offer)."""

    def succeedHandshake(self, res: object) -> None:
        self.failHandshake("refused while answering")


class RelayStartFails(ConsoleProtocol):
    """A bug in the relay's start: the lifecycle must log it and give everything back."""

    def transport_for_relay(self) -> object:
        raise RuntimeError("boom")


class LifecycleTests(HeldNothing, SynchronousTestCase):
    def test_machine_is_built(self) -> None:
        """The state machine builds (automat checks every transition has an output)."""
        self.assertTrue(callable(Lifecycle))

    def test_indexed_transitions_agree_with_automat(self) -> None:
        """The lifecycle's indexed transition lookup (installed over automat's linear scan)
        answers exactly as automat's own lookup, for every state and every input: a change
        in automat's internals fails here."""
        automaton = Lifecycle.__automat_automaton__
        self.assertIn("outputForInput", vars(automaton))  # the index is installed
        for state in automaton.states():
            for symbol in automaton.inputAlphabet():
                try:
                    expected = Automaton.outputForInput(automaton, state, symbol)
                except NoTransition:
                    self.assertRaises(NoTransition, automaton.outputForInput, state, symbol)
                    continue
                next_state, outputs = automaton.outputForInput(state, symbol)
                self.assertEqual((next_state, list(outputs)), (expected[0], list(expected[1])))

    def test_upgrade_failed_after_admission(self) -> None:
        """The token was admitted and the console dialled, then the upgrade failed: HTTP
        400, the VNC connection closed, the reservation given back, the refusal counted."""
        self.h = h = harness(self)
        h.console.factory.protocol = UpgradeFailsAfterAdmission
        h.connect()
        h.send([upgrade_request()])
        backend = h.answer_dial()
        self.assertTrue(h.output.startswith(b"HTTP/1.1 400"), h.output[:60])
        self.assertTrue(backend.closing)
        self.assertTrue(h.transport.disconnecting)
        self.assertNothingHeld()

    def test_bug_in_a_transition(self) -> None:
        """An exception inside a transition is logged with the session id; both sides are
        cut and every count given back."""
        self.h = h = harness(self)
        h.console.factory.protocol = RelayStartFails
        h.connect()
        h.send([upgrade_request()])
        backend = h.answer_dial()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        logged = [e for e in h.log.events if "log_failure" in e]
        self.assertEqual(logged[0]["sid"], h.protocol.session_id)
        self.assertTrue(h.transport.disconnected)
        self.assertTrue(backend.closing)
        self.assertNothingHeld()

    def test_silent_client(self) -> None:
        """A client that never completes its upgrade request is cut after the handshake
        timeout, and its pending slot is free again."""
        self.h = h = harness(self)
        h.connect()
        h.send([b"GET /websockify?token=good HTTP/1.1\r\n"])
        self.assertEqual(h.console.supervisor.pending.total, 1)
        h.advance(h.settings.handshake_timeout + 0.1)
        self.assertTrue(h.transport.disconnected)
        h.deliver_losses()
        self.assertNothingHeld()

    def test_close_deadline(self) -> None:
        """A client that never answers the proxy's close frame is cut after the close
        timeout; the VNC connection was closed at once."""
        self.h = h = harness(self)
        backend = h.open()
        session = next(iter(h.console.supervisor.sessions.values()))
        session.end(IDLE_TIMEOUT)
        self.assertTrue(backend.closing)
        self.assertEqual([f.close_code for f in h.close_frames()], [4000])
        self.assertFalse(h.transport.disconnected)
        h.advance(h.settings.close_timeout + 0.1)
        self.assertTrue(h.transport.disconnected)
        self.assertNothingHeld()


class CloseReplyTests(SynchronousTestCase):
    """The client's answer to the proxy's close frame never drops what is still queued."""

    def test_answer_while_our_close_is_queued(self) -> None:
        """A refused client that closes as soon as it reads the RFB failure (noVNC does)
        sends its close frame while the proxy's 4401 close frame may still wait in the
        socket's buffer: the proxy closes after flushing it, it does not abort."""
        h = harness(self)
        h.open_refused("unknown")
        h.send([frame(b"RFB 003.008\n")])
        self.assertEqual([f.close_code for f in h.close_frames()], [4401])
        h.send([frame(close_payload(1000), CLOSE)])
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.transport.disconnected, "aborted: the queued close frame is lost")

    def test_answer_to_an_ended_session(self) -> None:
        """The same after a session ended with 4000: the answer closes, it does not abort."""
        h = harness(self)
        h.open()
        next(iter(h.console.supervisor.sessions.values())).end(IDLE_TIMEOUT)
        h.send([frame(close_payload(4000), CLOSE)])
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.transport.disconnected)


class PendingLimitTests(HeldNothing, SynchronousTestCase):
    """Connections that are not relaying yet are capped, in all and per client."""

    def second(self, host: str = CLIENT_ADDRESS.host) -> TcpLikeTransport:
        transport = TcpLikeTransport(peerAddress=IPv4Address("TCP", host, 40001))
        protocol = self.h.console.factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        return transport

    def test_total(self) -> None:
        """Over --max-pending a new connection gets HTTP 503 at once; once the first one
        relays, there is room again."""
        self.h = h = harness(self, max_pending=1)
        h.connect()
        refused = self.second("192.0.2.99")
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 503"))
        self.assertTrue(refused.disconnecting)
        h.send([upgrade_request()])
        h.answer_dial()
        self.assertEqual(h.console.supervisor.pending.total, 0)
        self.assertFalse(self.second("192.0.2.99").value())

    def test_per_client(self) -> None:
        """--max-pending-per-client counts per address; another address is not affected."""
        self.h = h = harness(self, max_pending_per_client=1)
        h.connect()
        self.assertTrue(self.second().value().startswith(b"HTTP/1.1 503"))
        self.assertFalse(self.second("192.0.2.99").value())


class KeepaliveTests(SynchronousTestCase):
    """Only the answer to the proxy's own ping counts as a sign of life."""

    def test_unsolicited_pong(self) -> None:
        """A pong with another payload leaves the ping unanswered; the echo clears it."""
        h = harness(self)
        h.open()
        session = next(iter(h.console.supervisor.sessions.values()))
        session.ping_sent_at = 1.0
        session.client.ping()
        ping = [f for f in h.frames() if f.opcode == PING][-1]
        h.send([frame(b"not yours", PONG)])
        self.assertEqual(session.ping_sent_at, 1.0)
        h.send([frame(ping.payload, PONG)])
        self.assertIsNone(session.ping_sent_at)

    def test_pong_rate(self) -> None:
        """A burst of pings gets 20 pongs, then 20 a second."""
        h = harness(self)
        h.open()
        h.send([frame(b"%d" % n, PING) for n in range(100)])
        self.assertEqual(len(h.pongs()), 20)
        h.advance(0.5)
        h.send([frame(b"%d" % n, PING) for n in range(100)])
        self.assertEqual(len(h.pongs()), 30)


class StalledClientTests(HeldNothing, SynchronousTestCase):
    """A client whose queue is over its cap is not read, and is dropped if it stays over."""

    def test_held_then_dropped(self) -> None:
        """Over the cap: the client is not read and the VNC server paused; still over after
        the ping timeout: the client is cut and the session ends."""
        self.h = h = harness(self, ping_timeout=20.0)
        backend = h.open()
        h.transport.producer.pauseProducing()
        self.assertEqual(h.transport.producerState, "paused")
        self.assertEqual(backend.transport.producerState, "paused")
        h.advance(19.0)
        self.assertEqual(len(h.console.supervisor.sessions), 1)
        h.advance(1.5)
        self.assertTrue(h.transport.disconnected)
        self.assertTrue(backend.closing)
        self.assertNothingHeld()

    def test_drained_in_time(self) -> None:
        """A client that drains before the ping timeout is read again and kept."""
        self.h = h = harness(self, ping_timeout=20.0)
        backend = h.open()
        h.transport.producer.pauseProducing()
        h.advance(10.0)
        h.transport.producer.resumeProducing()
        h.advance(30.0)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(backend.transport.producerState, "producing")
        self.assertEqual(len(h.console.supervisor.sessions), 1)



class SessionLogTests(SynchronousTestCase):
    """The session's lines: text for people, fields for log pipelines."""

    def test_opened_and_closed_lines(self) -> None:
        """One line when the session opens and one when it closes, with the fields a log
        pipeline indexes; the text is the same whichever observer formats it."""
        h = harness(self)
        h.open()
        session_id = next(iter(h.console.supervisor.sessions))
        h.send([frame(b"\x04\x01\x00\x00\x00\x00\xff\x0d"), frame(close_payload(1000), CLOSE)])
        h.deliver_losses()
        lines = [e for e in h.log.events if e.get("log_namespace") == "vncmux.session"]
        self.assertEqual(
            [formatEvent(e) for e in lines],
            [
                f"session {session_id} from 192.0.2.10 opened to 127.0.0.1:5900 (novnc console,"
                f" token {lines[0]['token_id']}, security relayed)",
                f"session {session_id} (novnc console) closed after 0.0s: client closed"
                " (8 bytes in, 12 bytes out)",
            ],
        )
        self.assertEqual(
            [(e["vncmux_event"], e["session_id"], e.get("close_code")) for e in lines],
            [("session_opened", session_id, None), ("session_closed", session_id, 1000)],
        )


class UploadReadTests(SynchronousTestCase):
    """A browser that sends faster than it is read is read in bigger pieces."""

    def test_full_reads_grow_the_read_size(self) -> None:
        """A read that fills the read size doubles it, up to 2 MiB; a short read leaves it
        alone. Every payload byte reaches the VNC server, in order."""
        h = harness(self)
        backend = h.open()
        sizes, sent = [h.transport.bufferSize], b""
        for full in (True, True, False, True, True, True):
            size = h.transport.bufferSize - (0 if full else 1)
            payload = (bytes(range(256)) * (size // 256 + 1))[: size - 14]  # 14: the header
            h.protocol.dataReceived(frame(payload, length_form=127))
            sent += payload
            sizes.append(h.transport.bufferSize)
        self.assertEqual([size // 1024 for size in sizes], [256, 512, 1024, 1024, 2048, 2048, 2048])
        self.assertEqual(backend.received, sent)

    def test_only_sessions_grow(self) -> None:
        """A client that is being refused keeps its read size (and its output cap)."""
        h = harness(self)
        h.open_refused()
        h.transport.bufferSize = size = 64 * 1024
        h.protocol.dataReceived(frame(b"x" * (size - 14), length_form=127))
        self.assertEqual(h.transport.bufferSize, size)


class PlainHttpTests(HeldNothing, SynchronousTestCase):
    def test_handed_over_to_the_web_site(self) -> None:
        """A request without Upgrade leaves the lifecycle at once (its pending slot is free,
        no upgrade deadline cuts it) and twisted.web answers it on the same connection; the
        connection still counts as open until its web deadline cuts it."""
        self.h = h = harness(self)
        supervisor = h.console.supervisor
        timers = len(h.reactor.getDelayedCalls())
        h.connect()
        h.send([b"GET /vnc.html HTTP/1.1\r\nHost: x\r\n\r\n"])
        self.assertTrue(h.output.startswith(b"HTTP/1.1 404 "), h.output[:60])
        self.assertEqual(supervisor.pending.total, 0)
        h.send([b"GET /other.js HTTP/1.1\r\nHost: x\r\n\r\n"])
        self.assertEqual(h.output.count(b"HTTP/1.1 404 "), 2)
        h.advance(h.settings.handshake_timeout + 0.1)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(supervisor.connections.count, 1)
        h.advance(h.settings.web_timeout - h.settings.handshake_timeout)
        self.assertTrue(h.transport.disconnecting)
        h.deliver_losses()
        self.assertEqual(supervisor.connections.count, 0)
        self.assertEqual(len(h.reactor.getDelayedCalls()), timers)
        self.assertNothingHeld()
