"""
The revocation subscription's state machine, driven by hand: which change tells whom, when a
re-check runs (at once, or once the pool is back), what is logged; no Redis, no sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.tokens.support import log_messages
from vncmux.tokens import RedisConfig
from vncmux.tokens.redis.subscription import RevocationSubscription, SubscriptionState


@implementer(IStreamClientEndpoint)
class _NeverConnects:
    """An endpoint whose connection attempts stay pending (until cancelled)."""

    def __init__(self) -> None:
        self.attempts = 0
        self.cancelled = 0

    def connect(self, factory: object) -> Deferred[Any]:
        self.attempts += 1
        return Deferred(self._cancel)

    def _cancel(self, attempt: Deferred[Any]) -> None:
        self.cancelled += 1


class RevocationSubscriptionTests(SynchronousTestCase):
    """Every transition of L{RevocationSubscription}, and what it tells."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool_down = False
        self.endpoints: list[_NeverConnects] = []
        self.rechecks = 0
        self.revoked: list[str] = []
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.subscription = RevocationSubscription(
            RedisConfig.from_url("redis://:hunter2@localhost"),
            self.clock,
            endpoint=self.new_endpoint,
            retry_policy=lambda attempt: float(attempt),
            keepalive_interval=5.0,
            pool_down=lambda: self.pool_down,
        )
        self.subscription.watch(self.revoked.append, self.recheck)

    def new_endpoint(self) -> _NeverConnects:
        endpoint = _NeverConnects()
        self.endpoints.append(endpoint)
        return endpoint

    def recheck(self) -> None:
        self.rechecks += 1

    def lose_once_subscribed(self) -> None:
        self.subscription.subscribed()
        self.subscription.lost()

    def test_first_subscription(self) -> None:
        """The first subscription fires its waiters and asks for no re-check: nothing was
        missed before it."""
        waiter = self.subscription.next_subscription()
        self.assertIs(self.subscription.state, SubscriptionState.FIRST)
        self.subscription.subscribed()
        self.assertIs(self.subscription.state, SubscriptionState.SUBSCRIBED)
        self.assertIsNone(self.successResultOf(waiter))
        self.assertEqual(self.rechecks, 0)
        self.assertNotIn("revocations: subscribed again", log_messages(self.log))

    def test_loss_before_any_subscription(self) -> None:
        """A connection lost before it subscribed changes nothing: no loss is told."""
        loss = self.subscription.next_loss()
        self.subscription.lost()
        self.assertIs(self.subscription.state, SubscriptionState.FIRST)
        self.assertNoResult(loss)

    def test_loss_then_subscribed_again(self) -> None:
        """A loss fires the loss waiters (once); the next subscription re-checks at once
        when the pool is up."""
        loss = self.subscription.next_loss()
        self.lose_once_subscribed()
        self.assertIs(self.subscription.state, SubscriptionState.LOST)
        self.assertIsNone(self.successResultOf(loss))
        self.subscription.lost()  # a second report of the same loss is nothing new
        self.assertEqual(self.rechecks, 0)
        self.subscription.subscribed()
        self.assertIs(self.subscription.state, SubscriptionState.SUBSCRIBED)
        self.assertEqual(self.rechecks, 1)
        self.assertIn("revocations: subscribed again", log_messages(self.log))

    def test_recheck_waits_for_the_pool(self) -> None:
        """Subscribed again while the pool has no connection: the re-check is owed until the
        pool is back, and runs once."""
        self.pool_down = True
        self.lose_once_subscribed()
        self.subscription.subscribed()
        self.assertEqual((self.rechecks, self.subscription.recheck_owed), (0, True))
        self.pool_down = False
        self.subscription.pool_back()
        self.assertEqual((self.rechecks, self.subscription.recheck_owed), (1, False))
        self.subscription.pool_back()
        self.assertEqual(self.rechecks, 1)

    def test_owed_recheck_served_by_the_next_subscription(self) -> None:
        """An owed re-check is served by the next subscription with the pool up, not twice."""
        self.pool_down = True
        self.lose_once_subscribed()
        self.subscription.subscribed()
        self.subscription.lost()
        self.pool_down = False
        self.subscription.subscribed()
        self.assertEqual((self.rechecks, self.subscription.recheck_owed), (1, False))
        self.subscription.pool_back()
        self.assertEqual(self.rechecks, 1)

    def test_pool_back_without_owed_recheck(self) -> None:
        """The pool coming back re-checks nothing unless a subscription owed it."""
        self.subscription.subscribed()
        self.subscription.pool_back()
        self.assertEqual(self.rechecks, 0)

    def test_retry_delay_counts_unusable_connections(self) -> None:
        """Connections that never subscribed push the backoff on (ClientService forgets
        them); a subscription resets it."""
        for _ in range(3):
            self.subscription.connected(object())
        self.assertEqual(self.subscription.retry_delay(0), 3.0)
        self.assertEqual(self.subscription.retry_delay(5), 5.0)
        self.subscription.subscribed()
        self.assertEqual(self.subscription.retry_delay(0), 0.0)

    def test_problem_logged_once_until_subscribed(self) -> None:
        """The same problem is logged once, without the password, and again after the
        subscription worked in between."""

        def logged() -> list[str]:
            return [m for m in log_messages(self.log) if m.startswith("revocations: Redis")]

        self.subscription.problem("Redis error: could not auth: hunter2 is wrong.")
        self.subscription.problem("Redis error: could not auth: hunter2 is wrong.")
        self.assertEqual(
            logged(), ["revocations: Redis refused the credentials (AUTH failed: *** is wrong)"]
        )
        self.subscription.subscribed()
        self.subscription.problem("Redis error: could not auth: hunter2 is wrong.")
        self.assertEqual(len(logged()), 2)

    def test_messages(self) -> None:
        """Text and UTF-8 bytes reach every watcher; other replies are dropped; a failing
        watcher is logged and does not stop the others."""

        def broken(message: str) -> None:
            raise RuntimeError("watcher bug")

        later: list[str] = []
        self.subscription.watch(broken, None)
        self.subscription.watch(later.append, None)
        self.subscription.message_received("abc")
        self.subscription.message_received(b"instance:i-1")
        self.subscription.message_received(1)
        self.assertEqual(self.revoked, ["abc", "instance:i-1"])
        self.assertEqual(later, ["abc", "instance:i-1"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_start_once_and_stop(self) -> None:
        """L{start} connects through a new endpoint only once; L{stop} cancels the attempt
        and a second stop has nothing to do."""
        self.assertTrue(self.subscription.watched)
        self.assertIsNone(self.subscription.stop())
        self.subscription.start()
        self.subscription.start()
        self.assertEqual(len(self.endpoints), 1)
        self.assertEqual((self.endpoints[0].attempts, self.endpoints[0].cancelled), (1, 0))
        stopped = self.subscription.stop()
        self.assertIsNotNone(stopped)
        self.assertEqual(self.endpoints[0].cancelled, 1)
        self.assertIsNone(self.subscription.stop())

    def test_loss_logged_only_while_started(self) -> None:
        """A loss while the subscription runs is logged; the loss that L{stop} causes is not
        (it is still told to the loss waiters)."""
        warning = "revocations: lost the Redis subscription; reconnecting"
        self.subscription.start()
        self.lose_once_subscribed()
        self.assertEqual(log_messages(self.log).count(warning), 1)
        self.subscription.subscribed()
        self.subscription.stop()
        loss = self.subscription.next_loss()
        self.subscription.lost()
        self.assertIsNone(self.successResultOf(loss))
        self.assertEqual(log_messages(self.log).count(warning), 1)
