"""In-process helpers for tests on real loopback sockets: a fake VNC server, the proxy, a client.

Every helper registers its own cleanup and waits for connections to close, so trial's
dirty-reactor check stays meaningful.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from vncmux.events import Observers, SessionLog
from vncmux.interfaces import ITokenStore
from vncmux.service import ProxyService, build_console
from vncmux.settings import Limits, Settings
from vncmux.supervisor import Supervisor
from vncmux.websocket import ConsoleFactory

GREETING = b"RFB 003.008\n"


def async_test(
    f: Callable[[Any], Coroutine[Any, Any, None]],
) -> Callable[[Any], Deferred[None]]:
    """Run an ``async def`` test method under trial, keeping its name and docstring."""

    def test(self: Any) -> Deferred[None]:
        return ensureDeferred(f(self))

    test.__doc__, test.__name__ = f.__doc__, f.__name__
    return test


class _RawAnswer(Protocol):
    """Collects everything a server sends until it closes."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


async def raw_request(port: int, request: bytes) -> bytes:
    """Send raw bytes to 127.0.0.1:C{port} and read the answer until the server closes."""
    proto = _RawAnswer()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: proto))
    proto.transport.write(request)  # type: ignore[union-attr]
    return await proto.done


@dataclass
class Response:
    """A parsed HTTP/1.0 response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def parse_response(raw: bytes) -> Response:
    """A complete HTTP/1.0 response (what L{raw_request} returns, or a StringTransport's
    value); header names lower-cased."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response: {raw!r}"
    first, *rest = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in rest)}
    return Response(int(first.split()[1]), headers, body)


class FakeVncProtocol(Protocol):
    """Greets like a VNC server, then echoes (or keeps) what it receives."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self.transport.write(self.factory.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.factory.echo:
            self.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class FakeVncFactory(Factory):
    protocol = FakeVncProtocol

    def __init__(self, greeting: bytes = GREETING, echo: bool = True) -> None:
        self.greeting = greeting
        self.echo = echo
        self.connections: list[FakeVncProtocol] = []


async def listen_fake_vnc(test: TestCase, **kwargs: object) -> tuple[FakeVncFactory, int]:
    """A fake VNC server on a free loopback port, stopped (with its connections) on cleanup."""
    factory = FakeVncFactory(**kwargs)  # type: ignore[arg-type]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

    def stop() -> Deferred[object]:
        for conn in factory.connections:
            conn.transport.loseConnection()
        lost = [conn.lost for conn in factory.connections]
        return DeferredList([port.stopListening(), *lost])

    test.addCleanup(stop)
    return factory, port.getHost().port


@dataclass
class Proxy:
    """A vncmux proxy service running in the test's process."""

    port: int
    service: ProxyService
    factory: ConsoleFactory
    supervisor: Supervisor
    observers: Observers


async def listen_proxy(
    test: TestCase, store: ITokenStore, limits: Limits | None = None, **settings: object
) -> Proxy:
    """The real proxy service on a free loopback port with the given token store; stopped
    (with the drain) on cleanup."""
    config = Settings(
        listen=str(settings.pop("listen", "tcp:0:interface=127.0.0.1")),
        metrics=None,
        limits=limits or Limits(),
        **settings,  # type: ignore[arg-type]
    )
    observers = Observers([SessionLog()])
    console = build_console(config, store, reactor, observers)
    service = ProxyService(config, console, reactor)
    service.startService()
    test.addCleanup(assert_nothing_held, test, console.supervisor)
    test.addCleanup(lambda: service.stopService() if service.running else None)
    port = await service.listener.listening()
    return Proxy(port.getHost().port, service, console.factory, console.supervisor, observers)


async def proxy_to_fake_vnc(
    test: TestCase,
    limits: Limits | None = None,
    vnc: dict[str, Any] | None = None,
    token_fields: dict[str, Any] | None = None,
    **settings: object,
) -> tuple[FakeVncFactory, Proxy]:
    """A fake VNC server and a proxy whose memory store knows one token, C{good}, for it;
    C{vnc} goes to the fake server, C{token_fields} to the record."""
    from vncmux.tokens import MemoryTokenStore

    server, port = await listen_fake_vnc(test, **(vnc or {}))
    store = MemoryTokenStore()
    store.add("good", "127.0.0.1", port, **(token_fields or {}))
    return server, await listen_proxy(test, store, limits, **settings)


def assert_nothing_held(test: TestCase, supervisor: Supervisor) -> None:
    """
    After the proxy stopped: no session, reservation, pending slot or socket is left. (A
    DelayedCall or socket left in the reactor fails the test too: trial's own dirty-reactor
    check, which runs after every cleanup.)
    """
    held = {
        "sessions": len(supervisor.sessions),
        "reserved": supervisor.reserved,
        "pending": supervisor.pending.total,
        "sockets": supervisor.connections.count,
    }
    test.assertEqual(held, dict.fromkeys(held, 0))


@dataclass
class ClientState:
    """What a L{ConsoleClient} saw; C{closed} fires with (code, reason)."""

    opened: Deferred[ConsoleClient] = field(default_factory=Deferred)
    closed: Deferred[tuple[int | None, str | None]] = field(default_factory=Deferred)
    received: bytes = b""
    waiters: list[tuple[int, Deferred[bytes]]] = field(default_factory=list)
    client: ConsoleClient | None = None

    def receive(self, count: int) -> Deferred[bytes]:
        """Fire once at least C{count} bytes have arrived in total."""
        d: Deferred[bytes] = Deferred()
        self.waiters.append((count, d))
        self._wake()
        return d

    def _wake(self) -> None:
        waiting, self.waiters = self.waiters, []
        for count, d in waiting:
            if len(self.received) >= count:
                d.callback(self.received)
            else:
                self.waiters.append((count, d))

    def send(self, data: bytes) -> None:
        """One binary message to the proxy."""
        assert self.client is not None
        self.client.sendMessage(data, isBinary=True)


class ConsoleClient(WebSocketClientProtocol):
    """A WebSocket client that records what it receives and how the connection closed."""

    def onOpen(self) -> None:
        state = self.factory.state
        state.client = self
        state.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        state = self.factory.state
        state.received += payload
        state._wake()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        state = self.factory.state
        if not state.opened.called:
            state.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        state.closed.callback((code, reason))


async def connect_client(
    test: TestCase,
    port: int,
    path: str = "/websockify?token=good",
    protocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> ClientState:
    """Open a WebSocket to the proxy; the connection is closed and awaited on cleanup."""
    state = ClientState()
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}{path}", protocols=protocols, headers=headers
    )
    factory.protocol = ConsoleClient
    factory.state = state
    proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)

    def cleanup() -> Deferred[object]:
        proto.transport.loseConnection()
        return state.closed

    test.addCleanup(cleanup)
    return state
