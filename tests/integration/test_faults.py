"""
Faults on real loopback sockets: the proxy loses nothing it should keep and keeps serving.

Each test breaks one thing a real deployment loses (Redis, the VNC server, the client, the
proxy process, file descriptors) and checks what a live session and a new one see, and that
the proxy recovers by itself (docs/security.md, "Faults and live sessions").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.integration import test_fleet
from tests.processes import (
    SYSTEMD_LISTEN_ENDPOINT,
    loopback_listener,
    port_of,
    spawn_with_listener,
    stop_process,
    twistd_command,
)
from tests.procfs import cpu_seconds
from tests.redis_server import start_redis
from tests.support import (
    GREETING,
    ClientState,
    Proxy,
    async_test,
    connect_client,
    listen_fake_vnc,
    listen_proxy,
)
from vncmux.metrics import Metrics
from vncmux.tokens import (
    MemoryTokenStore,
    RedisConfig,
    RedisTokenStore,
    TokenRecord,
    TokenStoreUnavailable,
    hash_token,
)

TOKEN = "fault-token"


async def relaying(test: TestCase, port: int, token: str = TOKEN) -> ClientState:
    """A session that relays: the greeting arrives, and a message comes back echoed."""
    client = await connect_client(test, port, path=f"/websockify?token={token}")
    test.assertEqual(await client.receive(len(GREETING)), GREETING)
    await echoes(test, client)
    return client


async def refused(test: TestCase, port: int, token: str = TOKEN) -> tuple[int | None, str | None]:
    """How a refused console closes: the proxy answers as a refusing VNC server, the client
    sends its RFB version, the close frame carries the refusal's code and reason."""
    client = await connect_client(test, port, path=f"/websockify?token={token}")
    test.assertEqual(await client.receive(len(GREETING)), GREETING)
    client.send(GREETING)
    return await client.closed


async def echoes(test: TestCase, client: ClientState, data: bytes = b"still here") -> None:
    """C{data} goes through the proxy to the echoing VNC server and back."""
    before = len(client.received)
    client.send(data)
    test.assertEqual((await client.receive(before + len(data)))[before:], data)


class RedisStoppedTests(TestCase):
    """Redis stops mid-run and comes back on the same port."""

    timeout = 30

    @async_test
    async def test_redis_stopped_mid_run(self) -> None:
        """Live sessions keep relaying while Redis is down; new ones get 4503 at once (not
        after the store timeout); once Redis is back new sessions open again, from the same
        proxy, without a restart."""
        # appendonly: the record survives the restart, so the re-check of live sessions
        # after re-subscribing finds it (a server without data would revoke them).
        server = start_redis(self, ["--appendonly", "yes"])
        store = RedisTokenStore(
            RedisConfig.from_url(server.url()),
            reactor,
            reactor=reactor,
            reconnect_policy=lambda attempt: 0.1,
            resubscribe_policy=lambda attempt: 0.1,
        )
        store.startService()
        self.addCleanup(store.stopService)
        vnc, vnc_port = await listen_fake_vnc(self)
        record = TokenRecord.issued(TOKEN, "127.0.0.1", vnc_port, reactor.seconds())
        await store.issue(record, TOKEN)
        proxy = await listen_proxy(self, store)
        live = await relaying(self, proxy.port)

        server.stop()
        await echoes(self, live)
        started = reactor.seconds()
        self.assertEqual(await refused(self, proxy.port), (4503, "token store unavailable"))
        self.assertLess(reactor.seconds() - started, 1.0)  # --store-timeout is 2 s
        await echoes(self, live, b"and still")

        server.start()
        await store.next_reconnection()
        fresh = await relaying(self, proxy.port)
        await echoes(self, live, b"after")
        self.assertEqual(len(proxy.supervisor.sessions), 2)
        self.assertFalse(fresh.closed.called)
        self.assertEqual(store.reconnects, 1)
        self.flushLoggedErrors(TokenStoreUnavailable)


async def counted_proxy(test: TestCase, vnc_port: int) -> tuple[Proxy, Metrics]:
    """An in-process proxy whose token TOKEN opens the VNC server at C{vnc_port}, with the
    metrics observer listening to its sessions."""
    store = MemoryTokenStore()
    store.add(TOKEN, "127.0.0.1", vnc_port)
    proxy = await listen_proxy(test, store, close_timeout=2.0)
    metrics = Metrics(proxy.supervisor.sessions, proxy.factory.stats)
    proxy.observers.add(metrics)
    return proxy, metrics


async def assert_nothing_held_now(test: TestCase, proxy: Proxy) -> None:
    """Once every socket of the proxy is closed, nothing is held: no session, reservation
    or pending slot (without stopping the proxy, unlike the cleanup check)."""
    await proxy.supervisor.connections.all_closed()
    supervisor = proxy.supervisor
    held = (len(supervisor.sessions), supervisor.reserved, supervisor.pending.total)
    test.assertEqual(held, (0, 0, 0))


class BackendKilledTests(TestCase):
    """The VNC server dies mid-session: its socket is reset."""

    timeout = 10

    @async_test
    async def test_backend_reset(self) -> None:
        """The client gets close 1011 'backend error' at once; the session is counted as
        closed by an error; the proxy holds nothing afterwards and keeps serving."""
        vnc, vnc_port = await listen_fake_vnc(self)
        proxy, metrics = await counted_proxy(self, vnc_port)
        client = await relaying(self, proxy.port)

        vnc.connections[0].transport.abortConnection()  # SO_LINGER 0: an RST, as a crash
        self.assertEqual(await client.closed, (1011, "backend error"))
        await assert_nothing_held_now(self, proxy)
        self.assertEqual(metrics.closed["error"], 1)
        await relaying(self, proxy.port)


class ClientVanishedTests(TestCase):
    """The browser goes away without a WebSocket close: its socket is reset or just closed."""

    timeout = 10

    async def _vanish(self, drop: str) -> None:
        vnc, vnc_port = await listen_fake_vnc(self)
        proxy, metrics = await counted_proxy(self, vnc_port)
        client = await relaying(self, proxy.port)
        assert client.client is not None
        getattr(client.client.transport, drop)()
        await vnc.connections[0].lost  # the proxy closed the VNC connection
        self.assertEqual((await client.closed)[0], 1006)
        await assert_nothing_held_now(self, proxy)
        self.assertEqual(metrics.closed["client"], 1)
        await relaying(self, proxy.port)

    @async_test
    async def test_client_reset(self) -> None:
        """A client whose socket is reset (RST): the session ends, counted as closed by the
        client; the VNC connection is closed; nothing is held."""
        await self._vanish("abortConnection")

    @async_test
    async def test_client_dropped(self) -> None:
        """A client that closes its TCP connection without a close frame: the same."""
        await self._vanish("loseConnection")


class ProxyKilledTests(TestCase):
    """The proxy process is SIGKILLed (no drain, no last write-back) and started again."""

    timeout = 60
    cli = test_fleet.FleetRevocationTests.cli
    add_token = test_fleet.FleetRevocationTests.add_token
    start_proxy = test_fleet.FleetRevocationTests.start_proxy

    @async_test
    async def test_sigkill_and_restart(self) -> None:
        """What the proxy wrote to Redis before it died stays there: the token record as
        issued and the last_activity_at already written back; a new proxy process on the same
        Redis serves the same token."""
        self.redis = start_redis(self)
        vnc, vnc_port = await listen_fake_vnc(self)
        token = await self.add_token(vnc_port, "instance-a")
        key = f"vncmux:token:{hash_token(token)}"
        redis = self.redis.client()
        self.addCleanup(redis.close)
        issued = redis.hgetall(key)

        port = self.start_proxy("--flush-interval", "0.2")
        killed = self.proc
        client = await relaying(self, port, token)
        client.send(b"RFB 003.008\n\x01\x01")  # version, security None, ClientInit
        client.send(b"\x05\x00\x00\x10\x00\x10")  # a PointerEvent: user input
        typed_at = reactor.seconds()
        written = await deferToThread(  # the reactor sends the event meanwhile
            self.redis.wait_for, lambda c: c.hexists(key, "last_activity_at"), key, 5.0
        )
        self.assertTrue(written, "last_activity_at not written back within 5 s")
        stamp = redis.hget(key, "last_activity_at")
        self.assertLess(abs(float(stamp) - typed_at), 2.0)

        os.killpg(killed.pid, signal.SIGKILL)
        self.assertEqual((await client.closed)[0], 1006)
        await vnc.connections[0].lost  # the kernel closed the dead proxy's sockets
        self.assertEqual(redis.hgetall(key), {**issued, "last_activity_at": stamp})
        self.assertGreater(redis.ttl(key), 0)

        port = self.start_proxy()
        await relaying(self, port, token)
        self.assertEqual(killed.wait(5), -signal.SIGKILL)


#: RLIMIT_NOFILE of the proxy process under test: twistd starts with about 20 descriptors open,
#: so some twenty sessions (two descriptors each) fill it.
FD_LIMIT = 64


class FdExhaustionTests(TestCase):
    """
    The proxy runs out of file descriptors (EMFILE) with sessions open.

    vncmux has no EMFILE code of its own: Twisted's listening port (twisted.internet.tcp,
    C{_accept}) keeps a descriptor in reserve, and on EMFILE frees it, accepts every waiting
    connection and closes it, then reserves it again, so the listener does not stay readable
    and the reactor does not spin. This test pins that behaviour of the Twisted in use.
    """

    timeout = 60

    def start_proxy(self, vnc_port: int) -> subprocess.Popen[bytes]:
        """`twistd -n vncmux` under `prlimit --nofile=FD_LIMIT`, on a listener of ours."""
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            self.fail("prlimit not found: apt-get install util-linux")
        tokens = self.mktemp()
        with open(tokens, "w") as f:
            f.write(f"{TOKEN}: 127.0.0.1:{vnc_port}\n")
        self.log_path = self.mktemp()
        listener = loopback_listener()
        self.addCleanup(listener.close)
        with open(self.log_path, "wb") as log:
            proc = spawn_with_listener(
                [
                    prlimit, f"--nofile={FD_LIMIT}",
                    *twistd_command(), "-n", "--pidfile=", "vncmux",
                    "--listen", SYSTEMD_LISTEN_ENDPOINT,
                    "--tokens", f"file:{tokens}",
                    "--metrics", "none",
                    "--idle-timeout", "0",
                    "--max-sessions-per-token", "0",
                ],
                listener,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.addCleanup(stop_process, proc)
        self.port = port_of(listener)
        return proc

    async def attempt(self) -> tuple[str, ClientState]:
        """One console: 'relaying' (the VNC server's greeting, then an echo), or how it was
        refused: 'cut' (the TCP connection closed before any answer) or the close code."""
        client = await connect_client(self, self.port, path=f"/websockify?token={TOKEN}")
        client.opened.addErrback(lambda f: None)  # closed before open: seen in `closed`
        if await received_or_closed(client, len(GREETING)):
            client.send(GREETING)  # the echo, or the RFB answer a refusal waits for
            if await received_or_closed(client, 2 * len(GREETING)):
                return "relaying", client
        code, _ = await client.closed
        return ("cut" if code == 1006 and not client.received else str(code)), client

    @async_test
    async def test_emfile(self) -> None:
        """At the descriptor limit new connections are refused cleanly (closed at once, or
        refused with a close code), live sessions keep relaying, the process does not spin
        (CPU time over a second of refused connections stays low), and once sessions end
        new ones open again, without a restart."""
        vnc, vnc_port = await listen_fake_vnc(self)
        proc = self.start_proxy(vnc_port)
        live: list[ClientState] = []
        refusals: list[str] = []
        for _ in range(FD_LIMIT):
            outcome, client = await self.attempt()
            if outcome != "relaying":
                refusals.append(outcome)
                break
            live.append(client)
        self.assertTrue(refusals, f"{len(live)} sessions and no descriptor shortage")
        self.assertGreater(len(live), 5)

        cpu_before = cpu_seconds(proc.pid)
        measured_from = reactor.seconds()
        for _ in range(5):
            refusals.append((await self.attempt())[0])
        await echoes(self, live[0])
        await deferLater(reactor, max(0.0, 1.0 - (reactor.seconds() - measured_from)))
        busy = cpu_seconds(proc.pid) - cpu_before
        self.assertLess(busy, 0.5, f"{busy:.2f} s of CPU in a second at the limit")
        self.assertLessEqual(set(refusals), {"cut", "4502", "4503"}, refusals)
        self.assertIsNone(proc.poll())

        for client in live[-3:]:
            assert client.client is not None
            client.client.sendClose(1000)
            await client.closed
        outcome, fresh = await self.attempt()
        self.assertEqual(outcome, "relaying")
        await echoes(self, live[0])
        with open(self.log_path, "rb") as f:
            self.assertIn(b"EMFILE", f.read())


def received_or_closed(client: ClientState, count: int) -> Deferred[bool]:
    """Fires C{True} once C{count} bytes arrived in all, C{False} if the connection closed
    first (and leaves C{client.closed} to be awaited again)."""
    done: Deferred[bool] = Deferred()

    def settle(value: bool) -> None:
        if not done.called:
            done.callback(value)

    client.receive(count).addCallback(lambda _: settle(True))

    def closed(result: object) -> object:
        settle(False)
        return result

    client.closed.addBoth(closed)
    return done
