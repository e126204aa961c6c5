"""
Redis high availability: ``redis+sentinel://`` against a real master, a replica and three
Sentinels on loopback. The master stops mid-run; the Sentinels promote the replica.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.integration.test_faults import TOKEN, echoes, refused, relaying
from tests.processes import port_of, reserved_port
from tests.redis_server import SentinelCluster, start_redis, start_sentinel_cluster
from tests.support import async_test, listen_fake_vnc, listen_proxy
from vncmux.metrics import new_registry
from vncmux.observability import build_observability
from vncmux.tokens import RedisConfig, RedisTokenStore, TokenRecord, TokenStoreUnavailable

#: Bound on the promotion: the master is down after 0.4 s, an election and the promotion
#: take a few seconds more, and the pool's backoff between attempts grows to about 2 s.
FAILOVER_BOUND = 20.0


async def until_ready(cluster: SentinelCluster, tries: int = 100) -> None:
    """Wait until the Sentinels could fail over, checking every 0.1 s at most C{tries}
    times (Sentinel publishes no event for 'I know my peers')."""
    for _ in range(tries):
        if cluster.ready():
            return
        await deferLater(reactor, 0.1)
    raise AssertionError(f"the Sentinels did not find each other within {tries * 0.1:g} s")


async def replies_handed_on(turns: int = 100) -> None:
    """
    txredisapi hands the rest of a reply it is reading to itself with C{callLater(0)}, one
    turn after another; a loaded machine can leave such calls pending when a test ends.
    Reactor turns (no waiting for time to pass) until none is left, at most C{turns}.
    """
    for _ in range(turns):
        pending = [
            call
            for call in reactor.getDelayedCalls()
            if getattr(call.func, "__qualname__", "") == "LineReceiver.dataReceived"
        ]
        if not pending:
            return
        await deferLater(reactor, 0)
    raise AssertionError(f"txredisapi still had replies pending after {turns} turns")


class SentinelFailoverTests(TestCase):
    """The master fails; Sentinel promotes the replica; the proxy follows by itself."""

    timeout = 60

    @async_test
    async def test_master_fails_over(self) -> None:
        """Live sessions keep relaying through the failover; new sessions get 4503 at once
        while no master answers, and open again once the replica is promoted, from the same
        proxy; the log names the new master, and vncmux_token_store_reconnects_total
        counts the reconnection."""
        cluster = start_sentinel_cluster(self)
        await until_ready(cluster)  # the replica in sync before the token is written
        store = RedisTokenStore(RedisConfig.from_url(cluster.url()), reactor, reactor=reactor)
        store.startService()
        # Runs after the store stopped (see replies_handed_on).
        self.addCleanup(lambda: Deferred.fromCoroutine(replies_handed_on()))
        self.addCleanup(store.stopService)
        vnc, vnc_port = await listen_fake_vnc(self)
        record = TokenRecord.issued(TOKEN, "127.0.0.1", vnc_port, reactor.seconds())
        await store.issue(record, TOKEN)
        with cluster.master.client() as master:
            self.assertEqual(master.execute_command("WAIT", 1, 5000), 1)  # on the replica too
        proxy = await listen_proxy(self, store)
        _, metrics = build_observability(
            None, reactor, proxy.supervisor, store, proxy.factory.stats, lambda: True
        )
        registry = new_registry(metrics, process=False)
        lines: list[str] = []
        observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        await until_ready(cluster)
        live = await relaying(self, proxy.port)

        old, new = cluster.master.port, cluster.replica.port  # type: ignore[union-attr]
        cluster.master.stop()
        await echoes(self, live)
        started = reactor.seconds()
        self.assertEqual(await refused(self, proxy.port), (4503, "token store unavailable"))
        self.assertLess(reactor.seconds() - started, 1.0)  # --store-timeout is 2 s

        await store.next_reconnection().addTimeout(FAILOVER_BOUND, reactor)
        fresh = await relaying(self, proxy.port)
        await echoes(self, live, b"after the failover")
        self.assertFalse(fresh.closed.called or live.closed.called)
        reconnects = registry.get_sample_value("vncmux_token_store_reconnects_total")
        self.assertEqual(reconnects, 1, lines)
        moved = [line for line in lines if "(failover)" in line]
        self.assertEqual(len(moved), 1, lines)
        self.assertIn(f"127.0.0.1:{new}", moved[0])
        self.assertIn(f"from 127.0.0.1:{old}", moved[0])
        self.flushLoggedErrors(TokenStoreUnavailable)


class SentinelStopTests(TestCase):
    """Stopping a store while no Sentinel names a healthy master leaves nothing behind."""

    timeout = 30

    @async_test
    async def test_stop_during_discovery(self) -> None:
        """While every Sentinel reports the master down, master discovery waits for its
        deadline; stopping the store cancels it (trial fails the test on a timer left in
        the reactor)."""
        nothing = reserved_port()  # connections to it are refused: a dead master
        self.addCleanup(nothing.close)
        sentinel = start_redis(
            self,
            ["--sentinel"],
            config=(
                f"sentinel monitor mymaster 127.0.0.1 {port_of(nothing)} 1\n"
                "sentinel down-after-milliseconds mymaster 100\n"
            ),
            ready_marker=b"+monitor master",
        )
        down = sentinel.wait_for(
            lambda client: client.sentinel_master("mymaster")["is_sdown"], within=5.0,
            channel="+sdown",
        )  # fmt: skip
        self.assertTrue(down, "Sentinel did not mark the master down within 5 s")
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster?connect_timeout=5"
        store = RedisTokenStore(RedisConfig.from_url(url), reactor, reactor=reactor)
        store.startService()  # the pool's connections ask Sentinel for the master at once
        looking = store.ping()
        await store.stopService()
        await self.assertFailure(looking, TokenStoreUnavailable)
        self.flushLoggedErrors(TokenStoreUnavailable)
