"""
The Redis token store (docs/running.md, "The Redis layout"): every call bounded by
C{reply_timeout} on the injected clock, whatever txredisapi does, and every failure turned
into L{TokenStoreUnavailable} with one log line.

txredisapi imports and uses the global reactor; it is imported lazily and stays inside
L{RedisTokenStore}, so importing this module installs no reactor.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
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
from vncmux.tokens.errors import TokenStoreUnavailable, UnsupportedOperation
from vncmux.tokens.record import (
    TokenRecord,
    hash_token,
    number_text,
    parse_token_value,
    token_id_of,
)
from vncmux.tokens.redis.client import (
    FOREIGN_TYPE,
    RedisNotConnected,
    SentinelMasterEndpoint,
    foreign_type,
    pool_factories,
    sentinel_class,
)
from vncmux.tokens.redis.config import RedisConfig, describe_connection_error, tls_options
from vncmux.tokens.redis.scripts import (
    CLAIM_USE_SCRIPT,
    GUARDED_GET_SCRIPT,
    GUARDED_LOOKUP_SCRIPT,
    INSTANCE_KEY_PREFIX,
    INSTANCE_PRUNE_THRESHOLD,
    ISSUE_SCRIPT,
    LOOKUP_SCRIPT,
    RECORD_ACTIVITY_SCRIPT,
    REVOKE_CHANNEL,
    REVOKE_INSTANCE_SCRIPT,
    REVOKE_SCRIPT,
    TOKEN_KEY_PREFIX,
    USED_KEY_PREFIX,
    instance_key,
    token_key,
)
from vncmux.tokens.redis.subscription import RevocationSubscription, SubscriptionState
from vncmux.tokens.targets import BadTarget, format_target

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


class GuardSet(Exception):
    """The key guarding a lookup exists (L{RedisTokenStore.lookup_unless_set}): the token was
    not looked up."""


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
        self._clock = clock
        self._reactor = reactor
        self._poolsize = poolsize
        self._expired_grace = expired_grace
        # Seconds before the pool's n-th consecutive reconnection attempt; None: txredisapi's
        # (1 s, times e, at most 10 s, jittered).
        self.reconnect_policy = reconnect_policy
        self._tls = tls_options(config) if config.tls else None
        self._pool: Any = None
        self._sentinel: Any = None
        self._pending: set[Deferred[Any]] = set()
        # Why the pool cannot connect (a refused AUTH, a bad database), until it can again.
        self._connection_problem: str | None = None
        # Every pool connection was lost and none is back yet (not set while the pool makes
        # its first connections, so the first calls wait for them as before).
        self._pool_down = False
        self._redis_address: str | None = None
        self._reconnection_waiters: list[Deferred[None]] = []
        self._subscription = RevocationSubscription(
            config,
            clock,
            endpoint=self._subscriber_endpoint,
            retry_policy=resubscribe_policy
            or backoffPolicy(initialDelay=0.25, maxDelay=10.0, factor=2.0),
            keepalive_interval=keepalive_interval,
            pool_down=lambda: self._pool_down,
        )
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
        pool_factory, sentinel_pool_factory = pool_factories()
        common: dict[str, Any] = dict(
            password=config.password,
            username=config.username,
            replyTimeout=config.reply_timeout * _INNER_REPLY_FRACTION,
            convertNumbers=False,
            poolsize=self._poolsize,
        )
        if config.sentinel_master:
            self._sentinel = sentinel_class()(
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
        if self._subscription.watched:
            self._subscription.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        for pending in list(self._pending):
            pending.cancel()
        stopping: list[Deferred[Any]] = []
        subscription_stopped = self._subscription.stop()
        if subscription_stopped is not None:
            stopping.append(subscription_stopped)
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
                lambda pool: pool.get(key).addErrback(foreign_type),
                lambda value: self._websockify_record(token_hash, value),
            )
        return self.lookup_hash(token_hash)

    def lookup_unless_set(self, token: str, guard_key: str) -> Deferred[TokenRecord | None]:
        """
        L{lookup}, in one round trip with a check of C{guard_key} (a key of vncmux's own,
        such as a client's failed-attempts cooldown): when that key exists the token is not
        looked up and the result fails with L{GuardSet}.
        """
        token_hash = hash_token(token)
        if self.config.websockify_format:
            keys = [guard_key, self.config.websockify_key(token)]
            return self._run(
                "lookup",
                _about(token_hash),
                lambda pool: pool.eval(GUARDED_GET_SCRIPT, keys).addErrback(foreign_type),
                lambda value: _unless_guard_set(value, self._websockify_record, token_hash),
            ).addCallback(_raise_if_guard_set)
        keys = [guard_key, token_key(token_hash)]
        return self._run(
            "lookup",
            _about(token_hash),
            lambda pool: pool.eval(GUARDED_LOOKUP_SCRIPT, keys),
            lambda reply: _unless_guard_set(reply, _from_lookup_reply, token_hash),
        ).addCallback(_raise_if_guard_set)

    def lookup_hash(self, token_hash: str) -> Deferred[TokenRecord | None]:
        """Read a record by its hash (native layout): for re-checks by live sessions."""
        if self.config.websockify_format:
            return fail(UnsupportedOperation("websockify-format keys are raw tokens, not hashes"))
        return self._run(
            "lookup",
            _about(token_hash),
            lambda pool: pool.eval(LOOKUP_SCRIPT, [token_key(token_hash)]),
            lambda reply: _from_lookup_reply(token_hash, reply),
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
        self._subscription.watch(on_revoke, on_reconnect)
        if self.running:
            self._subscription.start()
        if self._subscription.state is SubscriptionState.SUBSCRIBED:
            return succeed(None)
        return self._subscription.next_subscription()

    def next_subscription(self) -> Deferred[None]:
        """A Deferred that fires the next time the revocation subscription becomes active."""
        return self._subscription.next_subscription()

    def next_reconnection(self) -> Deferred[None]:
        """A Deferred that fires the next time the pool connects again after losing every
        connection (calls work again from then on)."""
        waiter: Deferred[None] = Deferred()
        self._reconnection_waiters.append(waiter)
        return waiter

    def next_subscription_loss(self) -> Deferred[None]:
        """A Deferred that fires the next time an active revocation subscription is lost."""
        return self._subscription.next_loss()

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
        if value is FOREIGN_TYPE:
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
            return SentinelMasterEndpoint(
                self._sentinel,
                config.sentinel_master,
                self._connecting_reactor(),
                config.connect_timeout,
            )
        return self._redis_endpoint(*config.hosts[0])

    # the pool factory's reports (client.pool_factories)

    def pool_problem(self, why: str) -> None:
        """A pool connection failed (refused AUTH, bad database): logged once, and named in
        every error until the pool connects."""
        text = describe_connection_error(self.config, why)
        if text != self._connection_problem:
            self._log.warn("token store: {why}; retrying with backoff", why=text)
        self._connection_problem = text

    def pool_connected(self, address: str) -> None:
        """A pool connection to C{address} is ready: the first after every one was lost ends
        the fail-at-once state (and runs a re-check the subscription owes)."""
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
            self._subscription.pool_back()
            waiters, self._reconnection_waiters = self._reconnection_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def pool_lost(self) -> None:
        """The pool's last connection is gone: calls fail at once until one is back."""
        if self._pool_down or not self.running:
            return
        self._pool_down = True
        self._log.warn(
            "token store: lost every connection to Redis at {address}; calls fail at once"
            " until it is back",
            address=self._redis_address or "an unknown address",
        )


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


def _from_lookup_reply(token_hash: str, reply: object) -> TokenRecord | None:
    """The record L{LOOKUP_SCRIPT} answered: C{None} for no record."""
    if isinstance(reply, bytes):
        raise UnicodeError("the token record is not UTF-8 text")
    if not isinstance(reply, str):
        raise TypeError(f"the lookup answered {type(reply).__name__}")
    flat = json.loads(reply)
    if not flat:
        return None
    if not isinstance(flat, list) or len(flat) % 2:
        raise TypeError("the lookup answered something other than a hash's fields")
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return TokenRecord.from_fields(token_hash, fields)


def _unless_guard_set(
    reply: object, parse: Callable[[str, Any], TokenRecord | None], token_hash: str
) -> TokenRecord | None | GuardSet:
    """
    A guarded lookup's answer: the script's 1 (replies are not converted to numbers, so an
    integer is never a record) as a L{GuardSet} returned, not raised, so that the store does
    not report it as its own failure; otherwise the record C{parse} reads.
    """
    if isinstance(reply, int) and reply == 1:
        return GuardSet()
    return parse(token_hash, reply)


def _raise_if_guard_set(found: TokenRecord | None | GuardSet) -> TokenRecord | None:
    if isinstance(found, GuardSet):
        raise found
    return found
