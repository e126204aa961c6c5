"""Dialing the console a token names (a VNC server or a serial port), and the protocol on
that connection.

The backend connection is held paused after the server's RFB greeting until the relay starts,
as Twisted's portforward does, so nothing is read that has nowhere to go.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.interfaces import IConsolePeer
from vncmux.refusals import (
    BACKEND_CLOSED,
    BACKEND_ERROR,
    CONSOLE_AUTH_FAILED,
    CONSOLE_UNREACHABLE,
    Ending,
    Refused,
)
from vncmux.relay import set_interactive, write_now
from vncmux.rfbsecurity import SecurityPolicy, ServerSecurity, TlsMode
from vncmux.tls import VencryptTLS
from vncmux.tokens import TokenRecord, format_target
from vncmux.tunnel import ConnectTunnel

if TYPE_CHECKING:
    from vncmux.relay import Session
    from vncmux.supervisor import ConnectionTracker

#: Length of the RFB ProtocolVersion message every VNC server sends first.
RFB_GREETING_LENGTH = 12


class NotAVncServer(Exception):
    """The backend answered, but not with an RFB greeting."""


@implementer(IConsolePeer)
class BackendProtocol(Protocol):
    """
    The connection to a console.

    Before the relay starts it goes through a CONNECT tunnel when the record names one
    (L{ConnectTunnel}), then, with C{rfb_greeting}, reads the 12-byte RFB greeting (to tell a
    VNC server from a wrong port), or, with the security proxy, negotiates security with the
    server up to its SecurityResult (L{ServerSecurity}); then it pauses. A serial port says
    nothing first: without C{rfb_greeting} it pauses as soon as it is connected. Afterwards
    every chunk goes straight to the session.
    """

    def __init__(
        self,
        tracker: ConnectionTracker | None = None,
        tunnel: ConnectTunnel | None = None,
        security: ServerSecurity | None = None,
        tls: VencryptTLS | None = None,
        rfb_greeting: bool = True,
    ) -> None:
        self.greeted: Deferred[BackendProtocol] = Deferred()
        self.tracker = tracker
        self.rfb_greeting = rfb_greeting
        #: What the browser gets first when the relay starts: the server's greeting, or with
        #: the security proxy whatever the server sent after its SecurityResult.
        self.greeting = b""
        self.session: Session | None = None
        #: Told how the connection ended, once someone owns it (after admission).
        self.on_lost: Callable[[Ending], None] | None = None
        self._tunnel = tunnel
        #: The security proxy's negotiation with the server; kept once done (its outcome
        #: tells the lifecycle to play the browser's side of the handshake).
        self.security = security
        self._tls = tls
        self._closing = False

    def connectionMade(self) -> None:
        set_interactive(self.transport)
        if self.tracker is not None:
            self.tracker.opened()
        if self._tunnel is not None:
            self.transport.write(self._tunnel.request())  # type: ignore[union-attr]
        elif not self.rfb_greeting:
            self._ready()

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            session.from_backend(data)
            return
        if self.greeted.called:
            # Bytes already read when the pause came (a TLS record holds several chunks);
            # after close() nothing is kept.
            if not self._closing:
                self.greeting += data
            return
        try:
            self._before_relay(data)
        except Refused as refused:
            self.greeted.errback(refused)

    def _before_relay(self, data: bytes) -> None:
        """Tunnel answer, then greeting or security handshake; Refused when they fail."""
        if self._tunnel is not None:
            rest = self._tunnel.receive(data)
            if rest is None:
                return
            self._tunnel = None
            data = rest
            if not self.rfb_greeting:
                self.greeting = data
                self._ready()
                return
        security = self.security
        if security is not None:
            self._negotiate(security, data)
            return
        self.greeting += data
        if len(self.greeting) < RFB_GREETING_LENGTH:
            return
        self.transport.pauseProducing()  # type: ignore[union-attr]
        if self.greeting.startswith(b"RFB ") and self.greeting[11:12] == b"\n":
            self.greeted.callback(self)
        else:
            self.greeted.errback(NotAVncServer(repr(self.greeting[:12])))

    def _ready(self) -> None:
        """Connected (and through the tunnel): paused until the relay starts."""
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.greeted.callback(self)

    def _negotiate(self, security: ServerSecurity, data: bytes) -> None:
        answer = security.receive(data)
        if answer:
            self.transport.write(answer)  # type: ignore[union-attr]
        if security.tls_wanted is not None:
            self._start_tls(security.tls_wanted)
            security.tls_started()
        if security.done:
            self.greeting = security.leftover
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.greeted.callback(self)

    def _start_tls(self, mode: str) -> None:
        tls = self._tls
        creator = None
        if tls is not None:
            creator = tls.x509 if mode == TlsMode.X509 else tls.anonymous
        if creator is None:
            raise Refused(CONSOLE_AUTH_FAILED, "VeNCrypt X509 chosen without --vencrypt-ca-certs")
        self.transport.startTLS(creator)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.tracker is not None:
            self.tracker.closed()
        if not self.greeted.called:
            failure = reason or Failure(ConnectionError("connection lost"))
            security = self.security
            if security is not None and security.negotiated.startswith("VeNCrypt"):
                failure = Failure(
                    Refused(
                        CONSOLE_AUTH_FAILED,
                        f"{security.negotiated} with the VNC server failed:"
                        f" {type(failure.value).__name__}: {failure.getErrorMessage()}",
                    )
                )
            self.greeted.errback(failure)
        elif self.on_lost is not None:
            clean = reason is None or reason.check(ConnectionDone) is not None
            self.on_lost(BACKEND_CLOSED if clean else BACKEND_ERROR)

    # IConsolePeer, as the relay sees the VNC server

    def write_sequence(self, pieces: Sequence[bytes]) -> None:
        write_now(self.transport, pieces)

    def pause(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def close(self, code: int = 1000, reason: str = "") -> None:
        """
        Close once pending writes are flushed; TCP has no close code to carry. Reading goes
        on (what arrives is dropped) so that a paused connection still sees the peer's end:
        over VeNCrypt's TLS the close waits for the server's close_notify.
        """
        if self.transport is not None:
            self.session = None
            self._closing = True
            self.transport.resumeProducing()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def abort(self) -> None:
        """Close at once, dropping what is still queued (a close that took too long)."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def endpoint_for(
    reactor: IReactorTCP, host: str, port: int, timeout: float
) -> IStreamClientEndpoint:
    """A client endpoint for a token's target: IP literals skip name resolution."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


class _OneConnection(Factory):
    """Twisted's C{connectProtocol}, without its two log lines ("Starting factory",
    "Stopping factory") for every VNC connection."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


class BackendDialer:
    """
    Connects to a target and, with C{rfb_greeting}, waits for its RFB greeting (through the
    record's tunnel, and with the security handshake when the security proxy steps in), all
    within one timeout.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        timeout: float,
        tracker: ConnectionTracker | None = None,
        security: SecurityPolicy | None = None,
        tls: VencryptTLS | None = None,
        rfb_greeting: bool = True,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.timeout = timeout
        self._tracker = tracker
        self.security = security or SecurityPolicy()
        self._tls = tls
        self._rfb_greeting = rfb_greeting

    def dial(
        self, host: str, port: int, record: TokenRecord | None = None
    ) -> Deferred[BackendProtocol]:
        """
        Fire with a greeted (or, without an RFB greeting, connected), paused
        L{BackendProtocol}, or fail with L{Refused} whose detail says why (4502). C{record}
        brings the tunnel path and the password. Cancelling stops the attempt.
        """
        tunnel = security = None
        if record is not None:
            if record.internal_access_path:
                host_header = format_target(record.host, record.port)
                try:
                    tunnel = ConnectTunnel(record.internal_access_path, host_header)
                except ValueError as e:
                    return fail(Refused(CONSOLE_UNREACHABLE, f"internal_access_path: {e}"))
            if self._rfb_greeting and self.security.engaged(record.password):
                security = ServerSecurity(self.security, record.password)
        protocol = BackendProtocol(self._tracker, tunnel, security, self._tls, self._rfb_greeting)
        endpoint = endpoint_for(self._reactor, host, port, self.timeout)
        connecting = endpoint.connect(_OneConnection(protocol))
        dialing = connecting.addCallback(lambda _: protocol.greeted)
        dialing.addTimeout(self.timeout, self._clock)

        def unreachable(failure: Failure) -> Failure:
            transport = protocol.transport
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]
            if failure.check(CancelledError):
                return failure
            if failure.check(Refused):
                refused = failure.value
                refused.detail = f"backend {format_target(host, port)}: {refused.detail}"  # type: ignore[union-attr]
                return failure
            if failure.check(TimeoutError):
                detail = f"no answer within {self.timeout:g}s"
            else:
                detail = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
            raise Refused(CONSOLE_UNREACHABLE, f"backend {format_target(host, port)}: {detail}")

        return dialing.addErrback(unreachable)
