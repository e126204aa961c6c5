"""The relay on StringTransports: forwarding, byte counts, backpressure, one ending."""

from __future__ import annotations

import errno
import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.tcp import Connection
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
    queue_empty,
    send_now,
    write_now,
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
        self.session.from_client((b"abc",))
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
        session.from_client((self.HANDSHAKE + self.UPDATE_REQUEST,))
        self.assertEqual(session.last_activity_at, 100.0)
        session.from_client((self.POINTER,))
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
        session.from_client((self.UPDATE_REQUEST,))
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


class FdReactor:
    """What a transport asks of its reactor when it queues output: only recorded."""

    def __init__(self) -> None:
        self.writers: set[object] = set()

    def addWriter(self, writer: object) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: object) -> None:
        self.writers.discard(writer)


class ScriptedSocket:
    """A socket that takes C{accept} bytes at the first send, then raises C{error} or takes
    everything; it records what it was given."""

    def __init__(self, accept: int, error: OSError | None = None) -> None:
        self.accept = accept
        self.error = error
        self.sent = b""
        self.calls = 0

    def _take(self, data: bytes) -> int:
        self.calls += 1
        if self.calls == 1:
            if self.error is not None:
                raise self.error
            data = data[: self.accept]
        self.sent += bytes(data)
        return len(data)

    def send(self, data: bytes) -> int:
        return self._take(data)

    def sendmsg(self, buffers: tuple[bytes, ...]) -> int:
        return self._take(b"".join(buffers))


class TLSLayer:
    """Stands for the TLS protocol that Twisted's startTLS puts under a TCP transport."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, data: tuple[bytes, ...]) -> None:
        self.written.extend(data)


class WriteNowTests(SynchronousTestCase):
    """
    Writes go straight to a plain TCP socket when Twisted holds nothing for it, and through
    Twisted otherwise, in order. These tests also pin the parts of Twisted's write queue that
    L{queue_empty} reads (not an API): they fail if a Twisted release changes them.
    """

    def setUp(self) -> None:
        self.near, self.far = socket.socketpair()
        self.addCleanup(self.near.close)
        self.addCleanup(self.far.close)
        self.reactor = FdReactor()
        self.transport = Connection(self.near, Protocol(), self.reactor)
        self.transport.connected = True

    def received(self) -> bytes:
        """Everything the far end can read now."""
        self.far.setblocking(False)
        data = b""
        try:
            while chunk := self.far.recv(1 << 20):
                data += chunk
        except BlockingIOError:
            pass
        return data

    def test_sent_at_once(self) -> None:
        """With nothing queued, the pieces (a frame header and its payload, or the pieces of
        one client read) leave in one send in the same pass: the socket is never registered
        for writing."""
        write_now(self.transport, (b"\x82\x07", b"payload"))
        write_now(self.transport, [b"more"])
        write_now(self.transport, [b"a", b"b" * 2048, b"c"])
        self.assertEqual(self.received(), b"\x82\x07payloadmoreab" + b"b" * 2047 + b"c")
        self.assertEqual(self.reactor.writers, set())
        self.assertTrue(queue_empty(self.transport))

    def test_queue_state_pinned(self) -> None:
        """L{queue_empty} follows Twisted's queue: false once a write waits (in the list of
        pending writes, or half sent in the buffer), true once doWrite has sent it all."""
        self.assertTrue(queue_empty(self.transport))
        self.transport.write(b"x" * 10)
        self.assertFalse(queue_empty(self.transport))
        self.transport.doWrite()
        self.assertTrue(queue_empty(self.transport))
        self.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.transport.write(b"y" * (1 << 20))
        self.transport.doWrite()  # part of it sent, the rest in Twisted's buffer
        self.assertFalse(queue_empty(self.transport))
        self.assertIn(self.transport, self.reactor.writers)

    def test_order_kept_behind_queued_output(self) -> None:
        """A write that finds output queued joins the queue instead of overtaking it; what
        the socket did not take is queued; the far end gets everything in order."""
        self.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        bulk = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
        write_now(self.transport, (b"H1", bulk))
        self.assertFalse(queue_empty(self.transport))
        write_now(self.transport, (b"H2", b"after"))
        write_now(self.transport, (b"last",))
        got = b""
        for _ in range(10_000):
            got += self.received()
            if queue_empty(self.transport):
                break
            self.transport.doWrite()
        got += self.received()
        self.assertEqual(got, b"H1" + bulk + b"H2afterlast")

    def test_partial_sends(self) -> None:
        """Whatever part the socket takes (none, part of a piece, whole pieces), the rest
        goes to Twisted and the bytes arrive whole and in order."""
        for accept in range(11):
            self.transport.socket = sock = ScriptedSocket(accept)
            write_now(self.transport, (b"HD", b"12345", b"678"))
            self.assertEqual(sock.calls, 1)
            self.transport.doWrite()
            self.assertEqual(sock.sent, b"HD12345678", accept)
            self.assertTrue(queue_empty(self.transport))

    def test_more_pieces_than_one_call_takes(self) -> None:
        """More pieces than the kernel takes in one sendmsg (IOV_MAX): Twisted sends them."""
        pieces = [bytes([i & 0xFF]) for i in range(os.sysconf("SC_IOV_MAX") + 1)]
        write_now(self.transport, pieces)
        self.assertIn(self.transport, self.reactor.writers)
        self.transport.doWrite()
        self.assertEqual(self.received(), b"".join(pieces))

    def test_errors_left_to_twisted(self) -> None:
        """A send that would block queues the bytes; a broken connection is left to Twisted's
        own write, which reports it as lost the usual way."""
        self.transport.socket = ScriptedSocket(0, BlockingIOError(errno.EAGAIN, "again"))
        write_now(self.transport, (b"later",))
        self.assertIn(self.transport, self.reactor.writers)
        self.transport.doWrite()
        self.assertEqual(self.transport.socket.sent, b"later")
        broken = ScriptedSocket(0, OSError(errno.EPIPE, "broken pipe"))
        self.transport.socket = broken
        write_now(self.transport, (b"lost",))
        broken.calls = 0  # Twisted's own send fails the same way
        self.assertIs(self.transport.doWrite(), CONNECTION_LOST)

    def test_other_transports_use_twisted(self) -> None:
        """A closing transport, a TLS one and anything that is not a TCP socket (wrappers,
        test transports) get Twisted's own write of the pieces, in order."""
        tls = TLSLayer()
        self.transport.protocol, self.transport.TLS = tls, True  # as startTLS leaves it
        write_now(self.transport, (b"H", b"secret"))
        self.assertEqual(tls.written, [b"H", b"secret"])
        self.assertEqual(self.received(), b"")
        self.transport.TLS = False
        self.transport.disconnecting = True
        write_now(self.transport, (b"H", b"bye"))
        self.assertFalse(queue_empty(self.transport))
        self.assertEqual(self.received(), b"")
        transport = StringTransport()
        write_now(transport, (b"\x82\x07", b"payload"))
        self.assertEqual(transport.value(), b"\x82\x07payload")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.binary(max_size=4),
            st.integers(min_value=0, max_value=64)
            | st.integers(min_value=20_000, max_value=70_000),
            st.sampled_from(["write_now", "twisted", "flush", "read"]),
        ),
        max_size=12,
    )
)
def test_write_now_keeps_order_whatever_the_mix(steps: list[tuple[bytes, int, str]]) -> None:
    """Direct sends, Twisted's own writes (as autobahn's pongs take), flushes and reads of the
    far end in any order, on a socket with a small send buffer: the far end gets every byte
    once, in the order written."""
    near, far = socket.socketpair()
    try:
        near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        far.setblocking(False)
        transport = Connection(near, Protocol(), FdReactor())
        transport.connected = True
        expected, got = b"", bytearray()

        def read() -> None:
            try:
                while chunk := far.recv(1 << 20):
                    got.extend(chunk)
            except BlockingIOError:
                pass

        for step, (header, size, action) in enumerate(steps):
            payload = bytes((step + i) & 0xFF for i in range(min(size, 256))) * (size // 256 + 1)
            payload = payload[:size]
            if action == "write_now":
                write_now(transport, [piece for piece in (header, payload) if piece] or [b"-"])
                expected += header + payload or b"-"
            elif action == "twisted":
                transport.write(header + payload or b"-")
                expected += header + payload or b"-"
            elif action == "flush" and not queue_empty(transport):
                transport.doWrite()
            else:
                read()
        for _ in range(10_000):
            read()
            if queue_empty(transport):
                break
            transport.doWrite()
        read()
        assert bytes(got) == expected
    finally:
        near.close()
        far.close()
