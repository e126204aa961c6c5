"""The brute-force limiter: failed token lookups per client address, in memory and in Redis."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.redis_server import start_redis
from vncmux.attempts import (
    BLOCKED_KEY_PREFIX,
    FAILED_KEY_PREFIX,
    ClientBlocked,
    IFailedAttempts,
    MemoryFailedAttempts,
    RedisFailedAttempts,
    attempts_for,
)
from vncmux.tokens import (
    MemoryTokenStore,
    RedisConfig,
    RedisTokenStore,
    TokenRecord,
    TokenStoreUnavailable,
    hash_token,
    token_key,
)

CLIENT = "192.0.2.7"
GOOD = "a-good-token"
OTHER = "2001:db8::7"


def _blocked_events(log: EventLoggingObserver) -> list[dict[str, Any]]:
    return [e for e in log if e.get("vncmux_event") == "client_blocked"]


#: What L{looked_up} answers for a client that is cooling down.
BLOCKED = "blocked"


def looked_up(
    limiter: IFailedAttempts, address: str, token: str = "never-issued"
) -> Deferred[TokenRecord | None | str]:
    """What C{address}'s lookup of C{token} answers: its record, C{None}, or L{BLOCKED}."""

    def refused(failure: Failure) -> str:
        failure.trap(ClientBlocked)
        return BLOCKED

    return limiter.lookup_unless_blocked(address, token).addErrback(refused)


class AttemptsContract:
    """What every limiter does, with a limit of 3 failures a minute."""

    def make(self, max_failed: int = 3) -> Any:
        """A limiter over a token store that holds L{GOOD}."""
        raise NotImplementedError

    @inlineCallbacks
    def test_guards_the_lookup(self) -> Any:
        """A client's tokens are looked up until it is blocked; then even a good token is
        refused, while other clients' lookups go on."""
        limiter = self.make()
        self.assertEqual((yield looked_up(limiter, CLIENT, GOOD)).token_hash, hash_token(GOOD))
        self.assertIsNone((yield looked_up(limiter, CLIENT)))
        for _ in range(4):
            yield limiter.failed(CLIENT)
        self.assertEqual((yield looked_up(limiter, CLIENT, GOOD)), BLOCKED)
        self.assertEqual((yield looked_up(limiter, OTHER, GOOD)).token_hash, hash_token(GOOD))

    @inlineCallbacks
    def test_blocks_past_the_limit(self) -> Any:
        """Three failures are tolerated; the fourth starts a cooldown for that address
        only, logged once with the address."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        limiter = self.make()
        verifyObject(IFailedAttempts, limiter)
        for _ in range(3):
            yield limiter.failed(CLIENT)
            self.assertIsNone((yield looked_up(limiter, CLIENT)))
        yield limiter.failed(CLIENT)
        self.assertEqual((yield looked_up(limiter, CLIENT)), BLOCKED)
        self.assertIsNone((yield looked_up(limiter, OTHER)))
        yield limiter.failed(CLIENT)
        events = _blocked_events(log)
        self.assertEqual([e["client_address"] for e in events], [CLIENT])

    @inlineCallbacks
    def test_zero_disables(self) -> Any:
        """--max-failed-tokens 0: nobody is ever blocked."""
        limiter = self.make(max_failed=0)
        for _ in range(50):
            yield limiter.failed(CLIENT)
        self.assertIsNone((yield looked_up(limiter, CLIENT)))


class MemoryAttemptsTests(AttemptsContract, SynchronousTestCase):
    """The per-process limiter on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def make(self, max_failed: int = 3, **kwargs: Any) -> MemoryFailedAttempts:
        store = MemoryTokenStore()
        store.add(GOOD, "10.0.0.5", 5900)
        return MemoryFailedAttempts(store, self.clock, max_failed, **kwargs)

    def failed(self, limiter: MemoryFailedAttempts, address: str, times: int = 1) -> None:
        for _ in range(times):
            self.successResultOf(limiter.failed(address))

    def blocked(self, limiter: MemoryFailedAttempts, address: str = CLIENT) -> bool:
        return self.successResultOf(looked_up(limiter, address)) == BLOCKED

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
        record = TokenRecord(hash_token(GOOD), "10.0.0.5", 5900)
        self.redis.hset(token_key(record.token_hash), mapping=record.to_fields())
        return RedisFailedAttempts(self.store(), max_failed)

    @inlineCallbacks
    def test_shared_between_proxies(self) -> Any:
        """Failures seen by two proxies add up, and a cooldown started by one holds for both;
        the keys expire with the window and the cooldown (no sleeping: their TTLs are read)."""
        one, two = self.make(), self.make()
        yield one.failed(CLIENT)
        yield two.failed(CLIENT)
        yield one.failed(CLIENT)
        self.assertIsNone((yield looked_up(two, CLIENT)))
        yield two.failed(CLIENT)
        self.assertEqual((yield looked_up(one, CLIENT)), BLOCKED)
        self.assertEqual((yield looked_up(two, CLIENT)), BLOCKED)
        self.assertEqual(self.redis.get(FAILED_KEY_PREFIX + CLIENT), "4")
        self.assertTrue(0 < self.redis.pttl(FAILED_KEY_PREFIX + CLIENT) <= 60_000)
        self.assertTrue(0 < self.redis.pttl(BLOCKED_KEY_PREFIX + CLIENT) <= 60_000)

    @inlineCallbacks
    def test_cooldown_over(self) -> Any:
        """Once the cooldown key has expired the address is let through again."""
        limiter = self.make()
        for _ in range(4):
            yield limiter.failed(CLIENT)
        self.assertEqual((yield looked_up(limiter, CLIENT)), BLOCKED)
        self.redis.delete(BLOCKED_KEY_PREFIX + CLIENT)  # what its expiry does
        self.assertIsNone((yield looked_up(limiter, CLIENT)))

    @inlineCallbacks
    def test_redis_down(self) -> Any:
        """Without Redis the lookup fails as the store's (the upgrade gets 4503, not 4429),
        and counting a failure fails open."""
        limiter = RedisFailedAttempts(self.store(), 3)
        for _ in range(4):
            yield limiter.failed(CLIENT)
        self.server.stop()
        yield self.assertFailure(looked_up(limiter, CLIENT), TokenStoreUnavailable)
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
