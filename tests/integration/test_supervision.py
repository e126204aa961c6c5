"""The supervisor on real sockets: drain without losing bytes, keepalive, limits."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.support import GREETING, async_test, connect_client, listen_fake_vnc, listen_proxy
from vncmux.settings import Limits
from vncmux.tokens import MemoryTokenStore


class DrainTests(TestCase):
    """Stopping the proxy stops accepting at once and loses no byte already read."""

    @async_test
    async def test_no_byte_lost(self) -> None:
        """Bytes in flight both ways when the proxy stops all arrive before the 1001 close."""
        vnc, vnc_port = await listen_fake_vnc(self, echo=False)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        proxy = await listen_proxy(self, store, Limits(idle_timeout=0), drain_timeout=0.0)
        client = await connect_client(self, proxy.port)
        await client.receive(12)
        backend = vnc.connections[0]
        backend.transport.write(b"\x07" * (8 * 1024 * 1024))
        client.send(b"\x09" * (1024 * 1024))
        session = next(iter(proxy.supervisor.sessions.values()))
        await proxy.service.stopService()
        code, reason = await client.closed
        await backend.lost
        self.assertEqual((code, reason), (1001, "going away"))
        self.assertEqual(len(client.received), session.bytes_to_client)
        self.assertEqual(len(backend.received), session.bytes_to_backend)
        self.assertEqual(proxy.supervisor.connections.count, 0)

    @async_test
    async def test_grace_period(self) -> None:
        """During the grace period no new connection is accepted but live sessions go on;
        a session that ends by itself lets the drain finish early."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        proxy = await listen_proxy(self, store, Limits(idle_timeout=0), drain_timeout=60.0)
        client = await connect_client(self, proxy.port)
        await client.receive(12)
        stopped: list[object] = []
        stopping = proxy.service.stopService().addBoth(stopped.append)
        self.assertFalse(proxy.service.accepting)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port)
        await self.assertFailure(
            endpoint.connect(Factory.forProtocol(Protocol)), ConnectionRefusedError
        )
        client.send(b"still here")
        await client.receive(12 + 10)
        self.assertEqual(stopped, [])
        vnc.connections[0].transport.loseConnection()
        await stopping
        self.assertEqual(await client.closed, (1000, "backend closed"))


class KeepaliveTests(TestCase):
    """WebSocket pings keep sessions open and find clients that stopped answering."""

    @async_test
    async def test_unanswered_pings_drop_client_and_backend(self) -> None:
        """A client that stops reading (so never answers pings) is dropped, and its VNC
        connection closed, after the ping timeout."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        proxy = await listen_proxy(
            self,
            store,
            Limits(idle_timeout=0, sweep_interval=0.05, ping_interval=0.1, ping_timeout=0.2),
        )
        client = await connect_client(self, proxy.port)
        opened = await client.opened
        await client.receive(12)
        opened.transport.pauseProducing()
        await vnc.connections[0].lost
        self.assertEqual(proxy.supervisor.sessions, {})
        opened.transport.resumeProducing()
        await client.closed

    @async_test
    async def test_answered_pings_keep_session(self) -> None:
        """A client that answers pings stays connected across several intervals."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        proxy = await listen_proxy(
            self,
            store,
            Limits(idle_timeout=0, sweep_interval=0.05, ping_interval=0.1, ping_timeout=0.2),
        )
        client = await connect_client(self, proxy.port)
        opened = await client.opened
        pinged: Deferred[None] = Deferred()
        pings = []
        answer = opened.onPing

        def on_ping(payload: bytes) -> None:
            answer(payload)
            pings.append(payload)
            if len(pings) == 5:
                pinged.callback(None)

        opened.onPing = on_ping  # type: ignore[method-assign]
        await pinged
        self.assertEqual(len(proxy.supervisor.sessions), 1)


class LimitTests(TestCase):
    """Limits refuse with 4429 / 4403 and do not count failed attempts."""

    async def _refusal(self, port: int, path: str) -> tuple[int | None, str | None]:
        client = await connect_client(self, port, path=path)
        await client.receive(12)
        client.send(b"RFB 003.008\n")
        return await client.closed

    @async_test
    async def test_per_token_limit(self) -> None:
        """The second session on a token limited to one is refused with 4429."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port, max_sessions=1)
        proxy = await listen_proxy(self, store)
        first = await connect_client(self, proxy.port)
        self.assertEqual(await first.receive(12), GREETING)
        self.assertEqual(
            await self._refusal(proxy.port, "/?token=good"), (4429, "too many sessions")
        )

    @async_test
    async def test_single_use(self) -> None:
        """A single-use token opens one console; a failed attempt does not use it up."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        record = store.add("once", "127.0.0.1", 1, single_use=True)
        proxy = await listen_proxy(self, store)
        self.assertEqual(
            await self._refusal(proxy.port, "/?token=once"), (4502, "console unreachable")
        )
        store.add("once", "127.0.0.1", vnc_port, single_use=True)
        first = await connect_client(self, proxy.port, path="/?token=once")
        self.assertEqual(await first.receive(12), GREETING)
        first.send(b"relayed")  # the fake VNC server echoes: this is a live console
        self.assertEqual(await first.receive(12 + 7), GREETING + b"relayed")
        self.assertEqual(
            await self._refusal(proxy.port, "/?token=once"), (4403, "token already used")
        )
        del record
