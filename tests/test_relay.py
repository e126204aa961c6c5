"""The relay on StringTransports: forwarding, byte counts, backpressure, one ending."""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.fakes import ClosingOwner, FakePeer, Registry
from vncmux.backend import BackendProtocol
from vncmux.events import Observers
from vncmux.interfaces import IClientPeer, IPeer
from vncmux.refusals import BACKEND_CLOSED, BACKEND_ERROR, CLIENT_CLOSED, IDLE_TIMEOUT
from vncmux.relay import (
    BACKEND_READ_SIZE,
    BACKEND_TO_CLIENT,
    CLIENT_BUFFER_SIZE,
    CLIENT_TO_BACKEND,
    SEND_NOW_LIMIT,
    RelayStats,
    Session,
    send_now,
)
from vncmux.rfb import ClientActivityScanner
from vncmux.supervisor import Reservation, Supervisor
from vncmux.tokens import TokenRecord
from vncmux.websocket import ConsoleProtocol, binary_frame_header

RECORD = TokenRecord("ab" * 32, "127.0.0.1", 5900)


def reservation() -> Reservation:
    """A real reservation, under a supervisor of its own."""
    return Supervisor(Clock(), Observers()).reserve(RECORD, "192.0.2.1")


class SessionTests(SynchronousTestCase):
    """A session forwards, counts and ends exactly once."""

    def setUp(self) -> None:
        self.client = FakePeer()
        self.backend = FakePeer()
        self.registry = Registry()
        self.stats = RelayStats()
        self.session = Session(
            "s1",
            RECORD,
            "192.0.2.1",
            self.client,
            self.backend,
            100.0,
            self.registry,
            ClientActivityScanner(),
            reservation(),
            ClosingOwner(),
        )

    def test_fakes_provide_ipeer(self) -> None:
        """The fakes and the real protocols provide the peer interfaces."""
        verifyObject(IClientPeer, self.client)
        verifyObject(IClientPeer, ConsoleProtocol())
        verifyObject(IPeer, BackendProtocol())

    def test_forwards_and_counts(self) -> None:
        """Bytes go to the other side unchanged and are counted per direction."""
        self.session.from_client(b"abc")
        self.session.from_backend(b"RFB 003.008\n")
        self.assertEqual(self.backend.transport.value(), b"abc")
        self.assertEqual(self.client.transport.value(), b"RFB 003.008\n")
        self.assertEqual((self.session.bytes_to_backend, self.session.bytes_to_client), (3, 12))

    def test_start_registers_streaming_producers(self) -> None:
        """Each side's transport gets the other side as a streaming producer, and the
        backend, paused until now, is resumed."""
        self.backend.transport.pauseProducing()
        self.session.start(self.client.transport, self.backend.transport, self.stats)
        self.assertTrue(self.client.transport.streaming)
        self.assertTrue(self.backend.transport.streaming)
        self.assertEqual(self.backend.transport.producerState, "producing")
        self.assertEqual(self.registry.started, [self.session])
        self.assertEqual(self.backend.transport.bufferSize, BACKEND_READ_SIZE)
        self.assertEqual(self.client.transport.bufferSize, CLIENT_BUFFER_SIZE)

    def test_slow_client_pauses_backend(self) -> None:
        """A full client buffer stops reading from the VNC server until it drains."""
        self.session.start(self.client.transport, self.backend.transport, self.stats)
        self.client.transport.producer.pauseProducing()
        self.assertEqual(self.backend.transport.producerState, "paused")
        self.assertEqual(self.client.transport.producerState, "producing")
        self.client.transport.producer.resumeProducing()
        self.assertEqual(self.backend.transport.producerState, "producing")
        self.assertEqual(self.stats.pauses, {BACKEND_TO_CLIENT: 1, CLIENT_TO_BACKEND: 0})

    def test_slow_backend_pauses_client(self) -> None:
        """A full backend buffer stops reading from the browser until it drains."""
        self.session.start(self.client.transport, self.backend.transport, self.stats)
        self.backend.transport.producer.pauseProducing()
        self.assertEqual(self.client.transport.producerState, "paused")
        self.assertEqual(self.backend.transport.producerState, "producing")
        self.backend.transport.producer.resumeProducing()
        self.assertEqual(self.client.transport.producerState, "producing")
        self.assertEqual(self.stats.pauses, {BACKEND_TO_CLIENT: 0, CLIENT_TO_BACKEND: 1})

    def test_stop_producing_does_not_close(self) -> None:
        """A consumer going away does not close the other side behind the session's back."""
        self.session.start(self.client.transport, self.backend.transport, self.stats)
        self.client.transport.producer.stopProducing()
        self.assertIsNone(self.backend.closed)

    def test_ends_once(self) -> None:
        """The first ending wins; both sides get its code and the registry hears once."""
        self.assertTrue(self.session.end(IDLE_TIMEOUT))
        self.assertFalse(self.session.end(CLIENT_CLOSED))
        self.assertEqual(self.client.closed, (4000, "idle timeout"))
        self.assertEqual(self.backend.closed, (4000, "idle timeout"))
        self.assertEqual(self.registry.ended, [self.session])
        self.assertIs(self.session.ending, IDLE_TIMEOUT)

    def test_slow_client_is_told(self) -> None:
        """The browser hears when its queue fills and drains, to bound what else it queues."""
        self.session.start(self.client.transport, self.backend.transport, self.stats)
        self.client.transport.producer.pauseProducing()
        self.client.transport.producer.resumeProducing()
        self.assertEqual(self.client.blocked, [True, False])
        self.assertEqual(self.backend.blocked, [])

    def test_finish_unregisters_and_releases(self) -> None:
        """Ending unregisters both producers (a paused producer would keep a closing socket
        open) and gives the reservation back, once."""
        self.session.start(self.client.transport, self.backend.transport, self.stats)
        self.client.transport.producer.pauseProducing()
        self.assertTrue(self.session.reservation.held)
        self.session.end(IDLE_TIMEOUT)
        self.assertIsNone(self.client.transport.producer)
        self.assertIsNone(self.backend.transport.producer)
        self.assertFalse(self.session.reservation.held)
        self.session.reservation.release()  # idempotent


class BackendLostTests(SynchronousTestCase):
    """How the VNC server's connection ended, as its owner hears it."""

    def lose(self, reason: Exception) -> list[object]:
        heard: list[object] = []
        backend = BackendProtocol()
        backend.makeConnection(StringTransport())
        backend.dataReceived(b"RFB 003.008\n")
        backend.on_lost = heard.append
        backend.connectionLost(Failure(reason))
        return heard

    def test_clean_and_unclean(self) -> None:
        """A clean close is 'backend closed' (1000), anything else 'backend error' (1011)."""
        self.assertEqual(self.lose(ConnectionDone()), [BACKEND_CLOSED])
        self.assertEqual(self.lose(ConnectionLost()), [BACKEND_ERROR])


class ActivityTests(SynchronousTestCase):
    """What counts as activity: user input by default, every byte with --idle-activity any."""

    HANDSHAKE = b"RFB 003.008\n\x01\x01"
    UPDATE_REQUEST = b"\x03\x01\x00\x00\x00\x00\x04\x00\x03\x00"
    POINTER = b"\x05\x00\x00\x10\x00\x10"

    def make(self, scanner: ClientActivityScanner | None) -> tuple[Session, Registry]:
        registry = Registry()
        session = Session(
            "s", RECORD, "c", FakePeer(), FakePeer(), 100.0, registry, scanner, reservation(),
            ClosingOwner(),
        )
        return session, registry

    def test_input_counts(self) -> None:
        """A pointer event stamps the supervisor's current time as last activity."""
        session, registry = self.make(ClientActivityScanner())
        registry.now = 150.0
        session.from_client(self.HANDSHAKE + self.UPDATE_REQUEST)
        self.assertEqual(session.last_activity_at, 100.0)
        session.from_client(self.POINTER)
        self.assertEqual(session.last_activity_at, 150.0)

    def test_screen_traffic_does_not_count(self) -> None:
        """Framebuffer updates from the server (a ticking clock) are not activity."""
        session, registry = self.make(ClientActivityScanner())
        registry.now = 150.0
        session.from_backend(b"\x00" * 1000)
        self.assertEqual(session.last_activity_at, 100.0)

    def test_any_mode(self) -> None:
        """Without a scanner every byte either way is activity."""
        session, registry = self.make(None)
        registry.now = 150.0
        session.from_backend(b"\x00")
        self.assertEqual(session.last_activity_at, 150.0)
        registry.now = 160.0
        session.from_client(self.UPDATE_REQUEST)
        self.assertEqual(session.last_activity_at, 160.0)


class BackendProtocolTests(SynchronousTestCase):
    """The backend connection reads only the RFB greeting before the relay starts."""

    def test_greeting_then_pause(self) -> None:
        """After 12 greeting bytes the transport is paused and 'greeted' fires."""
        protocol = BackendProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"RFB 003")
        self.assertNoResult(protocol.greeted)
        protocol.dataReceived(b".008\n")
        self.assertIs(self.successResultOf(protocol.greeted), protocol)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(protocol.greeting, b"RFB 003.008\n")

    def test_not_rfb(self) -> None:
        """Anything but an RFB greeting fails 'greeted'."""
        protocol = BackendProtocol()
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"SSH-2.0-OpenSSH\r\n")
        self.failureResultOf(protocol.greeted)


class FrameHeaderTests(SynchronousTestCase):
    """Backend chunks become single unmasked binary frames."""

    def test_lengths(self) -> None:
        """The three length encodings of RFC 6455 are used at their boundaries."""
        self.assertEqual(binary_frame_header(0), b"\x82\x00")
        self.assertEqual(binary_frame_header(125), b"\x82\x7d")
        self.assertEqual(binary_frame_header(126), b"\x82\x7e\x00\x7e")
        self.assertEqual(binary_frame_header(65535), b"\x82\x7e\xff\xff")
        self.assertEqual(binary_frame_header(65536), b"\x82\x7f" + (65536).to_bytes(8, "big"))


class SendNowTests(SynchronousTestCase):
    """Small writes are flushed at once; bulk and closing transports are left to Twisted."""

    class Descriptor(FileDescriptor):
        connected = True

        def __init__(self) -> None:
            super().__init__(reactor=object())
            self.flushes = 0

        def doWrite(self) -> None:
            self.flushes += 1

    def test_small_write_flushed(self) -> None:
        """A keystroke-sized write is sent in the same reactor pass."""
        transport = self.Descriptor()
        send_now(transport, 6)
        self.assertEqual(transport.flushes, 1)

    def test_bulk_and_closing_left_alone(self) -> None:
        """Bulk writes keep Twisted's pacing; a closing transport is not touched."""
        transport = self.Descriptor()
        send_now(transport, SEND_NOW_LIMIT + 1)
        transport.disconnecting = True
        send_now(transport, 6)
        send_now(StringTransport(), 6)
        self.assertEqual(transport.flushes, 0)
