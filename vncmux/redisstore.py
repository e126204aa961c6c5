"""
The Redis token store (docs/running.md, "The Redis layout"), and L{open_token_store} for
``--tokens``.

txredisapi imports and uses the global reactor; it is imported lazily and stays inside
L{RedisTokenStore}, so importing this module installs no reactor. Every call is bounded by
C{reply_timeout} on the injected clock, whatever txredisapi does.
"""

from __future__ import annotations

import functools
import math
import socket
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.interfaces import (
    IActivitySink,
    IRevocationFeed,
    ISingleUse,
    ITokenAdmin,
    ITokenStore,
)
from vncmux.novadb import (
    DEFAULT_RECHECK_INTERVAL,
    SOURCE_PREFIX,
    NovaDatabase,
    NovaTokenStore,
)
from vncmux.tokens import (
    BadTarget,
    FileTokenStore,
    TokenRecord,
    TokenStoreUnavailable,
    UnsupportedOperation,
    format_target,
    hash_token,
    number_text,
    parse_token_value,
    token_id_of,
)
from vncmux.tokens.redis.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REPLY_TIMEOUT,
    SCHEMES,
    SENTINEL_TLS_SCHEMES,
    RedisConfig,
    describe_connection_error,
    tls_options,
)
from vncmux.tokens.redis.scripts import (
    CLAIM_USE_SCRIPT,
    INSTANCE_KEY_PREFIX,
    INSTANCE_PRUNE_THRESHOLD,
    ISSUE_SCRIPT,
    RECORD_ACTIVITY_SCRIPT,
    REVOKE_CHANNEL,
    REVOKE_INSTANCE_SCRIPT,
    REVOKE_SCRIPT,
    TOKEN_KEY_PREFIX,
    USED_KEY_PREFIX,
    instance_key,
    token_key,
)

# txredisapi aborts a connection whose reply is late, but only while its own timer runs;
# our deadline cancels the command (and that timer) at reply_timeout. Its timer is set a
# little shorter so that a silent-but-open connection is aborted and reconnected instead of
# every later command on it being cancelled by our deadline, forever.
_INNER_REPLY_FRACTION = 0.8
_ACTIVITY_BATCH = 1000
_USED_TTL = 86400

#: While subscribed, the revocation connection is PINGed this often (seconds): without
#: traffic a dropped connection (NAT or firewall timeout, dead host) looks open forever.
DEFAULT_KEEPALIVE_INTERVAL = 5.0
# TCP keepalive on every Redis socket (seconds, probes): a dead peer is noticed by the
# kernel within about a minute even on a connection with nothing in flight.
_TCP_KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


def _keep_alive(transport: object) -> None:
    """
    TCP keepalive on a Redis connection (best effort: a transport without a socket, or a
    platform without the options, is left as it is).
    """
    set_keepalive = getattr(transport, "setTcpKeepAlive", None)
    get_handle = getattr(transport, "getHandle", None)
    if set_keepalive is None or get_handle is None:
        return
    try:
        set_keepalive(1)
        handle = get_handle()
        for option, value in _TCP_KEEPALIVE:
            if hasattr(socket, option):
                handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except (OSError, AttributeError):
        pass


@functools.cache
def _subscriber_protocol() -> type:
    """txredisapi's SubscriberProtocol, subscribing to the revocation channel when ready."""
    import txredisapi

    class RevocationSubscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        """
        Subscribes, then PINGs every C{keepalive_interval} on the store's clock: Redis answers
        PING in subscribe mode, and a SUBSCRIBE or PING without an answer within the reply
        timeout aborts the connection, so ClientService reconnects and the store calls
        C{on_reconnect}. Without this a silently dropped connection would look open forever.
        """

        factory: _SubscriberFactory
        _keepalive: LoopingCall | None = None

        def connectionMade(self) -> Any:
            _keep_alive(self.transport)
            ready = super().connectionMade()  # AUTH first, when a password is set
            self.whenConnected().addCallback(self._subscribe)
            return ready

        def _deadline(self, waiting: Deferred[Any]) -> Deferred[Any]:
            store = self.factory.store
            return waiting.addTimeout(store.config.reply_timeout, store._clock)

        def _subscribe(self, _: object) -> None:
            subscribing = self._deadline(self.subscribe(REVOKE_CHANNEL))
            subscribing.addCallbacks(self._subscribed, self._failed, errbackArgs=("SUBSCRIBE",))

        def _subscribed(self, _: object) -> None:
            store = self.factory.store
            self._keepalive = LoopingCall(self._ping)
            self._keepalive.clock = store._clock
            self._keepalive.start(store.keepalive_interval, now=False)
            store._subscribed()

        def _ping(self) -> Deferred[Any]:
            try:
                sent = self.execute_command("PING", apply_timeout=False)
            except Exception:
                sent = fail()
            # Returned, so LoopingCall never sends a PING while one is still unanswered.
            return self._deadline(sent).addErrback(self._failed, "PING")

        def _failed(self, failure: Failure, command: str) -> None:
            if failure.check(defer.TimeoutError):
                timeout = self.factory.store.config.reply_timeout
                why = f"no answer to {command} within {timeout:g} s; reconnecting"
            elif failure.check(txredisapi.ConnectionError):
                return  # the connection is already gone; ClientService reconnects
            else:
                why = f"{command} failed: {failure.getErrorMessage()}"
            self.factory.store._subscriber_problem(why)
            self.transport.abortConnection()

        def messageReceived(self, pattern: object, channel: object, message: object) -> None:
            self.factory.store._revocation_message(message)

        def connectionLost(self, why: Failure) -> None:
            if self._keepalive is not None and self._keepalive.running:
                self._keepalive.stop()
            try:
                super().connectionLost(why)
            finally:
                self.factory.store._unsubscribed()

    return RevocationSubscriber


class _SubscriberFactory(Factory):
    """Builds the revocation subscriber; ClientService reconnects it."""

    noisy = False
    # Read by txredisapi only to decide whether to log a failed AUTH itself, at every retry;
    # the store logs it once instead.
    isLazy = False

    def __init__(self, store: RedisTokenStore) -> None:
        self.store = store

    def buildProtocol(self, addr: object) -> Any:
        config = self.store.config
        protocol = _subscriber_protocol()(
            charset="utf-8",
            replyTimeout=config.reply_timeout,
            password=config.password,
            dbid=None,
            convertNumbers=False,
            username=config.username,
        )
        protocol.factory = self
        return protocol

    def stopTrying(self) -> None:
        """txredisapi calls this when AUTH fails: keep retrying, with backoff."""

    def connectionError(self, why: str) -> None:
        self.store._subscriber_problem(why)


@functools.cache
def _pool_factories() -> tuple[type, type]:
    """
    txredisapi's pool factories (plain and Sentinel), changed where its own behaviour hurts a
    long-running server. When AUTH or SELECT fails, txredisapi stops reconnecting for good
    (the store would stay down after the password is fixed) and errbacks a Deferred nobody
    holds ("Unhandled error in Deferred"); these keep reconnecting, each pool slot backing
    off across connections that never became usable, and tell the store, which names the
    failure in its errors and logs it once.
    """
    import txredisapi

    class AbandonedOnTimeout:
        """
        txredisapi fails a command whose reply is late, and only then aborts its connection:
        a command sent from that failure's callbacks (a retry, the next lookup) would still
        pick the doomed connection and fail at once. Marking it dead first makes the pool
        skip it.
        """

        def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
            result: Deferred[Any] = super().execute_command(*args, **kwargs)  # type: ignore[misc]
            return result.addErrback(self._timed_out)

        def _timed_out(self, failure: Failure) -> Failure:
            if failure.check(txredisapi.TimeoutError):
                self.connected = 0
            return failure

    class PoolProtocol(AbandonedOnTimeout, txredisapi.RedisProtocol):  # type: ignore[misc]
        pass

    class SentinelPoolProtocol(AbandonedOnTimeout, txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
        pass

    class StorePoolFactory:
        def __init__(self, *args: Any, store: RedisTokenStore, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.store = store
            self.isLazy = False  # as in _SubscriberFactory: the store logs a failed AUTH

        def stopTrying(self) -> Deferred[None]:
            """Called by txredisapi when AUTH or SELECT fails: keep trying, with backoff."""
            return succeed(None)

        def retryDelay(self, attempt: int) -> float:
            policy = self.store._reconnect_policy
            return policy(attempt) if policy is not None else super().retryDelay(attempt)  # type: ignore[misc]

        def connectionError(self, why: str) -> None:
            self.store._pool_problem(why)

        def addConnection(self, conn: Any) -> None:
            super().addConnection(conn)  # type: ignore[misc]
            if conn in self.pool:  # type: ignore[attr-defined]
                _keep_alive(conn.transport)
                self.store._pool_connected(_peer_of(conn.transport))

        # txredisapi calls delConnection when a pool connection is gone, and sets `stopped`
        # on disconnect(); both undocumented, pinned by tests/integration/test_faults.py
        # (RedisStoppedTests: 4503 at once) and every test that stops a store.
        def delConnection(self, conn: Any) -> None:
            super().delConnection(conn)  # type: ignore[misc]
            if not self.pool and not self.stopped:  # type: ignore[attr-defined]
                self.store._pool_lost()

    class PoolFactory(StorePoolFactory, txredisapi.RedisFactory):  # type: ignore[misc]
        protocol = PoolProtocol

    class SentinelPoolFactory(StorePoolFactory, txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
        protocol = SentinelPoolProtocol

    return PoolFactory, SentinelPoolFactory


@functools.cache
def _sentinel_class() -> type:
    """
    txredisapi's Sentinel client, with master discovery bounded on the store's clock and
    cancelled by C{disconnect()}. txredisapi's own C{discover_master} arms a timer on the
    global reactor that only an answer naming a healthy master cancels: during a failover
    (every Sentinel reports the master down) a store stopped meanwhile left it behind.
    Relies on txredisapi's C{sentinels} (one lazy connection per Sentinel),
    C{check_master_state} and C{discovery_timeout}, which both the pool's and the
    subscriber's endpoints go through; pinned by the Sentinel tests in tests/test_tokens.py
    and tests/integration/test_sentinel.py.
    """
    import txredisapi

    class StoreSentinel(txredisapi.Sentinel):  # type: ignore[misc]
        def __init__(self, *args: Any, clock: IReactorTime, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.clock = clock
            self.discoveries: set[Deferred[tuple[str, int]]] = set()

        def discover_master(self, service_name: str) -> Deferred[tuple[str, int]]:
            found: Deferred[tuple[str, int]] = Deferred()

            def answered(masters: object) -> None:
                state = masters.get(service_name) if isinstance(masters, dict) else None
                if not found.called and state and self.check_master_state(state):
                    found.callback((state["ip"], int(state["port"])))

            for sentinel in self.sentinels:
                sentinel.sentinel_masters().addCallbacks(answered, lambda _: None)

            def not_found(failure: Failure) -> Failure:
                if failure.check(defer.TimeoutError):
                    return Failure(
                        txredisapi.MasterNotFoundError(f"No master found for {service_name}")
                    )
                return failure

            def forget(result: object) -> object:
                self.discoveries.discard(found)
                return result

            self.discoveries.add(found)
            found.addBoth(forget)
            return found.addTimeout(self.discovery_timeout, self.clock).addErrback(not_found)

        def disconnect(self) -> Deferred[Any]:
            for discovery in list(self.discoveries):
                discovery.cancel()
            return super().disconnect()  # type: ignore[no-any-return]

    return StoreSentinel


def _peer_of(transport: Any) -> str:
    """``host:port`` of the Redis server at the other end of C{transport}."""
    try:
        peer = transport.getPeer()
        return format_target(peer.host, peer.port)
    except (AttributeError, BadTarget):
        return "an unknown address"


class RedisNotConnected(Exception):
    """Every connection of the pool is lost: a call fails at once rather than waiting for
    the reconnection (a browser is better served by a quick 4503 than by a slow one)."""


@implementer(IStreamClientEndpoint)
class _SentinelMasterEndpoint:
    """Asks Sentinel where the master is before every connection attempt."""

    def __init__(self, sentinel: Any, master: str, reactor: Any, timeout: float) -> None:
        self._sentinel = sentinel
        self._master = master
        self._reactor = reactor
        self._timeout = timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        def connect_to(address: tuple[str, int]) -> Deferred[Any]:
            endpoint = HostnameEndpoint(self._reactor, address[0], address[1], self._timeout)
            return endpoint.connect(factory)

        discovering: Deferred[tuple[str, int]] = self._sentinel.discover_master(self._master)
        return discovering.addCallback(connect_to)


@implementer(ITokenStore, ITokenAdmin, IActivitySink, ISingleUse, IRevocationFeed)
class RedisTokenStore(Service):
    """
    Token records in Redis, shared by every proxy instance (docs/running.md, "The Redis layout").

    A service: C{startService} opens one txredisapi lazy connection pool (it reconnects by
    itself, with backoff, also after a refused password), C{stopService} closes it and the
    revocation subscriber (its own connection, PINGed every C{keepalive_interval} seconds of
    C{clock}). Both connect through C{reactor}, by default C{clock} when that can connect.
    Every call fails with L{TokenStoreUnavailable} when Redis is down, slow (over
    C{reply_timeout} on C{clock}, from the call to the answer, waiting for a connection
    included), refuses the password (the error says so) or answers garbage. Once the pool has
    lost every connection, calls fail at once until it has one again (C{reconnects} counts
    those returns; the log names the address, so a Sentinel failover shows).

    Keys of expiring tokens live C{expired_grace} seconds past C{expires_at}, so a late user
    is told "token expired" rather than "invalid token".

    With C{format=websockify} lookups read websockify's layout (the raw token as a string
    key); that layout is not vncmux's to manage, so issuing and revoking are refused.
    """

    _log = Logger()
    name = "token-store"

    def __init__(
        self,
        config: RedisConfig,
        clock: IReactorTime,
        *,
        reactor: Any = None,
        poolsize: int = 2,
        expired_grace: float = 300.0,
        resubscribe_policy: Callable[[int], float] | None = None,
        reconnect_policy: Callable[[int], float] | None = None,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
    ) -> None:
        if not keepalive_interval > 0:
            raise ValueError("keepalive_interval must be positive")
        self.config = config
        self.keepalive_interval = keepalive_interval
        self._clock = clock
        self._reactor = reactor
        self._poolsize = poolsize
        self._expired_grace = expired_grace
        self._resubscribe_policy = resubscribe_policy or backoffPolicy(
            initialDelay=0.25, maxDelay=10.0, factor=2.0
        )
        # Seconds before the pool's n-th consecutive reconnection attempt; None: txredisapi's
        # (1 s, times e, at most 10 s, jittered).
        self._reconnect_policy = reconnect_policy
        self._tls = tls_options(config) if config.tls else None
        self._pool: Any = None
        self._sentinel: Any = None
        self._subscriber: ClientService | None = None
        self._pending: set[Deferred[Any]] = set()
        self._watchers: list[Callable[[str], object]] = []
        self._reconnect_watchers: list[Callable[[], object]] = []
        self._subscribed_now = False
        self._subscriptions = 0
        self._subscription_waiters: list[Deferred[None]] = []
        self._loss_waiters: list[Deferred[None]] = []
        # Subscriber connections made since the last successful SUBSCRIBE: ClientService
        # forgets failed attempts once TCP connects, so without this a refused AUTH would be
        # retried at the first backoff step forever.
        self._unusable_connections = 0
        self._subscriber_trouble: str | None = None
        # Why the pool cannot connect (a refused AUTH, a bad database), until it can again.
        self._connection_problem: str | None = None
        # Every pool connection was lost and none is back yet (not set while the pool makes
        # its first connections, so the first calls wait for them as before).
        self._pool_down = False
        self._redis_address: str | None = None
        self._reconnection_waiters: list[Deferred[None]] = []
        # Re-subscribed while the pool had no connection: the watchers' re-check waits for it.
        self._recheck_when_connected = False
        #: How often the pool connected again after losing every connection (Redis restarted,
        #: or a Sentinel failover to another master): ``vncmux_token_store_reconnects_total``.
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"<RedisTokenStore {self.config.redacted_url()}>"

    @property
    def max_wait(self) -> float:
        """The longest any call waits: compare with the WebSocket open-handshake timeout."""
        return self.config.reply_timeout

    # service

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self._pool_down = False
        config = self.config
        pool_factory, sentinel_pool_factory = _pool_factories()
        common: dict[str, Any] = dict(
            password=config.password,
            username=config.username,
            replyTimeout=config.reply_timeout * _INNER_REPLY_FRACTION,
            convertNumbers=False,
            poolsize=self._poolsize,
        )
        if config.sentinel_master:
            self._sentinel = _sentinel_class()(
                list(config.hosts),
                clock=self._clock,
                password=config.sentinel_password,
                connectTimeout=config.connect_timeout,
                replyTimeout=config.reply_timeout * _INNER_REPLY_FRACTION,
            )
            self._sentinel.discovery_timeout = config.connect_timeout
            self._pool = self._sentinel.master_for(
                config.sentinel_master,
                factory_class=functools.partial(sentinel_pool_factory, store=self),
                dbid=config.db or None,
                isLazy=True,
                **common,
            )
        else:
            factory = pool_factory(
                uuid=format_target(*config.hosts[0]),
                dbid=config.db or None,  # no SELECT round trip for database 0
                isLazy=True,
                store=self,
                **common,
            )
            factory.startConnecting(self._redis_endpoint(*config.hosts[0]))
            self._pool = factory.handler
        self._log.info("token store: {url}", url=config.redacted_url())
        if self._watchers:
            self._start_subscriber()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        for pending in list(self._pending):
            pending.cancel()
        stopping: list[Deferred[Any]] = []
        if self._subscriber is not None:
            stopping.append(self._subscriber.stopService())
            self._subscriber = None
        if self._pool is not None:
            stopping.append(self._pool.disconnect())
            self._pool = None
        if self._sentinel is not None:
            stopping.append(self._sentinel.disconnect())
            self._sentinel = None
        done = gatherResults(stopping, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # ITokenStore

    def lookup(self, token: str) -> Deferred[TokenRecord | None]:
        token_hash = hash_token(token)
        if self.config.websockify_format:
            key = self.config.websockify_key(token)
            return self._run(
                "lookup",
                _about(token_hash),
                lambda pool: pool.get(key).addErrback(_foreign_type),
                lambda value: self._websockify_record(token_hash, value),
            )
        return self.lookup_hash(token_hash)

    def lookup_hash(self, token_hash: str) -> Deferred[TokenRecord | None]:
        """Read a record by its hash (native layout): for re-checks by live sessions."""
        if self.config.websockify_format:
            return fail(UnsupportedOperation("websockify-format keys are raw tokens, not hashes"))
        return self._run(
            "lookup",
            _about(token_hash),
            lambda pool: pool.hgetall(token_key(token_hash)),
            lambda fields: _from_hash_fields(token_hash, fields),
        )

    def ping(self) -> Deferred[None]:
        def check(reply: object) -> None:
            if reply != "PONG":
                raise ValueError(f"PING answered {reply!r}")

        return self._run("ping", "", lambda pool: pool.ping(), check)

    def evaluate(self, what: str, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        """
        Run a Lua C{script} with the store's deadline and error handling (for vncmux's own
        counters that live next to the tokens, e.g. failed attempts); fails with
        L{TokenStoreUnavailable} as every other call does. C{what} names it in the log.
        """
        return self._run(what, "", lambda pool: pool.eval(script, keys, args), lambda r: r)

    # ITokenAdmin

    def issue(self, record: TokenRecord, token: str) -> Deferred[None]:
        if self.config.websockify_format:
            return fail(_read_only())
        token_hash = hash_token(token)
        if record.token_hash != token_hash:
            record = replace(record, token_hash=token_hash)
        ttl = self._ttl(record.expires_at)
        keys = [token_key(token_hash)]
        if record.instance_uuid:
            keys.append(instance_key(record.instance_uuid))
        args = [str(ttl), token_hash, TOKEN_KEY_PREFIX, str(INSTANCE_PRUNE_THRESHOLD)]
        for name, value in record.to_fields().items():
            args += [name, value]
        return self._run(
            "issue",
            _about(token_hash),
            lambda pool: pool.eval(ISSUE_SCRIPT, keys, args),
            lambda _: None,
        )

    def revoke(self, token_hash: str) -> Deferred[bool]:
        if self.config.websockify_format:
            return fail(_read_only())
        args = [token_hash, REVOKE_CHANNEL, INSTANCE_KEY_PREFIX, TOKEN_KEY_PREFIX]
        return self._run(
            "revoke",
            _about(token_hash),
            lambda pool: pool.eval(REVOKE_SCRIPT, [token_key(token_hash)], args),
            lambda deleted: _integer(deleted) > 0,
        )

    def revoke_instance(self, instance_uuid: str) -> Deferred[int]:
        if self.config.websockify_format:
            return fail(_read_only())
        args = [TOKEN_KEY_PREFIX, REVOKE_CHANNEL, instance_uuid]
        return self._run(
            "revoke_instance",
            f"instance {instance_uuid}",
            lambda pool: pool.eval(REVOKE_INSTANCE_SCRIPT, [instance_key(instance_uuid)], args),
            _integer,
        )

    # IActivitySink, ISingleUse, IRevocationFeed

    def record_activity(self, updates: Mapping[str, float]) -> Deferred[None]:
        """
        Write C{last_activity_at} (only ever forward) for every token that still exists, in
        one script call per 1000 tokens; nothing is written for websockify-format tokens.
        """
        if self.config.websockify_format or not updates:
            return succeed(None)
        items = list(updates.items())
        batches = []
        for start in range(0, len(items), _ACTIVITY_BATCH):
            batch = items[start : start + _ACTIVITY_BATCH]
            keys = [token_key(h) for h, _ in batch]
            args = [number_text(seconds) for _, seconds in batch]

            def evaluate(pool: Any, keys: list[str] = keys, args: list[str] = args) -> Any:
                return pool.eval(RECORD_ACTIVITY_SCRIPT, keys, args)

            batches.append(
                self._run("record_activity", f"{len(batch)} tokens", evaluate, lambda _: None)
            )
        if len(batches) == 1:
            return batches[0]
        return gatherResults(batches, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure
        )

    def claim_use(self, token_hash: str) -> Deferred[bool]:
        """C{True} for the first claim of an existing token, C{False} after (or when gone)."""
        now = number_text(self._clock.seconds())
        if self.config.websockify_format:
            return self._run(
                "claim_use",
                _about(token_hash),
                lambda pool: pool.set(
                    USED_KEY_PREFIX + token_hash, now, expire=_USED_TTL, only_if_not_exists=True
                ),
                lambda reply: reply == "OK",
            )
        return self._run(
            "claim_use",
            _about(token_hash),
            lambda pool: pool.eval(CLAIM_USE_SCRIPT, [token_key(token_hash)], [now]),
            lambda claimed: _integer(claimed) == 1,
        )

    def watch_revocations(
        self,
        on_revoke: Callable[[str], object],
        on_reconnect: Callable[[], object] | None = None,
    ) -> Deferred[None]:
        """
        Call C{on_revoke(message)} for every message on ``vncmux:revoke``, on a connection of
        its own that is re-established (with backoff) and re-subscribed after it is lost.
        Messages published while it was down are missed: C{on_reconnect()} is called after
        every re-subscription (once the pool has a connection again too, if it lost them all)
        so the caller can re-check its live sessions (L{lookup_hash}).

        @return: a Deferred that fires once the subscription is active.
        """
        self._watchers.append(on_revoke)
        if on_reconnect is not None:
            self._reconnect_watchers.append(on_reconnect)
        if self.running and self._subscriber is None:
            self._start_subscriber()
        if self._subscribed_now:
            return succeed(None)
        return self.next_subscription()

    def next_subscription(self) -> Deferred[None]:
        """A Deferred that fires the next time the revocation subscription becomes active."""
        waiter: Deferred[None] = Deferred()
        self._subscription_waiters.append(waiter)
        return waiter

    def next_reconnection(self) -> Deferred[None]:
        """A Deferred that fires the next time the pool connects again after losing every
        connection (calls work again from then on)."""
        waiter: Deferred[None] = Deferred()
        self._reconnection_waiters.append(waiter)
        return waiter

    def next_subscription_loss(self) -> Deferred[None]:
        """A Deferred that fires the next time an active revocation subscription is lost."""
        waiter: Deferred[None] = Deferred()
        self._loss_waiters.append(waiter)
        return waiter

    # internals

    def _run(
        self,
        what: str,
        subject: str,
        command: Callable[[Any], Deferred[Any]],
        convert: Callable[[Any], Any],
    ) -> Deferred[Any]:
        """
        Run one command with the deadline, and turn every failure into TokenStoreUnavailable
        and one log line naming C{subject} (``token <token_id>``, never a token).
        """
        if self._pool is None:
            return fail(TokenStoreUnavailable("the Redis token store is not running"))
        if self._pool_down:
            return fail(RedisNotConnected()).addErrback(self._unavailable, what, subject)
        try:
            sent = command(self._pool)
        except Exception:
            sent = fail()
        self._pending.add(sent)
        sent.addTimeout(self.config.reply_timeout, self._clock)

        def forget(result: object) -> object:
            self._pending.discard(sent)
            return result

        sent.addBoth(forget)
        sent.addCallback(convert)
        sent.addErrback(self._unavailable, what, subject)
        return sent

    def _unavailable(self, failure: Failure, what: str, subject: str) -> None:
        import txredisapi

        lost = (
            defer.TimeoutError,
            error.TimeoutError,
            txredisapi.ConnectionError,
            RedisNotConnected,
        )
        if self._connection_problem is not None and failure.check(*lost):
            why = self._connection_problem  # e.g. the refused password, not just "no answer"
        elif failure.check(RedisNotConnected):
            why = "no connection to Redis; reconnecting"
        elif failure.check(defer.TimeoutError, error.TimeoutError):
            why = f"no answer within {self.config.reply_timeout:g} s"
        elif failure.check(defer.CancelledError):
            why = "cancelled: the store is stopping"
        elif failure.check(BadTarget):
            why = "a malformed token record"  # its message would quote the stored value
        elif failure.check(ValueError, TypeError, KeyError, UnicodeError):
            why = f"unexpected data ({failure.getErrorMessage()})"
        else:
            why = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        self._log.warn(
            "token store: {what} failed{subject}: {why}",
            what=what,
            subject=f" for {subject}" if subject else "",
            why=why,
        )
        raise TokenStoreUnavailable(f"Redis {what}: {why}")

    def _websockify_record(self, token_hash: str, value: object) -> TokenRecord | None:
        """
        The record in a websockify key, or C{None}: a key of another type or a value that is
        not a target makes the token invalid (4401), not the store unavailable; anyone may
        send any token, and a store error would page the operator. The value is never
        logged (it may hold a password).
        """
        if value is None:
            return None
        problem = None
        if value is _FOREIGN_TYPE:
            problem = "is not a string key"
        elif not isinstance(value, str):
            problem = "is not UTF-8 text"
        else:
            try:
                return parse_token_value(token_hash, value)
            except BadTarget:
                problem = "is not host:port or a JSON target"
        self._log.warn(
            "token store: the websockify key of token {token_id} {problem}: refused as"
            " an invalid token",
            token_id=token_id_of(token_hash),
            problem=problem,
        )
        return None

    def _ttl(self, expires_at: float | None) -> int:
        if expires_at is None:
            return 0
        remaining = max(0, math.ceil(expires_at - self._clock.seconds()))
        return max(1, remaining + math.ceil(self._expired_grace))

    def _start_subscriber(self) -> None:
        self._unusable_connections = 0
        self._subscriber = ClientService(
            self._subscriber_endpoint(),
            _SubscriberFactory(self),
            retryPolicy=self._resubscribe_delay,
            clock=self._clock,
            prepareConnection=self._subscriber_connected,
        )
        self._subscriber.startService()

    def _resubscribe_delay(self, attempt: int) -> float:
        return self._resubscribe_policy(max(attempt, self._unusable_connections))

    def _subscriber_connected(self, protocol: object) -> None:
        self._unusable_connections += 1  # until it has subscribed

    def _connecting_reactor(self) -> Any:
        if self._reactor is not None:
            return self._reactor
        if IReactorTCP.providedBy(self._clock):
            return self._clock
        from twisted.internet import reactor  # txredisapi already runs on the global reactor

        return reactor

    def _redis_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        endpoint = HostnameEndpoint(
            self._connecting_reactor(), host, port, self.config.connect_timeout
        )
        if self._tls is not None:
            return wrapClientTLS(self._tls, endpoint)
        return endpoint

    def _subscriber_endpoint(self) -> IStreamClientEndpoint:
        config = self.config
        if config.sentinel_master:
            return _SentinelMasterEndpoint(
                self._sentinel,
                config.sentinel_master,
                self._connecting_reactor(),
                config.connect_timeout,
            )
        return self._redis_endpoint(*config.hosts[0])

    def _pool_problem(self, why: str) -> None:
        text = describe_connection_error(self.config, why)
        if text != self._connection_problem:
            self._log.warn("token store: {why}; retrying with backoff", why=text)
        self._connection_problem = text

    def _pool_connected(self, address: str) -> None:
        previous, self._redis_address = self._redis_address, address
        was_down, self._pool_down = self._pool_down, False
        if was_down and previous is not None and previous != address:
            self._log.warn(
                "token store: connected to Redis again, at {address}: the master moved from"
                " {previous} (failover)",
                address=address,
                previous=previous,
            )
        elif was_down or self._connection_problem is not None:
            self._log.info("token store: connected to Redis again at {address}", address=address)
        self._connection_problem = None
        if was_down:
            self.reconnects += 1
            if self._recheck_when_connected:
                self._recheck_when_connected = False
                self._notify_reconnect_watchers()
            waiters, self._reconnection_waiters = self._reconnection_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _pool_lost(self) -> None:
        if self._pool_down or not self.running:
            return
        self._pool_down = True
        self._log.warn(
            "token store: lost every connection to Redis at {address}; calls fail at once"
            " until it is back",
            address=self._redis_address or "an unknown address",
        )

    def _subscribed(self) -> None:
        self._subscribed_now = True
        self._subscriptions += 1
        self._unusable_connections = 0
        self._subscriber_trouble = None
        if self._subscriptions > 1:
            self._log.info("revocations: subscribed again")
            # The re-check reads records through the pool: while it has no connection every
            # read would fail at once, so it runs when the pool is back instead.
            self._recheck_when_connected = self._pool_down
            if not self._pool_down:
                self._notify_reconnect_watchers()
        waiters, self._subscription_waiters = self._subscription_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _notify_reconnect_watchers(self) -> None:
        for on_reconnect in list(self._reconnect_watchers):
            self._call_watcher(on_reconnect)

    def _unsubscribed(self) -> None:
        if not self._subscribed_now:
            return
        self._subscribed_now = False
        if self.running:
            self._log.warn("revocations: lost the Redis subscription; reconnecting")
        waiters, self._loss_waiters = self._loss_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _subscriber_problem(self, why: str) -> None:
        """Logged once until the subscription works again, not at every retry."""
        text = describe_connection_error(self.config, why)
        if text != self._subscriber_trouble:
            self._log.warn("revocations: {why}", why=text)
        self._subscriber_trouble = text

    def _revocation_message(self, message: object) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if not isinstance(message, str):
            return
        for on_revoke in list(self._watchers):
            self._call_watcher(on_revoke, message)

    def _call_watcher(self, callback: Callable[..., object], *args: str) -> None:
        try:
            callback(*args)
        except Exception:
            self._log.failure("revocations: a callback failed")


def _about(token_hash: str) -> str:
    return f"token {token_id_of(token_hash)}"


def _read_only() -> UnsupportedOperation:
    return UnsupportedOperation(
        "format=websockify keys are raw tokens written by another tool: vncmux only reads them"
    )


def _integer(reply: object) -> int:
    if not isinstance(reply, int):
        raise TypeError(f"expected an integer reply, got {type(reply).__name__}")
    return reply


def _from_hash_fields(token_hash: str, fields: object) -> TokenRecord | None:
    if not isinstance(fields, dict):
        raise TypeError(f"HGETALL answered {type(fields).__name__}")
    if not fields:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
        raise UnicodeError("the token record is not UTF-8 text")
    return TokenRecord.from_fields(token_hash, fields)


#: What a GET of a key of another type (a hash, a set...) answers, instead of an error.
_FOREIGN_TYPE = object()


def _foreign_type(failure: Failure) -> object:
    import txredisapi

    if failure.check(txredisapi.ResponseError) and "WRONGTYPE" in failure.getErrorMessage():
        return _FOREIGN_TYPE
    return failure


def open_token_store(
    source: str,
    clock: IReactorTime,
    *,
    connect_timeout: float | None = None,
    reply_timeout: float | None = None,
    reactor: Any = None,
    nova_recheck_interval: float = DEFAULT_RECHECK_INTERVAL,
) -> FileTokenStore | RedisTokenStore | NovaTokenStore:
    """
    The token store a ``--tokens`` value names: ``file:PATH`` (relative to the current
    directory), ``redis://…``, ``rediss://…``, ``redis+sentinel://…`` or ``nova:URL`` (nova's
    ``[database] connection`` URL). Redis and nova stores are IServices: start them (e.g.
    C{setServiceParent}) before use. C{ValueError} for anything else.
    """
    if source.startswith("file:"):
        path = source[len("file:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("file: needs a path, e.g. file:etc/tokens")
        return FileTokenStore(path, clock)
    if source.startswith(SOURCE_PREFIX):
        return NovaTokenStore(
            NovaDatabase.from_url(source[len(SOURCE_PREFIX) :]),
            clock,
            reactor=reactor,
            reply_timeout=reply_timeout or DEFAULT_REPLY_TIMEOUT,
            recheck_interval=nova_recheck_interval,
        )
    scheme = source.partition("://")[0].lower() if "://" in source else ""
    if scheme in SCHEMES or scheme in SENTINEL_TLS_SCHEMES:
        config = RedisConfig.from_url(
            source, connect_timeout=connect_timeout, reply_timeout=reply_timeout
        )
        return RedisTokenStore(config, clock, reactor=reactor)
    shown = f"{scheme}://…" if scheme else "this value"
    raise ValueError(
        f"unknown token source ({shown}): use file:PATH, redis://[:password@]host:port/db,"
        " rediss://…, redis+sentinel://h1:p1,h2:p2/master or nova:DATABASE_URL"
    )


__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_REPLY_TIMEOUT",
    "INSTANCE_KEY_PREFIX",
    "REVOKE_CHANNEL",
    "TOKEN_KEY_PREFIX",
    "RedisConfig",
    "RedisTokenStore",
    "instance_key",
    "open_token_store",
    "token_key",
]
