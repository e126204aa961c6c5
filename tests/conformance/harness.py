"""
One browser connection to the real proxy, in memory: no sockets, no real time.

The proxy is assembled by L{vncmux.service.build_console} on a C{MemoryReactorClock}; the
browser side is the factory's protocol on a C{StringTransport}; the VNC server side is whatever
the proxy dialled through C{reactor.connectTCP}, connected to a C{StringTransport} of its own.
Only those seams are used, so the suite holds for any implementation behind them.

A real TCP transport neither delivers bytes while it is paused nor after it was told to close,
and reports the loss of a closing connection in a later reactor pass: L{Harness} does the same
(client bytes wait in a queue until the transport reads again, and L{Harness.deliver_losses}
reports closed connections).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import txaio
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport, _FakeConnector
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.conformance.wsframes import (
    BINARY,
    CLOSE,
    PONG,
    WRITE_MODES,
    Frame,
    close_payload,
    frame,
    parse_server_frames,
    writes,
)
from vncmux.events import Observers, SessionLog
from vncmux.interfaces import ITokenStore
from vncmux.service import Console, build_console
from vncmux.settings import Settings
from vncmux.tokens import MemoryTokenStore, TokenRecord

GREETING = b"RFB 003.008\n"
GOOD_TOKEN = "good"
CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.10", 40000)
#: Trailing slack on top of the close timeout, for timers that round up to a bucket.
TIMER_SLACK = 1.0


def upgrade_request(token: str = GOOD_TOKEN, subprotocol: str = "binary") -> bytes:
    """The HTTP upgrade request noVNC sends (without Origin: a non-browser client)."""
    return (
        f"GET /websockify?token={token} HTTP/1.1\r\n"
        "Host: 127.0.0.1:6080\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {subprotocol}\r\n"
        "\r\n"
    ).encode("ascii")


class TcpLikeTransport(StringTransport):
    """
    A StringTransport that, like Twisted's TCP transports, accepts C{unregisterProducer} with
    no producer registered (autobahn's C{dropConnection} always calls it).
    """

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


@implementer(ITokenStore)
class HeldTokenStore:
    """A token store whose lookups wait until the test answers them."""

    def __init__(self, store: MemoryTokenStore) -> None:
        self._store = store
        self.waiting: list[tuple[str, Deferred[TokenRecord | None]]] = []

    def lookup(self, token: str) -> Deferred[TokenRecord | None]:
        pending: Deferred[TokenRecord | None] = Deferred()
        self.waiting.append((token, pending))
        return pending

    def ping(self) -> Deferred[None]:
        return self._store.ping()

    def answer_all(self) -> None:
        """Answer every waiting lookup from the memory store."""
        waiting, self.waiting = self.waiting, []
        for token, pending in waiting:
            self._store.lookup(token).chainDeferred(pending)


@dataclass
class Backend:
    """One connection the proxy dialled, played by the test as a VNC server."""

    connector: _FakeConnector
    transport: TcpLikeTransport | None = None
    protocol: Any = None
    lost: bool = False

    @property
    def received(self) -> bytes:
        """Every byte the proxy sent to this VNC server."""
        return self.transport.value() if self.transport is not None else b""

    @property
    def closing(self) -> bool:
        """Whether the proxy closed or abandoned this connection (or never completed it)."""
        if self.transport is None:
            return self.connector.stoppedConnecting
        return bool(self.transport.disconnecting)


@implementer(ILogObserver)
@dataclass
class LogCapture:
    """Every log event emitted while a harness runs."""

    events: list[LogEvent] = field(default_factory=list)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def failures(self) -> list[LogEvent]:
        """Events that carry a traceback or are logged as errors."""
        return [
            e
            for e in self.events
            if "log_failure" in e
            or getattr(e.get("log_level"), "name", "") in ("error", "critical")
            or e.get("isError")
        ]


class Harness:
    """The proxy and one browser connection to it, driven step by step."""

    def __init__(
        self,
        settings: Settings | None = None,
        store: ITokenStore | None = None,
        console_type: str = "novnc",
    ) -> None:
        """The browser connects to the listener of C{console_type}, whose console
        C{GOOD_TOKEN} opens (the settings have a serial listener for C{serial})."""
        self.reactor = MemoryReactorClock()
        self.memory_store = MemoryTokenStore()
        self.memory_store.add(GOOD_TOKEN, "127.0.0.1", 5900, console_type=console_type)
        self.store = store if store is not None else self.memory_store
        self.console_type = console_type
        self.settings = settings or Settings(listen="tcp:0", serial_listen="tcp:0", metrics=None)
        self.log = LogCapture()
        self._previous_loop = txaio.config.loop
        # autobahn schedules its own timers through txaio's loop: keep them on the test clock.
        txaio.config.loop = self.reactor
        globalLogPublisher.addObserver(self.log)
        self.console: Console = build_console(
            self.settings, self.store, self.reactor, Observers([SessionLog()])
        )
        self.protocol: Any = None
        self.transport = TcpLikeTransport(peerAddress=CLIENT_ADDRESS)
        self.client_lost = False
        self._unread: deque[bytes] = deque()
        self._opened_at: int | None = None
        self.backends: list[Backend] = []

    def stop(self) -> None:
        """Undo what the constructor changed outside this object."""
        globalLogPublisher.removeObserver(self.log)
        txaio.config.loop = self._previous_loop

    @classmethod
    def for_test(cls, test: SynchronousTestCase, **kwargs: Any) -> Harness:
        """A harness stopped, with its losses delivered, when C{test} ends."""
        harness = cls(**kwargs)
        test.addCleanup(harness.stop)
        test.addCleanup(harness.deliver_losses)
        return harness

    # -- the browser side ----------------------------------------------------------------------

    def connect(self) -> None:
        """The browser's TCP connection is accepted."""
        factory = self.console.factories[self.console_type]
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6080))
        self.protocol.makeConnection(self.transport)

    def send(self, chunks: Iterable[bytes]) -> None:
        """The browser writes C{chunks}; each becomes one read, when the proxy reads."""
        self._unread.extend(c for c in chunks if c)
        self.pump()

    def send_frames(self, frames: Iterable[bytes], mode: str) -> None:
        """The browser writes C{frames}, cut into reads as C{mode} says."""
        self.send(writes(list(frames), mode))

    def pump(self) -> None:
        """Deliver queued browser bytes while the proxy reads from the browser."""
        transport = self.transport
        while (
            self._unread
            and not self.client_lost
            and not transport.disconnecting
            and transport.producerState == "producing"
        ):
            self.protocol.dataReceived(self._unread.popleft())

    @property
    def unread(self) -> int:
        """Browser bytes the proxy has not read (paused, or closed before it read them)."""
        return sum(map(len, self._unread))

    @property
    def output(self) -> bytes:
        """Everything the proxy wrote to the browser."""
        return self.transport.value()

    def http_response(self) -> bytes:
        """The head of the proxy's HTTP answer (empty while there is none)."""
        head, sep, _ = self.output.partition(b"\r\n\r\n")
        return head + sep if sep else b""

    def upgraded(self) -> bool:
        """Whether the proxy answered 101 Switching Protocols."""
        return self.http_response().startswith(b"HTTP/1.1 101 ")

    def frames(self) -> list[Frame]:
        """Every frame the proxy sent after its 101 answer."""
        head = self.http_response()
        assert head.startswith(b"HTTP/1.1 101 "), f"no 101 answer: {self.output[:200]!r}"
        return parse_server_frames(self.output[len(head) :])

    def frames_since_open(self) -> list[Frame]:
        """The frames after the RFB greeting that L{open} checked."""
        assert self._opened_at is not None, "not opened"
        return self.frames()[self._opened_at :]

    def pongs(self) -> list[bytes]:
        """Payloads of the pongs the proxy sent since the session opened."""
        return [f.payload for f in self.frames_since_open() if f.opcode == PONG]

    def data_frames(self) -> list[Frame]:
        """Data frames since the session opened."""
        return [f for f in self.frames_since_open() if f.is_data]

    # -- the VNC server side ------------------------------------------------------------------

    def dialled(self) -> list[tuple[str, int]]:
        """Every address the proxy dialled."""
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def answer_dial(self, index: int = -1, greeting: bytes = GREETING) -> Backend:
        """The VNC server of dial C{index} (the last one) accepts and sends C{greeting}."""
        assert self.reactor.tcpClients, "the proxy dialled nothing"
        index %= len(self.reactor.tcpClients)
        host, port, factory, *_ = self.reactor.tcpClients[index]
        backend = Backend(self.reactor.connectors[index])
        self.backends.append(backend)
        backend.transport = TcpLikeTransport(peerAddress=IPv4Address("TCP", host, port))
        backend.protocol = factory.buildProtocol(backend.transport.getPeer())
        backend.protocol.makeConnection(backend.transport)
        if greeting:
            backend.protocol.dataReceived(greeting)
        self.pump()
        return backend

    def answer_pending_dials(self) -> None:
        """Every dial the proxy neither abandoned nor saw answered connects and greets."""
        for index in range(len(self.backends), len(self.reactor.tcpClients)):
            connector = self.reactor.connectors[index]
            if connector.stoppedConnecting:
                self.backends.append(Backend(connector))
            else:
                self.answer_dial(index)

    @property
    def backend(self) -> Backend:
        """The only VNC server connection."""
        assert len(self.backends) == 1, f"{len(self.backends)} backend connections"
        return self.backends[0]

    # -- phases -------------------------------------------------------------------------------

    def open(self, token: str = GOOD_TOKEN) -> Backend:
        """
        Connect, upgrade, let the VNC server greet: the session relays. Checks the 101 and
        that the greeting reached the browser as one binary frame.
        """
        self.connect()
        self.send([upgrade_request(token)])
        assert self.dialled() == [("127.0.0.1", 5900)], self.dialled()
        backend = self.answer_dial()
        frames = self.frames()
        assert frames[:1] == [Frame(True, 0, BINARY, GREETING)], frames
        self._opened_at = 1
        return backend

    def open_refused(self, token: str = "unknown") -> None:
        """Connect and upgrade with a token the store does not know: the refusal phase."""
        self.connect()
        self.send([upgrade_request(token)])
        frames = self.frames()
        assert frames[:1] == [Frame(True, 0, BINARY, GREETING)], frames
        self._opened_at = 1

    def advance(self, seconds: float) -> None:
        """Let C{seconds} pass on the proxy's clock."""
        self.reactor.advance(seconds)
        self.pump()

    def wait_close_timeout(self) -> None:
        """Let the close timeout pass (plus timer slack)."""
        self.advance(self.settings.close_timeout + TIMER_SLACK)

    def deliver_losses(self) -> None:
        """Report every connection the proxy closed as lost, as the reactor would."""
        if self.protocol is not None and self.transport.disconnecting and not self.client_lost:
            self.client_lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))
        for backend in self.backends:
            transport = backend.transport
            if transport is not None and transport.disconnecting and not backend.lost:
                backend.lost = True
                backend.protocol.connectionLost(Failure(ConnectionDone()))

    def client_closes_tcp(self) -> None:
        """The browser's TCP connection goes away."""
        if not self.client_lost:
            self.client_lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def why_backend_open(self) -> str:
        """
        Why a check that the VNC server connection is closing failed: whether it closes once
        the browser connection is lost, only after the close timeout, or not even then (this
        delivers the losses and advances the clock).
        """
        message = "the VNC server connection is not being closed"
        self.deliver_losses()
        if all(b.closing for b in self.backends):
            return message + " (it closes once the browser connection is lost)"
        self.wait_close_timeout()
        self.deliver_losses()
        if all(b.closing for b in self.backends):
            return message + " (it closes only after the close timeout)"
        return message + " (not even after the close timeout and the browser connection's loss)"

    # -- checks --------------------------------------------------------------------------------

    def close_frames(self) -> list[Frame]:
        """The close frames the proxy sent."""
        return [f for f in self.frames() if f.opcode == CLOSE]


class ConformanceCase:
    """
    Checks shared by the conformance modules, mixed into a C{SynchronousTestCase} once per
    write mode by L{per_write_mode}.
    """

    #: How the browser's frames are cut into reads (one of L{WRITE_MODES}).
    mode: str

    h: Harness

    def setUp(self) -> None:
        self.h = Harness.for_test(self)  # type: ignore[arg-type]
        self.addCleanup(self.assertNothingLogged)  # type: ignore[attr-defined]

    def open(self) -> Backend:
        """A relaying session."""
        return self.h.open()

    def send(self, *frames: bytes) -> None:
        """The browser sends C{frames}, cut into reads by this class's write mode."""
        self.h.send_frames(frames, self.mode)

    def assertNothingLogged(self) -> None:
        """No traceback and no error in the log."""
        failures = self.h.log.failures()
        assert not failures, "errors logged: " + "; ".join(map(_describe, failures))

    def assertRelaying(self, relayed: bytes) -> None:
        """The VNC server got exactly C{relayed}; the session is open on both sides."""
        h = self.h
        assert h.backend.received == relayed, _diff(h.backend.received, relayed)
        assert not h.close_frames(), f"the proxy closed: {h.close_frames()}"
        assert not h.transport.disconnecting, "the browser connection is closing"
        assert not h.backend.closing, "the VNC server connection is closing"
        assert len(h.console.supervisor.sessions) == 1, h.console.supervisor.sessions

    def assertEchoed(self, data: bytes) -> None:
        """What the VNC server sends back reaches the browser as binary frames, in order."""
        h = self.h
        before = len(h.data_frames())
        h.backend.protocol.dataReceived(data)
        frames = h.data_frames()[before:]
        assert all(f.opcode == BINARY and f.fin for f in frames), frames[:3]
        echoed = b"".join(f.payload for f in frames)
        assert echoed == data, _diff(echoed, data)

    def closeCleanly(self, code: int = 1000) -> None:
        """
        The browser closes with C{code}: the proxy answers with a close frame (the same code),
        closes the browser connection and the VNC server connection, and forgets the session.
        """
        relayed = self.h.backend.received
        self.send(frame(close_payload(code), CLOSE))
        self.assertClientCloseAnswered({code}, relayed)

    def assertClientCloseAnswered(self, codes: set[int | None], relayed: bytes) -> None:
        """
        The browser's close frame was answered once, with one of C{codes} (None: an empty
        close frame), as the last frame; the proxy closed TCP; the VNC server got exactly
        C{relayed} and is being closed; nothing is left of the session.
        """
        h = self.h
        closes = h.close_frames()
        assert len(closes) == 1, f"close frames sent: {closes}"
        assert h.frames()[-1] == closes[0], f"frames after the close: {h.frames()[-3:]}"
        assert closes[0].close_code in codes, f"answered {closes[0]}, expected {codes}"
        assert h.transport.disconnecting, "the proxy did not close the browser connection"
        assert h.backend.received == relayed, _diff(h.backend.received, relayed)
        assert h.backend.closing, h.why_backend_open()
        self.assertForgotten()

    def assertFailed(self, code: int, relayed: bytes) -> None:
        """
        The proxy failed the connection with C{code}: its last frame is a close frame with
        that code and no data frame follows the first close frame; the VNC server got exactly
        C{relayed} and is being closed; the browser connection is closed once the close
        timeout has passed; nothing is left of the session.
        """
        h = self.h
        frames = h.frames()
        closes = [i for i, f in enumerate(frames) if f.opcode == CLOSE]
        assert closes, f"no close frame; frames since open: {h.frames_since_open()[-5:]}"
        assert frames[-1].opcode == CLOSE, f"frames after the close: {frames[closes[0] :]}"
        assert frames[-1].close_code == code, f"closed with {frames[-1]}, expected {code}"
        after = [f for f in frames[closes[0] :] if f.is_data]
        assert not after, f"data frames after the close: {after[:3]}"
        received = h.backend.received if h.backends else b""
        assert received == relayed, _diff(received, relayed)
        assert all(b.closing for b in h.backends), h.why_backend_open()
        h.wait_close_timeout()
        assert h.transport.disconnecting, "the browser connection is still open"
        self.assertForgotten()

    def assertForgotten(self) -> None:
        """Once both connections are gone, no session and no reservation is left."""
        h = self.h
        h.deliver_losses()
        supervisor = h.console.supervisor
        assert supervisor.sessions == {}, supervisor.sessions
        assert supervisor.reserved == 0, f"{supervisor.reserved} reservations left"


def _describe(event: LogEvent) -> str:
    """One log event on one line: its text, and the exception it carries."""
    failure = event.get("log_failure")
    error = f" [{failure.type.__name__}: {failure.getErrorMessage()}]" if failure else ""
    return f"{formatEvent(event)!r}{error}"


def _diff(got: bytes, expected: bytes) -> str:
    """A short description of how two byte strings differ."""
    if got == expected:
        return "equal"
    common = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )
    return (
        f"got {len(got)} bytes, expected {len(expected)}; first difference at {common}: "
        f"{got[common : common + 16]!r} != {expected[common : common + 16]!r}"
    )


def per_write_mode(cases: type) -> dict[str, type]:
    """
    One test class per write mode for the mixin C{cases} (named ``...Cases``): frames in one
    read, one read per frame, one byte per read. Put them in the module with
    ``globals().update(per_write_mode(...))``.
    """
    base = cases.__name__.removesuffix("Cases")
    made = {}
    for mode in WRITE_MODES:
        name = base + "".join(w.title() for w in mode.split("_")) + "Tests"
        made[name] = type(
            name,
            (cases, SynchronousTestCase),
            {
                "mode": mode,
                "__module__": cases.__module__,
                "__qualname__": name,
                "__doc__": f"{cases.__doc__.strip()} (write mode: {mode})",
            },
        )
    return made
