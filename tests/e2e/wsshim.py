"""
A WebSocket-to-TCP shim, so that a raw RFB client (vncdotool) can reach a console through a
WebSocket proxy.

Usage: ``python wsshim.py WS_URL`` with a listening TCP socket as standard input (inetd style:
the caller binds it, so the shim needs no port of its own and no readiness signal), or
``python wsshim.py WS_URL PORT`` to listen on 127.0.0.1:PORT by itself. Each TCP
connection gets its own WebSocket to ``WS_URL`` (subprotocol ``binary``); bytes go both ways
unchanged. How each WebSocket closed is written to standard error, one line per connection:
``wsshim: closed code=4401 reason='invalid token'``.

Small on purpose: no backpressure and no TLS, for short test sessions on loopback only.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorCore, IReactorSocket, IReactorTCP
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

CONNECT_TIMEOUT_S = 5


class _WebSocketSide(WebSocketClientProtocol):
    """The WebSocket half: its binary messages become bytes on the TCP connection."""

    factory: _WebSocketFactory

    def onOpen(self) -> None:
        self.factory.tcp.websocket_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.tcp.transport.write(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        print(f"wsshim: closed code={code} reason={reason!r}", file=sys.stderr, flush=True)
        self.factory.tcp.transport.loseConnection()


class _WebSocketFactory(WebSocketClientFactory):
    """One per TCP connection, so its protocol finds the TCP side it serves."""

    protocol = _WebSocketSide

    def __init__(self, url: str, tcp: _TcpSide) -> None:
        super().__init__(url, protocols=["binary"])
        self.setProtocolOptions(openHandshakeTimeout=CONNECT_TIMEOUT_S)
        self.tcp = tcp


class _TcpSide(Protocol):
    """The TCP half: reading waits until the WebSocket is open, then bytes become messages."""

    def __init__(self, url: str, reactor: IReactorTCP) -> None:
        self._url = url
        self._reactor = reactor
        self._websocket: _WebSocketSide | None = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        parts = urlsplit(self._url)
        endpoint = TCP4ClientEndpoint(
            self._reactor, parts.hostname, parts.port or 80, timeout=CONNECT_TIMEOUT_S
        )
        endpoint.connect(_WebSocketFactory(self._url, self)).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        print(f"wsshim: connect failed: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        self.transport.loseConnection()

    def websocket_opened(self, websocket: _WebSocketSide) -> None:
        self._websocket = websocket
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._websocket is not None:
            self._websocket.sendMessage(data, isBinary=True)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._websocket is not None:
            self._websocket.sendClose(1000)


class _ShimFactory(Factory):
    def __init__(self, url: str, reactor: IReactorTCP) -> None:
        self._url = url
        self._reactor = reactor

    def buildProtocol(self, addr: object) -> _TcpSide:
        return _TcpSide(self._url, self._reactor)


def main(argv: list[str]) -> None:
    """Serve the shim until terminated: on the listening socket at fd 0, or on a port."""
    if len(argv) not in (1, 2):
        sys.exit("usage: wsshim.py WS_URL [PORT]   (without PORT: a listening socket on stdin)")
    url = argv[0]
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    reactor = _reactor
    assert IReactorSocket.providedBy(reactor) and IReactorCore.providedBy(reactor)
    factory = _ShimFactory(url, reactor)
    if len(argv) == 2:
        reactor.listenTCP(int(argv[1]), factory, interface="127.0.0.1")
    else:
        os.set_blocking(0, False)  # adoptStreamPort expects it: accept() runs until EAGAIN
        reactor.adoptStreamPort(0, socket.AF_INET, factory)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
