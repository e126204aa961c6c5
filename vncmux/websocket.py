"""The browser side: autobahn's WebSocket server, kept thin.

autobahn parses the upgrade request and answers it; everything else is decided by the
connection's lifecycle (L{vncmux.lifecycle}), to which this protocol only reports events. After
the upgrade, every byte from the browser goes through one L{ClientFrameReader}: binary payload
goes straight to the session (or to the refusing RFB server), and whole control frames go to
autobahn, which answers pings and the closing handshake. Backend chunks go out as one frame
each, header and payload as two buffers of one send (L{write_now}), never joined.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.consoles import NOVNC, ConsoleKind
from vncmux.frames import PROTOCOL_ERROR, ClientFrameReader
from vncmux.handshake import (
    UnsupportedSubprotocol,
    choose_subprotocol,
    client_address,
    find_token,
    is_trusted,
    origin_allowed,
    request_scheme,
)
from vncmux.interfaces import IClientPeer, ISessionObserver
from vncmux.lifecycle import Connection, ConnectionInputs
from vncmux.refusals import (
    BAD_REQUEST,
    CLIENT_CLOSED,
    CLIENT_UNRESPONSIVE,
    ORIGIN_NOT_ALLOWED,
    TOO_MANY_SESSIONS,
    Ending,
    Refused,
)
from vncmux.relay import (
    RelayStats,
    SessionRegistry,
    grow_read_size,
    send_now,
    set_interactive,
    write_now,
)
from vncmux.web import WebChannel, WebSite, http_response

if TYPE_CHECKING:
    from vncmux.admission import Gate
    from vncmux.settings import Settings
    from vncmux.supervisor import Supervisor

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSING = WebSocketProtocol.STATE_CLOSING
CONNECTION_DONE = Failure(ConnectionDone())
_UPGRADE_HEADER = re.compile(rb"\r\nupgrade\s*:", re.IGNORECASE)
_MAX_REQUEST_HEAD = 16 * 1024
_QUOTED = re.compile(r"""(["']).*?(?:\1|$)""")
_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack

#: Pings answered at once, then this many a second: RFC 6455 (5.5.3) lets an endpoint
#: answer only the latest of several pings, and a client that floods pings gets no more.
PONG_BURST = 20
PONG_RATE = 20.0

#: Why the reading of a client is held: its VNC server cannot take more, or the proxy's
#: queue towards the client is over its cap (it must read before it may send more).
_BACKEND_FULL = 1
_OUTPUT_FULL = 2


def binary_frame_header(length: int) -> bytes:
    """The header of one unmasked, final, binary WebSocket frame of C{length} bytes."""
    if length < 126:
        return bytes((0x82, length))
    if length < 65536:
        return _pack_16(0x82, 126, length)
    return _pack_64(0x82, 127, length)


def loggable(reason: str) -> str:
    """
    A handshake failure's reason without anything the client sent: autobahn quotes the
    request line or header values, which may carry the token.
    """
    return _QUOTED.sub('"…"', reason.split(" : ", 1)[0])


def valid_close(code: int | None, reason: bytes | None) -> Ending | None:
    """None for an acceptable close frame from a client, else how to fail the connection."""
    if code is not None and (
        code < 1000
        or code >= 5000
        or (code < 3000 and code not in WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED)
    ):
        return Ending(PROTOCOL_ERROR, f"invalid close code {code}", "error")
    if reason is not None:
        try:
            reason.decode("utf-8")
        except UnicodeDecodeError:
            return Ending(1007, "close reason is not UTF-8", "error")
    return None


def _peer_host(transport: object) -> str:
    """The peer's IP address as the transport names it now ("" for a non-IP peer)."""
    return str(getattr(transport.getPeer(), "host", ""))  # type: ignore[attr-defined]


def _discard(pieces: Sequence[bytes]) -> None:
    """Where client payload goes when no session or refusal wants it."""


@implementer(IClientPeer)
class ConsoleProtocol(WebSocketServerProtocol):
    """One browser connection: autobahn's events turned into lifecycle inputs."""

    factory: ConsoleFactory

    #: autobahn copies the options named in CONFIG_ATTRS from the factory when a connection
    #: is made, then pretty-prints them all for a debug line whether or not debug is logged:
    #: about a tenth of a connection's setup. The protocol copies them itself
    #: (L{connectionMade}) and gives autobahn nothing to copy or print.
    CONFIG_ATTRS: list[str] = []
    _FACTORY_OPTIONS: ClassVar[tuple[str, ...]] = tuple(WebSocketServerProtocol.CONFIG_ATTRS)

    connection: Connection | None = None
    _answer: Deferred[str | None] | None = None
    _subprotocol: str | None = None
    _reader: ClientFrameReader | None = None
    _holds = 0
    _stall: IDelayedCall | None = None
    _ping_payload: bytes | None = None
    _pongs = float(PONG_BURST)
    _pongs_at = 0.0
    _web: WebChannel | None = None

    @property
    def session_id(self) -> str:
        return self.connection.session_id if self.connection is not None else ""

    def _fire(self, event: Callable[[ConnectionInputs], None]) -> None:
        if self.connection is not None:
            self.connection.fire(event)

    def connectionMade(self) -> None:
        factory = self.factory
        factory.supervisor.connections.opened()
        set_interactive(self.transport)
        for name in self._FACTORY_OPTIONS:
            setattr(self, name, getattr(factory, name))
        super().connectionMade()
        session_id = os.urandom(6).hex()
        peer = _peer_host(self.transport)
        trusted = is_trusted(peer, factory.settings.trusted_proxies)
        slot = factory.supervisor.pending.take(peer, limit_client=not trusted)
        if slot is None:
            pending = factory.supervisor.pending
            factory.observer.session_rejected(
                session_id,
                peer,
                TOO_MANY_SESSIONS,
                f"over the pending connection limits ({pending.max_total} in all, "
                f"{pending.max_per_client} per client)",
                None,
            )
            body = b"too many pending connections\n"
            headers = {"Content-Type": "text/plain; charset=utf-8", "Retry-After": "1"}
            self.transport.write(http_response(503, body, headers))  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.connection = Connection(session_id, self, factory, slot, peer)

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        if self._web is not None:
            self._web.connectionLost(reason)
        super().connectionLost(reason)
        self._cancel_stall()
        self._fire(lambda machine: machine.client_lost())
        self.factory.supervisor.connections.closed()

    def dataReceived(self, data: bytes) -> None:
        """
        After the upgrade every byte goes to the frame reader; before it, autobahn reads
        the request, and bytes sent while the answer is pending are a protocol error.
        """
        reader = self._reader
        if reader is not None:
            reader.feed(data)
            transport = self.transport
            if len(data) == getattr(transport, "bufferSize", 0):  # a full read of a socket
                conn = self.connection
                if conn is not None and conn.session is not None:  # an upload to the console
                    grow_read_size(transport, self.factory.supervisor.upload_read_size)
        elif self._web is not None:
            self._web.dataReceived(data)  # type: ignore[no-untyped-call]  # python/mypy#16651
        elif self._answer is not None:
            self._fire(lambda machine: machine.early_data())
        elif self.connection is not None:
            super().dataReceived(data)

    # -- the upgrade request -------------------------------------------------------------------

    def processHandshake(self) -> None:
        """Plain HTTP gets the web root (or 404); one upgrade request, nothing after it."""
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            if len(self.data) > _MAX_REQUEST_HEAD:
                self.failHandshake("request header too large", 431)
            return
        if _UPGRADE_HEADER.search(self.data, 0, end + 2) is None:
            self._hand_over_to_web()
            return
        if len(self.data) > end + 4:
            self.failHandshake("data before the upgrade was answered")
            return
        super().processHandshake()

    def _hand_over_to_web(self) -> None:
        """
        Plain HTTP is no console: the connection leaves the lifecycle (its pending slot goes
        back) and twisted.web's channel gets it, with the bytes read so far. It still counts
        as open for the drain until it closes (at the latest at its deadline).
        """
        self._fire(lambda machine: machine.handed_over())
        data, self.data = self.data, b""
        self.wasClean = True  # plain HTTP, not a failed WebSocket
        channel = self._web = self.factory.web.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        channel.makeConnection(self.transport)  # type: ignore[no-untyped-call]  # python/mypy#16651
        channel.dataReceived(data)  # type: ignore[no-untyped-call]  # python/mypy#16651

    # autobahn waits for a Deferred answer (txaio.as_future), though its annotation has none.
    def onConnect(  # type: ignore[override]
        self, request: ConnectionRequest
    ) -> Deferred[str | None] | str | None:
        conn = self.connection
        assert conn is not None
        # vncmux negotiates no extension, and RFC 6455 (9.1) lets a server ignore offers it
        # does not support: dropping them here keeps autobahn from refusing a malformed
        # permessage-deflate offer after the token was already admitted.
        self.websocket_extensions = []
        settings = self.factory.settings
        # Read again: behind a PROXY-protocol listener the peer is known only once the
        # PROXY header has arrived, after connectionMade (it is the proxy's address there).
        peer = _peer_host(self.transport)
        trusted = is_trusted(peer, settings.trusted_proxies)
        address = client_address(peer, request.headers, settings.trusted_proxies)
        try:
            subprotocol = choose_subprotocol(request.protocols)
        except UnsupportedSubprotocol:
            # A browser drops an upgrade that answers none of its subprotocols, so the
            # RFB-level refusal could never be shown: refuse with HTTP 400 instead. What the
            # client offered is not repeated: it is the client's text, not the log's.
            raise ConnectionDeny(400, "unsupported subprotocol (vncmux speaks binary)") from None
        if not conn.slot.move_to(address):
            refused = Refused(
                TOO_MANY_SESSIONS, f"client {address} is over its pending connection limit"
            )
            conn.client_address = address
            conn.fire(lambda machine: machine.refuse(refused))
            return subprotocol
        conn.client_address = address
        token = find_token(request.params, request.headers)
        scheme = request_scheme(ISSLTransport.providedBy(self.transport), trusted, request.headers)
        if token is None:
            refused = Refused(BAD_REQUEST, "no token in the query or the cookie")
        elif not origin_allowed(
            request.origin, request.headers.get("host"), scheme, settings.allowed_origins
        ):
            refused = Refused(ORIGIN_NOT_ALLOWED, f"origin {request.origin!r} not allowed")
        else:
            self._subprotocol = subprotocol
            answer = self._answer = Deferred()
            conn.fire(lambda machine: machine.admit(token))
            return answer
        conn.fire(lambda machine: machine.refuse(refused))
        return subprotocol

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: object = None) -> None:
        """Every refused upgrade is reported once, and nothing the client sent is logged."""
        reason = loggable(reason)
        self._fire(lambda machine: machine.upgrade_failed(f"HTTP {code}: {reason}"))
        super().failHandshake(reason, code, responseHeaders)

    def onOpen(self) -> None:
        self._reader = ClientFrameReader(_discard, self._control_frame, self._failed)
        self._fire(lambda machine: machine.upgraded())

    # -- frames after the upgrade ----------------------------------------------------------------

    def _control_frame(self, frame: bytes) -> None:
        """A whole, checked control frame: autobahn answers it (pong, close handshake)."""
        super().dataReceived(frame)

    def _failed(self, code: int, why: str) -> None:
        ending = Ending(code, why, "error")
        self._fire(lambda machine: machine.client_failed(ending))

    def onPing(self, payload: bytes) -> None:
        now = self.factory.clock.seconds()
        pongs = min(float(PONG_BURST), self._pongs + (now - self._pongs_at) * PONG_RATE)
        self._pongs_at = now
        if pongs >= 1.0 and self.state == _OPEN:
            pongs -= 1.0
            self.sendPong(payload)  # type: ignore[no-untyped-call]  # python/mypy#16651
        self._pongs = pongs

    def onPong(self, payload: bytes) -> None:
        """Only the answer to the supervisor's own ping counts as a sign of life."""
        conn = self.connection
        if payload and payload == self._ping_payload and conn is not None:
            self._ping_payload = None
            if conn.session is not None:
                conn.session.ping_sent_at = None

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        invalid = valid_close(code, reasonRaw)
        if invalid is not None:
            self._fire(lambda machine: machine.client_failed(invalid))
            return True
        if self.state == _CLOSING:
            # The answer to the proxy's own close frame, which may still wait in the
            # socket's buffer: autobahn would abort the connection and lose it.
            self.wasClean = True
            self.lose()
            return True
        # autobahn passes None for a close frame without a code, though its annotation says not.
        answered = super().onCloseFrame(code, reasonRaw)  # type: ignore[arg-type]
        self._fire(lambda machine: machine.end(CLIENT_CLOSED))
        return answered

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Reported from connectionLost, after autobahn."""

    # -- what the lifecycle asks of the browser side ---------------------------------------------

    def answer_upgrade(self) -> None:
        answer, self._answer = self._answer, None
        assert answer is not None
        answer.callback(self._subprotocol)

    def fail_upgrade(self, status: int, reason: str) -> None:
        self.failHandshake(reason, status)

    def relay_to(self, deliver: Callable[[Sequence[bytes]], None] | None) -> None:
        reader = self._reader
        if reader is not None:
            reader.deliver = deliver or _discard
        if deliver is None:
            # The session is over: read the client's close frame, whatever held it back.
            self._cancel_stall()
            if self._holds:
                self._holds = 0
                self.transport.resumeProducing()  # type: ignore[union-attr]

    def transport_for_relay(self) -> object:
        return self.transport

    def lose(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- IClientPeer, as the relay and the supervisor see the browser ---------------------------

    def write(self, data: bytes) -> None:
        if self.state == _OPEN:
            write_now(self.transport, (binary_frame_header(len(data)), data))

    def pause(self) -> None:
        self._hold(_BACKEND_FULL, True)

    def resume(self) -> None:
        self._hold(_BACKEND_FULL, False)

    def output_blocked(self, blocked: bool) -> None:
        """
        The queue towards this client is over its cap: stop reading it (its pings would
        only queue more), and drop it if it does not drain within the ping timeout.
        """
        self._hold(_OUTPUT_FULL, blocked)
        if not blocked:
            self._cancel_stall()
        elif self._stall is None and self.factory.settings.limits.ping_timeout:
            self._stall = self.factory.clock.callLater(
                self.factory.settings.limits.ping_timeout, self._stalled
            )

    def _stalled(self) -> None:
        self._stall = None
        self._fire(lambda machine: machine.end(CLIENT_UNRESPONSIVE))

    def _cancel_stall(self) -> None:
        stall, self._stall = self._stall, None
        if stall is not None and stall.active():
            stall.cancel()

    def _hold(self, reason: int, on: bool) -> None:
        held = self._holds
        self._holds = held | reason if on else held & ~reason
        if self._holds and not held:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        elif held and not self._holds:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def ping(self) -> None:
        if self.state == _OPEN:
            self._ping_payload = os.urandom(8)
            self.sendPing(self._ping_payload)

    def drop(self) -> None:
        self.abort()

    def close(self, code: int, reason: str) -> None:
        if self.state == _OPEN:
            encoded = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
            self.sendCloseFrame(code, encoded)
            send_now(self.transport, len(encoded) + 4)


class ConsoleFactory(WebSocketServerFactory):
    """Builds L{ConsoleProtocol}s; holds everything they share, set once for all sessions."""

    # Twisted's Factory wants a protocol whose factory is typed Factory[itself]; autobahn's
    # factories are not generic, so no protocol of theirs can say so.
    protocol = ConsoleProtocol  # type: ignore[assignment]

    def __init__(
        self,
        settings: Settings,
        gate: Gate,
        supervisor: Supervisor,
        observer: ISessionObserver,
        clock: IReactorTime,
        reactor: object = None,
        kind: ConsoleKind = NOVNC,
        stats: RelayStats | None = None,
        sessions: SessionRegistry | None = None,
    ) -> None:
        # python/mypy#16653: super() calls miss untyped_calls_exclude.
        super().__init__(reactor=reactor, server=None)  # type: ignore[no-untyped-call]
        #: The console type this listener serves, and how it differs from the others.
        self.kind = kind
        self.settings = settings
        self.gate = gate
        self.supervisor = supervisor
        #: The relay's registry: the supervisor, or the listener's grouped sessions.
        self.sessions: SessionRegistry = sessions if sessions is not None else supervisor
        self.observer = observer
        self.clock = clock
        #: Shared by every listener of the process (the metrics read one set of counters).
        self.stats = stats if stats is not None else RelayStats()
        self.web = WebSite(
            settings.web_root(kind.console_type) if kind.serves_web else None,
            clock,
            settings.web_timeout,
            settings.trusted_proxies,
        )
        self.noisy = False
        self.setProtocolOptions(  # type: ignore[no-untyped-call]  # python/mypy#16651
            webStatus=False,
            # The lifecycle keeps every deadline on the injected clock.
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            failByDrop=False,
            echoCloseCodeReason=True,
            autoFragmentSize=0,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
        )
