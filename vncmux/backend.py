"""Dialing the console a token names (a VNC server or a serial port), and the protocol on
that connection.

The backend connection is held paused until the relay starts, as Twisted's portforward does,
so nothing is read that has nowhere to go: after the server's RFB greeting for a VNC server,
as soon as it is connected for a serial port (which says nothing first).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.interfaces import IPeer
from vncmux.refusals import BACKEND_CLOSED, BACKEND_ERROR, CONSOLE_UNREACHABLE, Ending, Refused
from vncmux.relay import send_now, set_interactive
from vncmux.tokens import format_target

if TYPE_CHECKING:
    from vncmux.relay import Session
    from vncmux.supervisor import ConnectionTracker

#: Length of the RFB ProtocolVersion message every VNC server sends first.
RFB_GREETING_LENGTH = 12


class NotAVncServer(Exception):
    """The backend answered, but not with an RFB greeting."""


@implementer(IPeer)
class BackendProtocol(Protocol):
    """
    The connection to a console.

    With C{rfb_greeting}, before the relay starts it reads only the 12-byte RFB greeting (to
    tell a VNC server from a wrong port), then pauses; without, it pauses once connected.
    Afterwards every chunk goes straight to the session.
    """

    def __init__(self, tracker: ConnectionTracker | None = None, rfb_greeting: bool = True) -> None:
        self.greeted: Deferred[BackendProtocol] = Deferred()
        self.tracker = tracker
        self.rfb_greeting = rfb_greeting
        self.greeting = b""
        self.session: Session | None = None
        #: Told how the connection ended, once someone owns it (after admission).
        self.on_lost: Callable[[Ending], None] | None = None

    def connectionMade(self) -> None:
        set_interactive(self.transport)
        if self.tracker is not None:
            self.tracker.opened()
        if not self.rfb_greeting:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.greeted.callback(self)

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            session.from_backend(data)
            return
        self.greeting += data
        if len(self.greeting) < RFB_GREETING_LENGTH or self.greeted.called:
            return
        self.transport.pauseProducing()  # type: ignore[union-attr]
        if self.greeting.startswith(b"RFB ") and self.greeting[11:12] == b"\n":
            self.greeted.callback(self)
        else:
            self.greeted.errback(NotAVncServer(repr(self.greeting[:12])))

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if self.tracker is not None:
            self.tracker.closed()
        if not self.greeted.called:
            self.greeted.errback(reason or Failure(ConnectionError("connection lost")))
        elif self.on_lost is not None:
            clean = reason is None or reason.check(ConnectionDone) is not None
            self.on_lost(BACKEND_CLOSED if clean else BACKEND_ERROR)

    # IPeer, as the relay sees the VNC server

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]
        send_now(self.transport, len(data))

    def pause(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close once pending writes are flushed; TCP has no close code to carry."""
        if self.transport is not None:
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


class BackendDialer:
    """Connects to a target and, with C{rfb_greeting}, waits for its RFB greeting, all within
    one timeout."""

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        timeout: float,
        tracker: ConnectionTracker | None = None,
        rfb_greeting: bool = True,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self.timeout = timeout
        self._tracker = tracker
        self._rfb_greeting = rfb_greeting

    def dial(self, host: str, port: int) -> Deferred[BackendProtocol]:
        """
        Fire with a greeted (or, without an RFB greeting, connected), paused
        L{BackendProtocol}, or fail with L{Refused} (console unreachable) whose detail says
        why. Cancelling stops the attempt.
        """
        protocol = BackendProtocol(self._tracker, self._rfb_greeting)
        endpoint = endpoint_for(self._reactor, host, port, self.timeout)
        dialing = connectProtocol(endpoint, protocol)
        dialing.addCallback(lambda _: protocol.greeted)
        dialing.addTimeout(self.timeout, self._clock)

        def unreachable(failure: Failure) -> Failure:
            transport = protocol.transport
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]
            if failure.check(CancelledError):
                return failure
            if failure.check(TimeoutError):
                detail = f"no answer within {self.timeout:g}s"
            else:
                detail = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            raise Refused(CONSOLE_UNREACHABLE, f"backend {format_target(host, port)}: {detail}")

        return dialing.addErrback(unreachable)
