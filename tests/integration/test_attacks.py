"""Hostile clients on real loopback sockets: every connection ends with nothing held.

Each test plays a client that breaks the rules (a second upgrade on one connection, a ping
flood it never reads, a malformed extension offer, a side that stops reading) and checks that
the proxy gives back every reservation, slot and socket; L{listen_proxy}'s cleanup checks the
counters once more after the proxy stopped.
"""

from __future__ import annotations

import os
import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.conformance.wsframes import CLOSE, PING, PONG, close_payload, frame, parse_server_frames
from tests.procfs import resident_kib
from tests.support import (
    GREETING,
    FakeVncFactory,
    async_test,
    connect_client,
    listen_fake_vnc,
    listen_proxy,
    proxy_to_fake_vnc,
)
from vncmux.refusals import TOKEN_REVOKED
from vncmux.settings import Limits
from vncmux.tokens import MemoryTokenStore, hash_token


def upgrade(token: str = "good", extra: str = "") -> bytes:
    return (
        f"GET /websockify?token={token} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: binary\r\n{extra}\r\n"
    ).encode()


class RawClient(Protocol):
    """A client that writes what the test says and keeps every byte it is sent."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[bytes] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        waiting, self._waiting = self._waiting, []
        for needle, d in waiting:
            if needle in self.data:
                d.callback(None)
            else:
                self._waiting.append((needle, d))

    def seen(self, needle: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((needle, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(self.data)

    def frames(self):  # type: ignore[no-untyped-def]
        """The frames after the HTTP answer (which must be a 101)."""
        head, _, rest = self.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return parse_server_frames(rest)


async def raw_client(test: TestCase, port: int) -> RawClient:
    client = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoint.connect(Factory.forProtocol(lambda: client))

    def close() -> Deferred[bytes]:
        client.transport.loseConnection()  # type: ignore[union-attr]
        return client.lost

    test.addCleanup(close)
    return client


class SlowGreeter(FakeVncFactory):
    """A VNC server that greets only when the test says so."""

    def __init__(self) -> None:
        super().__init__(greeting=b"")
        self.connected: Deferred[None] = Deferred()

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        protocol = super().buildProtocol(addr)
        reactor.callLater(0, self.connected.callback, None)
        return protocol


class SecondUpgradeTests(TestCase):
    """One connection, one upgrade request: anything sent before the 101 ends it."""

    timeout = 60

    async def _proxy(self, vnc_port: int, **settings: object):  # type: ignore[no-untyped-def]
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        proxy = await listen_proxy(self, store, Limits(max_sessions=2), **settings)
        return store, proxy

    @async_test
    async def test_while_the_console_is_dialled(self) -> None:
        """A second request while the VNC server has not greeted yet: HTTP 400, the dialled
        VNC connection closed, no session, nothing counted."""
        vnc = SlowGreeter()
        port = await self._listen(vnc)
        _, proxy = await self._proxy(port)
        client = await raw_client(self, proxy.port)
        client.transport.write(upgrade())  # type: ignore[union-attr]
        await vnc.connected
        client.transport.write(upgrade())  # type: ignore[union-attr]
        answer = await client.lost
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:80])
        await vnc.connections[0].lost
        self.assertEqual(proxy.supervisor.reserved, 0)
        self.assertEqual(proxy.supervisor.sessions, {})

    @async_test
    async def test_pipelined_in_one_write_and_back_to_back(self) -> None:
        """Two requests in one write, or in two writes with no pause: never more than one
        session, the other connection refused; honest clients still get their consoles and
        revocation reaches every session there is."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store, proxy = await self._proxy(vnc_port)
        opened: list[str] = []
        proxy.observers.add(_Opened(opened))
        for attempt in range(20):
            client = await raw_client(self, proxy.port)
            if attempt % 2:
                client.transport.write(upgrade() + upgrade())  # type: ignore[union-attr]
            else:
                client.transport.write(upgrade())  # type: ignore[union-attr]
                client.transport.write(upgrade())  # type: ignore[union-attr]
            await client.lost
        self.assertLessEqual(len(opened), 20)
        self.assertEqual(proxy.supervisor.sessions, {})
        self.assertEqual(proxy.supervisor.reserved, 0)
        self.assertEqual(proxy.supervisor.pending.total, 0)
        self.assertEqual([c for c in vnc.connections if not c.lost.called], [])
        honest = [await connect_client(self, proxy.port) for _ in range(2)]
        for client in honest:
            await client.receive(len(GREETING))
        ended = proxy.supervisor.revoked(hash_token("good"))
        self.assertEqual(ended, 2)
        for client in honest:
            self.assertEqual((await client.closed)[0], TOKEN_REVOKED.code)

    async def _listen(self, factory: FakeVncFactory) -> int:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

        def stop() -> object:
            for conn in factory.connections:
                conn.transport.loseConnection()
            return port.stopListening()

        self.addCleanup(stop)
        return port.getHost().port


class _Opened:
    """Records the id of every session that starts relaying."""

    def __init__(self, opened: list[str]) -> None:
        self.opened = opened

    def session_opened(self, session: object) -> None:
        self.opened.append(session.id)  # type: ignore[attr-defined]

    def session_rejected(self, *args: object) -> None:
        pass

    def session_closed(self, *args: object) -> None:
        pass

    def stage_timed(self, *args: object) -> None:
        pass


def _flood(port: int, request: bytes, count: int, seconds: float) -> tuple[int, float]:
    """
    From a thread, with a blocking socket (its buffers are the kernel's, not this process's):
    upgrade, then send up to C{count} pings within C{seconds} without reading a byte; then
    read all that was queued and count the pongs. The time returned runs until the proxy
    closed the connection: it answers the pings the kernel still held after the last send.
    """
    ping = frame(os.urandom(125), PING)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(seconds)
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:  # RFC 6455: no frame before the 101
            answer += sock.recv(1)
        sent = 0
        batch = ping * 64
        try:
            while sent < count and time.monotonic() - started < seconds:
                sock.sendall(batch)
                sent += 64
        except (TimeoutError, OSError):
            pass
        received = b""
        sock.settimeout(30)
        try:
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, OSError):
            pass
        elapsed = time.monotonic() - started
    frames = parse_server_frames(received)
    return sum(f.opcode == PONG for f in frames), elapsed


class PingFloodTests(TestCase):
    """A client that sends pings and never reads gets a bounded number of pongs queued."""

    timeout = 60

    async def _flood(self, token: str) -> None:
        vnc, proxy = await proxy_to_fake_vnc(self, refusal_timeout=4.0, close_timeout=2.0)
        before = resident_kib()
        pongs, elapsed = await deferToThread(_flood, proxy.port, upgrade(token), 200_000, 3.0)
        grown = resident_kib() - before
        self.assertLess(grown, 32 * 1024, f"grew {grown} KiB")
        # 20 at once, then 20 a second while the connection lasted.
        self.assertLessEqual(pongs, 20 + 20 * elapsed)
        self.assertGreater(pongs, 0)
        for conn in vnc.connections:
            await conn.lost

    @async_test
    async def test_unauthenticated(self) -> None:
        """A refused client (unknown token) flooding pings during the refusal."""
        await self._flood("unknown")

    @async_test
    async def test_authenticated(self) -> None:
        """A relaying client flooding pings while never reading its screen."""
        await self._flood("good")


class FailedUpgradeTests(TestCase):
    """An upgrade the proxy cannot complete gives back what admission took."""

    timeout = 60

    @async_test
    async def test_malformed_extension_offer(self) -> None:
        """A broken permessage-deflate offer (vncmux negotiates no extension) is ignored, as
        RFC 6455 lets a server ignore what it does not support: the console opens, and with
        one session per token allowed, the next attempt after it closed opens too."""
        vnc, proxy = await proxy_to_fake_vnc(self, token_fields={"max_sessions": 1})
        for _ in range(2):
            client = await raw_client(self, proxy.port)
            bogus = "Sec-WebSocket-Extensions: permessage-deflate; bogus=1\r\n"
            client.transport.write(upgrade(extra=bogus))  # type: ignore[union-attr]
            await client.seen(GREETING)
            self.assertNotIn(b"Sec-WebSocket-Extensions", client.data.partition(b"\r\n\r\n")[0])
            client.transport.write(frame(close_payload(1000), CLOSE))  # type: ignore[union-attr]
            await client.lost
        self.assertEqual(proxy.supervisor.reserved, 0)


class PausedSideTests(TestCase):
    """A session that ends while one direction is paused still closes both sides at once,
    each after flushing what the proxy already took."""

    timeout = 60

    @async_test
    async def test_vnc_server_not_reading(self) -> None:
        """The VNC server stops reading, the client's bytes pile up until the client is
        paused; revocation then closes the VNC connection after every accepted byte, long
        before the close timeout."""
        vnc, proxy = await proxy_to_fake_vnc(self, vnc={"echo": False}, close_timeout=60.0)
        client = await connect_client(self, proxy.port)
        await client.receive(len(GREETING))
        server = vnc.connections[0]
        server.transport.pauseProducing()
        session = next(iter(proxy.supervisor.sessions.values()))
        paused = proxy.factory.stats.pauses["client_to_backend"]
        while proxy.factory.stats.pauses["client_to_backend"] == paused:
            client.send(b"\x05" * (1024 * 1024))
            await _next_turn()
        started = time.monotonic()
        proxy.supervisor.revoked(session.record.token_hash)
        server.transport.resumeProducing()
        await server.lost
        self.assertLess(time.monotonic() - started, 30.0)
        self.assertEqual(len(server.received), session.bytes_to_backend)
        self.assertEqual((await client.closed)[0], TOKEN_REVOKED.code)

    @async_test
    async def test_client_not_reading(self) -> None:
        """The client stops reading while the VNC server sends: after the end, the client
        still gets every byte the proxy read, then the close frame."""
        vnc, proxy = await proxy_to_fake_vnc(self, vnc={"echo": False}, close_timeout=60.0)
        client = await raw_client(self, proxy.port)
        client.transport.write(upgrade())  # type: ignore[union-attr]
        await client.seen(GREETING)
        client.transport.pauseProducing()  # type: ignore[union-attr]
        server = vnc.connections[0]
        session = next(iter(proxy.supervisor.sessions.values()))
        paused = proxy.factory.stats.pauses["backend_to_client"]
        while proxy.factory.stats.pauses["backend_to_client"] == paused:
            server.transport.write(b"\x06" * (1024 * 1024))
            await _next_turn()
        proxy.supervisor.revoked(session.record.token_hash)
        await server.lost
        client.transport.resumeProducing()  # type: ignore[union-attr]
        await client.seen(b"token revoked")
        frames = client.frames()
        self.assertEqual(frames[-1].opcode, CLOSE)
        self.assertEqual(frames[-1].close_code, TOKEN_REVOKED.code)
        relayed = b"".join(f.payload for f in frames[:-1])
        self.assertEqual(len(relayed), session.bytes_to_client)


class InvalidCloseTests(TestCase):
    """Invalid close codes get a close frame with 1002, not a reset."""

    timeout = 60

    @async_test
    async def test_close_codes(self) -> None:
        """Codes 5000 and 65535: the client reads a 1002 close frame before the TCP close."""
        vnc, proxy = await proxy_to_fake_vnc(self)
        for code in (5000, 65535):
            client = await raw_client(self, proxy.port)
            client.transport.write(upgrade())  # type: ignore[union-attr]
            await client.seen(GREETING)
            client.transport.write(frame(close_payload(code), CLOSE))  # type: ignore[union-attr]
            await client.lost
            closes = [f for f in client.frames() if f.opcode == CLOSE]
            self.assertEqual([f.close_code for f in closes], [1002])
        for conn in vnc.connections:
            await conn.lost


def _next_turn() -> Deferred[None]:
    """Let the reactor run one more pass (reads, writes, producer callbacks)."""
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    return d
