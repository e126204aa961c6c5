"""The browser side: autobahn's WebSocket server, kept thin.

A connection goes through three phases:
  1. handshake: ``onConnect`` checks subprotocol, token, Origin, then asks the L{Gate} for the
     token's record and a greeted backend; the upgrade completes either way;
  2. refusal: a refused connection answers as a refusing VNC server (RFB greeting, then zero
     security types and the reason) and closes with the code of DESIGN.md section 3;
  3. relay: binary frames go to the backend as they are decoded; backend chunks go out as one
     frame each, header and payload written together without joining them first.
"""

from __future__ import annotations

import os
import re
import struct
from typing import TYPE_CHECKING

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.frames import BinaryFrameReader
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
from vncmux.refusals import (
    BAD_REQUEST,
    INTERNAL_ERROR,
    ORIGIN_NOT_ALLOWED,
    TEXT_FRAME,
    Refusal,
    Refused,
)
from vncmux.relay import RelayStats, Session, send_now, set_interactive
from vncmux.rfb import ClientActivityScanner, RefusingServer
from vncmux.web import StaticFiles

if TYPE_CHECKING:
    from vncmux.admission import Gate
    from vncmux.backend import BackendProtocol
    from vncmux.settings import Settings
    from vncmux.supervisor import Supervisor
    from vncmux.tokens import TokenRecord

_OPEN = WebSocketProtocol.STATE_OPEN
CONNECTION_DONE = Failure(ConnectionDone())
_UPGRADE_HEADER = re.compile(rb"\r\nupgrade\s*:", re.IGNORECASE)
_MAX_REQUEST_HEAD = 16 * 1024
_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack


def binary_frame_header(length: int) -> bytes:
    """The header of one unmasked, final, binary WebSocket frame of C{length} bytes."""
    if length < 126:
        return bytes((0x82, length))
    if length < 65536:
        return _pack_16(0x82, 126, length)
    return _pack_64(0x82, 127, length)


@implementer(IClientPeer)
class ConsoleProtocol(WebSocketServerProtocol):
    """One browser connection."""

    _log = Logger()
    factory: ConsoleFactory

    session_id = ""
    client_address = ""
    token_id: str | None = None
    session: Session | None = None
    _admission: Deferred[tuple[TokenRecord, BackendProtocol]] | None = None
    _backend: BackendProtocol | None = None
    _refusal: Refusal | None = None
    _refuser: RefusingServer | None = None
    _refusal_timer: IDelayedCall | None = None
    _reader: BinaryFrameReader | None = None
    _reported = False
    _gone = False

    def connectionMade(self) -> None:
        self.factory.supervisor.connections.opened()
        set_interactive(self.transport)
        super().connectionMade()

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        super().connectionLost(reason)
        self.factory.supervisor.connections.closed()

    def dataReceived(self, data: bytes) -> None:
        """
        While relaying, binary data frames take the fast path straight to the session;
        autobahn gets everything else (handshake, control and text frames) and any frame it
        has begun reading.
        """
        reader = self._reader
        if reader is None or self.state != _OPEN or self.current_frame is not None or self.data:
            super().dataReceived(data)
            return
        reader.in_message = self.inside_message
        rest = reader.feed(data)
        if rest:
            self.inside_message = reader.in_message
            super().dataReceived(rest)

    # -- plain HTTP on the same port ---------------------------------------------------------

    def processHandshake(self) -> None:
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            if len(self.data) > _MAX_REQUEST_HEAD:
                self.failHandshake("request header too large", 431)
            return
        if _UPGRADE_HEADER.search(self.data, 0, end + 2) is None:
            request_line = self.data[: self.data.find(b"\r\n")].decode("latin-1").split()
            method, target = (request_line + ["", ""])[:2]
            self.sendData(self.factory.web.respond(method, target or "/"))
            self.wasClean = True  # a plain HTTP answer, not a failed WebSocket
            self.dropConnection(abort=False)
            return
        super().processHandshake()

    # -- handshake ---------------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Deferred[str | None] | str | None:
        factory = self.factory
        self.session_id = os.urandom(6).hex()
        peer_host = getattr(self.transport.getPeer(), "host", "")  # type: ignore[union-attr]
        trusted = is_trusted(peer_host, factory.settings.trusted_proxies)
        self.client_address = client_address(peer_host, request.headers, trusted)
        try:
            subprotocol = choose_subprotocol(request.protocols)
        except UnsupportedSubprotocol as e:
            # A browser drops an upgrade that answers none of its subprotocols, so the
            # RFB-level refusal could never be shown: refuse with HTTP 400 instead.
            self._report_refusal(BAD_REQUEST, f"unsupported subprotocols: {e}")
            raise ConnectionDeny(400, "unsupported subprotocol (vncmux speaks 'binary')") from None
        token = find_token(request.params, request.headers)
        scheme = request_scheme(ISSLTransport.providedBy(self.transport), trusted, request.headers)
        if token is None:
            self._refuse(BAD_REQUEST, "no token in the query or the cookie")
            return subprotocol
        if not origin_allowed(
            request.origin, request.headers.get("host"), scheme, factory.settings.allowed_origins
        ):
            self._refuse(ORIGIN_NOT_ALLOWED, f"origin {request.origin!r} not allowed")
            return subprotocol
        answer: Deferred[str | None] = Deferred()
        admission = self._admission = factory.gate.admit(token, self.client_address)
        admission.addCallbacks(self._admitted, self._not_admitted)
        admission.addBoth(lambda _: None if self._gone else answer.callback(subprotocol))
        return answer

    def _admitted(self, result: tuple[TokenRecord, BackendProtocol]) -> None:
        self._admission = None
        record, backend = result
        self.token_id = record.token_id
        factory = self.factory
        if self._gone:
            backend.close()
            factory.supervisor.release(record, self.client_address)
            return
        self._backend = backend
        self.session = Session(
            self.session_id,
            record,
            self.client_address,
            self,
            backend,
            factory.clock.seconds(),
            factory.supervisor,
            ClientActivityScanner() if factory.settings.idle_activity == "input" else None,
        )

    def _not_admitted(self, failure: Failure) -> None:
        self._admission = None
        if self._gone:
            return
        if failure.check(Refused):
            refused: Refused = failure.value  # type: ignore[assignment]
            self.token_id = refused.token_id
            self._refuse(refused.refusal, refused.detail)
        else:
            self._log.failure("admission of session {sid} failed", failure, sid=self.session_id)
            self._refuse(INTERNAL_ERROR, f"internal error: {failure.getErrorMessage()}")

    def _refuse(self, refusal: Refusal, detail: str) -> None:
        self._refusal = refusal
        self._report_refusal(refusal, detail)

    def _report_refusal(self, refusal: Refusal, detail: str) -> None:
        self._reported = True
        self.factory.observer.session_rejected(
            self.session_id, self.client_address, refusal, detail, self.token_id
        )

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: object = None) -> None:
        """A malformed upgrade that autobahn refuses itself is a bad request too: count and
        log it like the others (once: a denied subprotocol was reported already)."""
        if not self._reported:
            if not self.session_id:
                self.session_id = os.urandom(6).hex()
                self.client_address = getattr(self.transport.getPeer(), "host", "")  # type: ignore[union-attr]
            self._report_refusal(BAD_REQUEST, f"HTTP {code}: {reason}")
        super().failHandshake(reason, code, responseHeaders)

    # -- after the upgrade ---------------------------------------------------------------------

    def onOpen(self) -> None:
        if self._refusal is not None:
            self._refuser = RefusingServer(self._refusal.reason)
            self.write(self._refuser.greeting())
            self._refusal_timer = self.factory.clock.callLater(
                self.factory.settings.refusal_timeout, self._refusal_timed_out
            )
            return
        session, backend = self.session, self._backend
        assert session is not None and backend is not None
        if backend.greeting:
            session.from_backend(backend.greeting)
        backend.session = session
        self._reader = BinaryFrameReader(session.from_client)
        session.start(self.transport, backend.transport, self.factory.stats)  # type: ignore[arg-type]

    def onMessageBegin(self, isBinary: bool) -> None:
        if isBinary:
            return
        if self.session is not None:
            self.session.end(TEXT_FRAME)
        else:
            self.close(TEXT_FRAME.code, TEXT_FRAME.reason)

    def onMessageFrameBegin(self, length: int) -> None:
        """Frames are streamed, never assembled, so no size limit is needed here."""

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.state != _OPEN:
            return
        session = self.session
        if session is not None:
            session.from_client(payload)
        elif self._refuser is not None:
            answer = self._refuser.receive(payload)
            if answer is not None:
                self._finish_refusal(answer)

    def onMessageFrameEnd(self) -> None:
        """Nothing to assemble."""

    def onMessageEnd(self) -> None:
        """Nothing to deliver: every byte went out as it was decoded."""

    def _finish_refusal(self, answer: bytes) -> None:
        assert self._refusal is not None
        self._cancel_refusal_timer()
        self.write(answer)
        self.close(self._refusal.code, self._refusal.reason)

    def _refusal_timed_out(self) -> None:
        self._refusal_timer = None
        self.dropConnection(abort=True)

    def _cancel_refusal_timer(self) -> None:
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
            self._refusal_timer = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._gone = True
        self._cancel_refusal_timer()
        if self._admission is not None:
            self._admission.cancel()
        if self.session is not None:
            self.session.client_lost()

    # -- IPeer, as the relay sees the browser ------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.state == _OPEN:
            size = len(data)
            self.transport.writeSequence((binary_frame_header(size), data))  # type: ignore[union-attr]
            send_now(self.transport, size)

    def pause(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def ping(self) -> None:
        if self.state == _OPEN:
            self.sendPing()

    def onPong(self, payload: bytes) -> None:
        if self.session is not None:
            self.session.ping_sent_at = None

    def drop(self) -> None:
        self.dropConnection(abort=True)

    def close(self, code: int, reason: str) -> None:
        if self.state == _OPEN:
            self.sendCloseFrame(code, reason.encode("utf-8")[:123])


class ConsoleFactory(WebSocketServerFactory):
    """Builds L{ConsoleProtocol}s; holds everything they share, set once for all sessions."""

    protocol = ConsoleProtocol

    def __init__(
        self,
        settings: Settings,
        gate: Gate,
        supervisor: Supervisor,
        observer: ISessionObserver,
        clock: IReactorTime,
        reactor: object = None,
    ) -> None:
        super().__init__(reactor=reactor)
        self.settings = settings
        self.gate = gate
        self.supervisor = supervisor
        self.observer = observer
        self.clock = clock
        self.stats = RelayStats()
        self.web = StaticFiles(settings.web)
        self.noisy = False
        self.setProtocolOptions(
            webStatus=False,
            openHandshakeTimeout=settings.handshake_timeout,
            closeHandshakeTimeout=settings.close_timeout,
            failByDrop=False,
            autoFragmentSize=0,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
        )
