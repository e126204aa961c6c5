"""A relaying session: bytes both ways, backpressure both ways, byte counts, one ending.

The session knows its two sides only as L{IPeer}s plus the transports to pause, so the same
relay runs over real sockets, C{StringTransport}s and in-memory fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport
from twisted.internet.tcp import Connection as TCPConnection
from zope.interface import implementer

from vncmux.refusals import Ending

if TYPE_CHECKING:
    from vncmux.consoles import ActivityScanner
    from vncmux.interfaces import IClientPeer, IConsolePeer, IPeer
    from vncmux.supervisor import Reservation
    from vncmux.tokens import TokenRecord

#: Most bytes read from a VNC server at once: one WebSocket frame each.
BACKEND_READ_SIZE = 512 * 1024
#: About the most read from all streaming VNC servers together in one reactor pass. A
#: keystroke's echo waits for the pass it arrives in, so when many consoles stream at once
#: each reads less (L{read_size_for}), down to L{MIN_BACKEND_READ_SIZE}. Measured with 100
#: consoles streaming: 8 MiB and 64 KiB, an echo's p50 25 ms; 4 MiB and 32 KiB, 17 ms, for
#: about 12 % less bulk throughput; 3 MiB, 14 ms and 23 % less. The supervisor applies it
#: while some browser sent input since its last sweep: only then does anyone wait for an echo.
READ_BUDGET = 4 * 1024 * 1024
MIN_BACKEND_READ_SIZE = 32 * 1024
#: Output queued towards a browser before the VNC server is paused (and the most one send
#: call takes). A slow browser costs the proxy at most this plus one read. It is also what
#: a browser's socket reads at once: Twisted has one C{bufferSize} for both.
CLIENT_BUFFER_SIZE = 256 * 1024
#: The most a browser that uploads (a clipboard, a file) reads at once. Each read that
#: comes back full doubles its read size (L{grow_read_size}), up to its share of the read
#: budget; the supervisor's sweep sets it back when the upload ends. Its output cap rises
#: with it (one C{bufferSize}), which is bounded the same way.
MAX_CLIENT_READ_SIZE = 2 * 1024 * 1024

#: Writes up to this size are sent at once (L{send_now}).
SEND_NOW_LIMIT = 16 * 1024

CLIENT_TO_BACKEND = "client_to_backend"
BACKEND_TO_CLIENT = "backend_to_client"


def set_interactive(transport: object) -> None:
    """
    Turn Nagle's algorithm off: keystrokes and small screen updates go out at once instead
    of waiting for the peer's (delayed) ACK. TCP keepalive finds peers that vanished.
    """
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)
        transport.setTcpKeepAlive(True)


def queue_empty(transport: TCPConnection) -> bool:
    """
    Whether Twisted holds nothing unsent for C{transport}. Twisted has no public way to
    ask: this reads its write queue (C{dataBuffer}, C{offset}, C{_tempDataLen}), which
    tests/test_relay.py pins for the Twisted versions setup.py allows.
    """
    return not transport._tempDataLen and transport.offset == len(transport.dataBuffer)


def write_now(transport: object, pieces: Sequence[bytes]) -> None:
    """
    Write C{pieces} in order, straight to the socket when that is safe, else through
    Twisted.

    Twisted queues every write, registers the socket for writability and, on the next
    reactor pass, joins the queue into one bytes object and sends it: two epoll_ctl calls
    and a copy of every byte per write. When the transport is a plain TCP socket with
    nothing queued, one send (sendmsg: the pieces as separate buffers, never joined) does
    it in the same pass; whatever the socket does not take then goes to Twisted, behind
    nothing, so the order holds. Anything else (TLS, a wrapped transport, a closing one,
    output already queued) takes Twisted's own path.
    """
    if (
        isinstance(transport, TCPConnection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and queue_empty(transport)
    ):
        try:
            if len(pieces) == 1:
                sent = transport.socket.send(pieces[0])
            else:
                sent = transport.socket.sendmsg(pieces)
        except OSError:
            # Would block, too many pieces for one call, or the connection failed: Twisted's
            # write path sends it later or meets the same error and loses the connection.
            sent = 0
        if sent:
            pieces = _unsent(pieces, sent)
            if not pieces:
                return
    transport.writeSequence(pieces)  # type: ignore[attr-defined]


def _unsent(pieces: Sequence[bytes], sent: int) -> Sequence[bytes]:
    """What is left of C{pieces} once their first C{sent} bytes went out."""
    for index, piece in enumerate(pieces):
        if sent < len(piece):
            if not sent:
                return pieces[index:]
            return [piece[sent:], *pieces[index + 1 :]]
        sent -= len(piece)
    return ()


def send_now(transport: object, size: int) -> None:
    """
    Send a small write that autobahn queued with Twisted (a close frame) at once instead of
    on the next reactor pass; the relay's own writes go through L{write_now}. Bulk writes
    keep Twisted's own pacing. Only for transports that are sockets themselves (not wrappers
    such as the PROXY-protocol one), and never while the transport is closing.
    """
    if (
        size <= SEND_NOW_LIMIT
        and isinstance(transport, FileDescriptor)
        and transport.connected
        and not transport.disconnecting
    ):
        transport.doWrite()


def read_size_for(streaming: int, budget: int = READ_BUDGET) -> int:
    """The read size of every VNC server while C{streaming} sessions (either way) move a
    full read or more per second: big reads for few, a bounded reactor pass for many."""
    if streaming <= 0:
        return BACKEND_READ_SIZE
    return max(MIN_BACKEND_READ_SIZE, min(BACKEND_READ_SIZE, budget // streaming))


def upload_read_size_for(streaming: int, budget: int = READ_BUDGET) -> int:
    """The most an uploading browser reads at once while C{streaming} sessions stream."""
    return max(CLIENT_BUFFER_SIZE, min(MAX_CLIENT_READ_SIZE, budget // max(1, streaming)))


def grow_read_size(transport: object, most: int) -> None:
    """A read from C{transport} came back full: more is waiting, so read twice as much next
    time, up to C{most}. Fewer, bigger reads mean fewer calls and fewer, bigger sends."""
    size: int = transport.bufferSize  # type: ignore[attr-defined]
    if size < most:
        transport.bufferSize = min(2 * size, most)  # type: ignore[attr-defined]


class SessionRegistry(Protocol):
    """Who keeps the table of live sessions (the supervisor)."""

    @property
    def now(self) -> float:
        """A coarse clock, refreshed by the supervisor's sweep, stamped as activity."""

    def session_started(self, session: Session) -> None: ...

    def session_ended(self, session: Session) -> None: ...


class SessionOwner(Protocol):
    """Who closes the two sides when a session ends (the connection's lifecycle)."""

    def end_session(self, session: Session, ending: Ending) -> None: ...


class RelayStats:
    """Process-wide counters the relay bumps on rare events (read by metrics at scrape time)."""

    __slots__ = ("pauses",)

    def __init__(self) -> None:
        self.pauses = {CLIENT_TO_BACKEND: 0, BACKEND_TO_CLIENT: 0}


@implementer(IPushProducer)
class Throttle:
    """
    Registered on one side's transport as its streaming producer: when that side's send
    buffer fills, reading from the other side pauses (and is counted).
    """

    __slots__ = ("_source", "_stats", "_direction", "_consumer")

    def __init__(
        self,
        source: IPeer,
        stats: RelayStats,
        direction: str,
        consumer: IClientPeer | None = None,
    ) -> None:
        self._source = source
        self._stats = stats
        self._direction = direction
        #: The browser, when it is the side whose queue filled: it is told, so that it can
        #: bound what else it queues (pongs) and drop a client that never drains.
        self._consumer = consumer

    def pauseProducing(self) -> None:
        self._stats.pauses[self._direction] += 1
        self._source.pause()
        if self._consumer is not None:
            self._consumer.output_blocked(True)

    def resumeProducing(self) -> None:
        self._source.resume()
        if self._consumer is not None:
            self._consumer.output_blocked(False)

    def stopProducing(self) -> None:
        """The consumer went away; the session closes the other side itself."""


class Session:
    """
    One console session from the moment it starts relaying.

    Per-packet work is a write and an integer addition; everything else (timeouts, metrics,
    Redis write-back) reads these attributes from outside.
    """

    __slots__ = (
        "id",
        "record",
        "client_address",
        "client",
        "backend",
        "started_at",
        "last_activity_at",
        "bytes_to_backend",
        "bytes_to_client",
        "bytes_to_client_swept",
        "bytes_to_backend_swept",
        "input_since_sweep",
        "ending",
        "ping_sent_at",
        "scanner",
        "reservation",
        "_registry",
        "_owner",
        "_consumers",
    )

    def __init__(
        self,
        session_id: str,
        record: TokenRecord,
        client_address: str,
        client: IClientPeer,
        backend: IConsolePeer,
        now: float,
        registry: SessionRegistry,
        scanner: ActivityScanner | None,
        reservation: Reservation,
        owner: SessionOwner,
    ) -> None:
        self.id = session_id
        self.record = record
        self.client_address = client_address
        self.client = client
        self.backend = backend
        self.started_at = now
        #: On the supervisor's coarse clock, like every later stamp, so it never goes back.
        self.last_activity_at = registry.now
        self.bytes_to_backend = 0
        self.bytes_to_client = 0
        #: C{bytes_to_client} and C{bytes_to_backend} at the supervisor's last sweep: how
        #: fast the session streams, either way.
        self.bytes_to_client_swept = 0
        self.bytes_to_backend_swept = 0
        #: Whether the browser sent input since the supervisor's last sweep (someone may
        #: be waiting for its echo: the read budget holds).
        self.input_since_sweep = False
        self.ending: Ending | None = None
        #: When the supervisor's keepalive ping went out, until the client answers.
        self.ping_sent_at: float | None = None
        #: Finds user input in the client stream; None counts every byte either way.
        self.scanner = scanner
        #: Its place under the session limits, given back when the session ends.
        self.reservation = reservation
        self._registry = registry
        self._owner = owner
        self._consumers: tuple[IConsumer, IConsumer] | None = None

    def start(
        self, client_consumer: IConsumer, backend_consumer: IConsumer, stats: RelayStats
    ) -> None:
        """
        Register each side as the streaming producer of the other, then let bytes flow:
        a full browser buffer pauses reading from the VNC server, and the other way round.
        """
        # Twisted's bufferSize is both a transport's read size and the amount of queued
        # output that pauses its producer. Big reads from the VNC server mean fewer frames
        # and events per byte; the browser side pauses the server once a quarter MiB waits.
        backend_consumer.bufferSize = BACKEND_READ_SIZE  # type: ignore[attr-defined]
        client_consumer.bufferSize = CLIENT_BUFFER_SIZE  # type: ignore[attr-defined]
        client_consumer.SEND_LIMIT = CLIENT_BUFFER_SIZE  # type: ignore[attr-defined]
        client_consumer.registerProducer(
            Throttle(self.backend, stats, BACKEND_TO_CLIENT, self.client), True
        )
        backend_consumer.registerProducer(Throttle(self.client, stats, CLIENT_TO_BACKEND), True)
        self._consumers = (client_consumer, backend_consumer)
        self._registry.session_started(self)
        self.backend.resume()

    def set_read_size(self, size: int) -> None:
        """Read at most C{size} bytes at once from the VNC server (L{read_size_for})."""
        if self._consumers is not None:
            self._consumers[1].bufferSize = size  # type: ignore[attr-defined]

    @property
    def client_read_size(self) -> int:
        """What the browser's socket reads at once (L{grow_read_size}); 0 once ended."""
        if self._consumers is None:
            return 0
        return self._consumers[0].bufferSize  # type: ignore[attr-defined,no-any-return]

    def set_client_read_size(self, size: int) -> None:
        """Read at most C{size} bytes at once from the browser (and queue as much to it)."""
        if self._consumers is not None:
            self._consumers[0].bufferSize = size  # type: ignore[attr-defined]

    def from_client(self, pieces: Sequence[bytes]) -> None:
        """The payload of one client read: to the console in one write, noting user input."""
        scanner = self.scanner
        active = scanner is None
        size = 0
        for piece in pieces:
            size += len(piece)
            if scanner is not None and scanner.feed(piece):
                active = True
        self.bytes_to_backend += size
        if active:
            self.last_activity_at = self._registry.now
            self.input_since_sweep = True
        self.backend.write_sequence(pieces)

    def from_backend(self, data: bytes) -> None:
        """A chunk of the console's stream: one WebSocket frame to the client."""
        self.bytes_to_client += len(data)
        if self.scanner is None:
            self.last_activity_at = self._registry.now
        self.client.write(data)

    def end(self, ending: Ending) -> bool:
        """
        Ask the session's owner to end it (supervisor, admin API, relay errors); returns
        False when it had already ended.
        """
        if self.ending is not None:
            return False
        self._owner.end_session(self, ending)
        return True

    def finish(self, ending: Ending) -> None:
        """
        The session's own part of its end, run once by its owner: no more pausing of either
        side by the other (a paused producer would hold a closing socket open for ever), its
        place under the limits given back, and out of the supervisor's table.
        """
        self.ending = ending
        consumers, self._consumers = self._consumers, None
        try:
            for consumer in consumers or ():
                # A lost transport holds no producer that could keep it open, and Twisted's
                # TLS transport cannot even unregister one once it is lost.
                if getattr(consumer, "connected", True):
                    consumer.unregisterProducer()
        finally:
            self.let_go()

    def let_go(self) -> None:
        """Give the place under the limits back and leave the table (once: both are
        idempotent), whatever else failed while ending."""
        self.reservation.release()
        self._registry.session_ended(self)
