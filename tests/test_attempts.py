"""The brute-force limiter: failed token lookups per client address, in memory and in Redis."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.redis_server import start_redis
from vncmux.attempts import (
    BLOCKED_KEY_PREFIX,
    FAILED_KEY_PREFIX,
    IFailedAttempts,
    MemoryFailedAttempts,
    RedisFailedAttempts,
    attempts_for,
)
from vncmux.tokens import MemoryTokenStore, RedisConfig, RedisTokenStore

CLIENT = "192.0.2.7"
OTHER = "2001:db8::7"


def _blocked_events(log: EventLoggingObserver) -> list[dict[str, Any]]:
    return [e for e in log if e.get("vncmux_event") == "client_blocked"]


class AttemptsContract:
    """What every limiter does, with a limit of 3 failures a minute."""

    def make(self, max_failed: int = 3) -> Any:
        raise NotImplementedError

    @inlineCallbacks
    def test_blocks_past_the_limit(self) -> Any:
        """Three failures are tolerated; the fourth starts a cooldown for that address
        only, logged once with the address."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        limiter = self.make()
        verifyObject(IFailedAttempts, limiter)
        for _ in range(3):
            yield limiter.failed(CLIENT)
            self.assertIs((yield limiter.blocked(CLIENT)), False)
        yield limiter.failed(CLIENT)
        self.assertIs((yield limiter.blocked(CLIENT)), True)
        self.assertIs((yield limiter.blocked(OTHER)), False)
        yield limiter.failed(CLIENT)
        events = _blocked_events(log)
        self.assertEqual([e["client_address"] for e in events], [CLIENT])

    @inlineCallbacks
    def test_zero_disables(self) -> Any:
        """--max-failed-tokens 0: nobody is ever blocked."""
        limiter = self.make(max_failed=0)
        for _ in range(50):
            yield limiter.failed(CLIENT)
        self.assertIs((yield limiter.blocked(CLIENT)), False)


class MemoryAttemptsTests(AttemptsContract, SynchronousTestCase):
    """The per-process limiter on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def make(self, max_failed: int = 3, **kwargs: Any) -> MemoryFailedAttempts:
        return MemoryFailedAttempts(self.clock, max_failed, **kwargs)

    def failed(self, limiter: MemoryFailedAttempts, address: str, times: int = 1) -> None:
        for _ in range(times):
            self.successResultOf(limiter.failed(address))

    def blocked(self, limiter: MemoryFailedAttempts, address: str = CLIENT) -> bool:
        return self.successResultOf(limiter.blocked(address))

    def test_window_and_cooldown(self) -> None:
        """Failures count per minute from the first one; a cooldown lasts a minute from the
        failure that started it, then the address starts afresh."""
        limiter = self.make()
        self.failed(limiter, CLIENT, 3)
        self.clock.advance(60)  # the window is over: the count starts again
        self.failed(limiter, CLIENT, 3)
        self.assertFalse(self.blocked(limiter))
        self.clock.advance(30)
        self.failed(limiter, CLIENT)
        self.assertTrue(self.blocked(limiter))
        self.clock.advance(59.9)
        self.assertTrue(self.blocked(limiter))
        self.clock.advance(0.1)
        self.assertFalse(self.blocked(limiter))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_memory_bounded(self) -> None:
        """Addresses whose window and cooldown are over are forgotten, and no more than
        max_addresses are kept however many send failures."""
        limiter = self.make(max_addresses=100)
        for n in range(1000):
            self.failed(limiter, f"2001:db8::{n:x}")
        self.assertEqual(len(limiter._entries), 100)
        self.clock.advance(61)
        self.failed(limiter, CLIENT)
        self.assertEqual(list(limiter._entries), [CLIENT])


class RedisAttemptsTests(AttemptsContract, TestCase):
    """The shared limiter against a real redis-server."""

    timeout = 30

    def setUp(self) -> None:
        self.server = start_redis(self)
        self.redis = self.server.client()
        self.addCleanup(self.redis.close)

    def store(self) -> RedisTokenStore:
        store = RedisTokenStore(RedisConfig.from_url(self.server.url()), reactor, reactor=reactor)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    def make(self, max_failed: int = 3) -> RedisFailedAttempts:
        return RedisFailedAttempts(self.store(), max_failed)

    @inlineCallbacks
    def test_shared_between_proxies(self) -> Any:
        """Failures seen by two proxies add up, and a cooldown started by one holds for both;
        the keys expire with the window and the cooldown (no sleeping: their TTLs are read)."""
        one, two = self.make(), self.make()
        yield one.failed(CLIENT)
        yield two.failed(CLIENT)
        yield one.failed(CLIENT)
        self.assertIs((yield two.blocked(CLIENT)), False)
        yield two.failed(CLIENT)
        self.assertIs((yield one.blocked(CLIENT)), True)
        self.assertIs((yield two.blocked(CLIENT)), True)
        self.assertEqual(self.redis.get(FAILED_KEY_PREFIX + CLIENT), "4")
        self.assertTrue(0 < self.redis.pttl(FAILED_KEY_PREFIX + CLIENT) <= 60_000)
        self.assertTrue(0 < self.redis.pttl(BLOCKED_KEY_PREFIX + CLIENT) <= 60_000)

    @inlineCallbacks
    def test_cooldown_over(self) -> Any:
        """Once the cooldown key has expired the address is let through again."""
        limiter = self.make()
        for _ in range(4):
            yield limiter.failed(CLIENT)
        self.assertIs((yield limiter.blocked(CLIENT)), True)
        self.redis.delete(BLOCKED_KEY_PREFIX + CLIENT)  # what its expiry does
        self.assertIs((yield limiter.blocked(CLIENT)), False)

    @inlineCallbacks
    def test_redis_down_fails_open(self) -> Any:
        """Without Redis nobody is blocked and nothing fails: the lookup reports 4503."""
        limiter = RedisFailedAttempts(self.store(), 3)
        for _ in range(4):
            yield limiter.failed(CLIENT)
        self.server.stop()
        self.assertIs((yield limiter.blocked(CLIENT)), False)
        self.assertIsNone((yield limiter.failed(CLIENT)))


class AttemptsForTests(SynchronousTestCase):
    """attempts_for picks the shared limiter for Redis, the memory one otherwise."""

    def test_choice(self) -> None:
        """Redis store: RedisFailedAttempts; any other store: MemoryFailedAttempts."""
        redis_store = RedisTokenStore(RedisConfig.from_url("redis://h:1"), Clock())
        self.assertIsInstance(attempts_for(redis_store, Clock(), 5), RedisFailedAttempts)
        memory = attempts_for(MemoryTokenStore(), Clock(), 5)
        self.assertIsInstance(memory, MemoryFailedAttempts)
        self.assertEqual(memory.max_failed, 5)
