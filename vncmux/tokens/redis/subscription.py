"""
The revocation subscription of the Redis token store: its own connection, subscribed to
``vncmux:revoke``, re-established with backoff when it is lost.

Messages published while it is down are missed, so every subscription after a loss is
followed by a re-check of the live sessions (the watchers' C{on_reconnect}). The re-check
reads records through the store's pool: when the pool has no connection either, it is owed
until the pool is back.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from vncmux.tokens.redis.client import SubscriberFactory
from vncmux.tokens.redis.config import RedisConfig, describe_connection_error


class SubscriptionState(enum.Enum):
    """Where the subscription stands; what a new subscription means depends on it."""

    #: Never subscribed: nothing can have been missed, so subscribing needs no re-check.
    FIRST = "subscribing"
    #: Subscribed: revocations arrive as they are published.
    SUBSCRIBED = "subscribed"
    #: Was subscribed and lost it: revocations may be missed until the next subscription,
    #: which is followed by a re-check.
    LOST = "resubscribing"


class RevocationSubscription:
    """
    The subscription's states (L{SubscriptionState}) and what each change tells: waiters,
    watchers, one log line per problem. The connection itself is a C{ClientService} over
    C{endpoint()}, started by L{start}; its protocol (L{SubscriberFactory}) reports
    L{connected}, L{subscribed}, L{problem}, L{message_received} and L{lost}, and the store
    reports L{pool_back}.
    """

    _log = Logger()

    def __init__(
        self,
        config: RedisConfig,
        clock: IReactorTime,
        *,
        endpoint: Callable[[], IStreamClientEndpoint],
        retry_policy: Callable[[int], float],
        keepalive_interval: float,
        pool_down: Callable[[], bool],
    ) -> None:
        self.config = config
        self.clock = clock
        self.keepalive_interval = keepalive_interval
        self._endpoint = endpoint
        self._retry_policy = retry_policy
        self._pool_down = pool_down
        self._state = SubscriptionState.FIRST
        self._service: ClientService | None = None
        self._watchers: list[Callable[[str], object]] = []
        self._reconnect_watchers: list[Callable[[], object]] = []
        self._subscription_waiters: list[Deferred[None]] = []
        self._loss_waiters: list[Deferred[None]] = []
        # Connections made since the last successful SUBSCRIBE: ClientService forgets failed
        # attempts once TCP connects, so without this a refused AUTH would be retried at the
        # first backoff step forever.
        self._unusable_connections = 0
        self._trouble: str | None = None
        #: Subscribed again while the pool had no connection: the re-check waits for it.
        self.recheck_owed = False

    @property
    def state(self) -> SubscriptionState:
        """Where the subscription stands."""
        return self._state

    @property
    def watched(self) -> bool:
        """Whether anybody watches revocations (then the store keeps a subscription)."""
        return bool(self._watchers)

    def watch(
        self, on_revoke: Callable[[str], object], on_reconnect: Callable[[], object] | None
    ) -> None:
        """Call C{on_revoke(message)} for every message, C{on_reconnect()} after a gap."""
        self._watchers.append(on_revoke)
        if on_reconnect is not None:
            self._reconnect_watchers.append(on_reconnect)

    def start(self) -> None:
        """Connect and subscribe (with backoff, again after every loss); once at a time."""
        if self._service is not None:
            return
        self._unusable_connections = 0
        self._service = ClientService(
            self._endpoint(),
            SubscriberFactory(self),
            retryPolicy=self.retry_delay,
            clock=self.clock,
            prepareConnection=self.connected,
        )
        self._service.startService()

    def stop(self) -> Deferred[None] | None:
        """Close the connection (a loss that follows is not logged); C{None} if not started."""
        service, self._service = self._service, None
        if service is None:
            return None
        stopped: Deferred[None] = service.stopService()
        return stopped

    def next_subscription(self) -> Deferred[None]:
        """A Deferred that fires the next time the subscription becomes active."""
        waiter: Deferred[None] = Deferred()
        self._subscription_waiters.append(waiter)
        return waiter

    def next_loss(self) -> Deferred[None]:
        """A Deferred that fires the next time an active subscription is lost."""
        waiter: Deferred[None] = Deferred()
        self._loss_waiters.append(waiter)
        return waiter

    def retry_delay(self, attempt: int) -> float:
        """Seconds before the next connection: connections that never subscribed count."""
        return self._retry_policy(max(attempt, self._unusable_connections))

    # events

    def connected(self, protocol: object) -> None:
        """A connection is made: unusable until it has subscribed."""
        self._unusable_connections += 1

    def subscribed(self) -> None:
        """SUBSCRIBE was answered: after a loss, the watchers re-check (now or when the pool
        is back, since the re-check reads through it)."""
        again = self._state is not SubscriptionState.FIRST
        self._state = SubscriptionState.SUBSCRIBED
        self._unusable_connections = 0
        self._trouble = None
        if again:
            self._log.info("revocations: subscribed again")
            self.recheck_owed = self._pool_down()
            if not self.recheck_owed:
                self._notify_reconnect_watchers()
        waiters, self._subscription_waiters = self._subscription_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def lost(self) -> None:
        """The connection is gone (or never subscribed); logged unless L{stop} ended it."""
        if self._state is not SubscriptionState.SUBSCRIBED:
            return
        self._state = SubscriptionState.LOST
        if self._service is not None:
            self._log.warn("revocations: lost the Redis subscription; reconnecting")
        waiters, self._loss_waiters = self._loss_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def pool_back(self) -> None:
        """The store's pool has a connection again: an owed re-check runs now."""
        if self.recheck_owed:
            self.recheck_owed = False
            self._notify_reconnect_watchers()

    def problem(self, why: str) -> None:
        """Logged once until the subscription works again, not at every retry."""
        text = describe_connection_error(self.config, why)
        if text != self._trouble:
            self._log.warn("revocations: {why}", why=text)
        self._trouble = text

    def message_received(self, message: object) -> None:
        """A message on the channel: a token hash, or ``instance:<uuid>``."""
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if not isinstance(message, str):
            return
        for on_revoke in list(self._watchers):
            self._call_watcher(on_revoke, message)

    def _notify_reconnect_watchers(self) -> None:
        for on_reconnect in list(self._reconnect_watchers):
            self._call_watcher(on_reconnect)

    def _call_watcher(self, callback: Callable[..., object], *args: str) -> None:
        try:
            callback(*args)
        except Exception:
            self._log.failure("revocations: a callback failed")
