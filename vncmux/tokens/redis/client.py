"""
The adapters over txredisapi: the revocation subscriber protocol (with its keepalive PINGs),
the pool factories and the Sentinel client, each changed where txredisapi's own behaviour
hurts a long-running server, and TCP keepalive on every Redis socket.

txredisapi imports and uses the global reactor: it is imported lazily, inside these
functions, so importing this module installs no reactor.
"""

from __future__ import annotations

import functools
import socket
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.tokens.redis.scripts import REVOKE_CHANNEL
from vncmux.tokens.targets import BadTarget, format_target

if TYPE_CHECKING:
    from vncmux.tokens.redis.store import RedisTokenStore
    from vncmux.tokens.redis.subscription import RevocationSubscription

# TCP keepalive on every Redis socket (seconds, probes): a dead peer is noticed by the
# kernel within about a minute even on a connection with nothing in flight.
_TCP_KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


def keep_alive(transport: object) -> None:
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
        Subscribes, then PINGs every C{keepalive_interval} on the subscription's clock: Redis
        answers PING in subscribe mode, and a SUBSCRIBE or PING without an answer within the
        reply timeout aborts the connection, so ClientService reconnects and the subscription
        calls C{on_reconnect}. Without this a silently dropped connection would look open forever.
        """

        factory: SubscriberFactory
        _keepalive: LoopingCall | None = None

        def connectionMade(self) -> Any:
            keep_alive(self.transport)
            ready = super().connectionMade()  # AUTH first, when a password is set
            self.whenConnected().addCallback(self._subscribe)
            return ready

        def _deadline(self, waiting: Deferred[Any]) -> Deferred[Any]:
            subscription = self.factory.subscription
            return waiting.addTimeout(subscription.config.reply_timeout, subscription.clock)

        def _subscribe(self, _: object) -> None:
            subscribing = self._deadline(self.subscribe(REVOKE_CHANNEL))
            subscribing.addCallbacks(self._subscribed, self._failed, errbackArgs=("SUBSCRIBE",))

        def _subscribed(self, _: object) -> None:
            subscription = self.factory.subscription
            self._keepalive = LoopingCall(self._ping)
            self._keepalive.clock = subscription.clock
            self._keepalive.start(subscription.keepalive_interval, now=False)
            subscription.subscribed()

        def _ping(self) -> Deferred[Any]:
            try:
                sent = self.execute_command("PING", apply_timeout=False)
            except Exception:
                sent = fail()
            # Returned, so LoopingCall never sends a PING while one is still unanswered.
            return self._deadline(sent).addErrback(self._failed, "PING")

        def _failed(self, failure: Failure, command: str) -> None:
            if failure.check(defer.TimeoutError):
                timeout = self.factory.subscription.config.reply_timeout
                why = f"no answer to {command} within {timeout:g} s; reconnecting"
            elif failure.check(txredisapi.ConnectionError):
                return  # the connection is already gone; ClientService reconnects
            else:
                why = f"{command} failed: {failure.getErrorMessage()}"
            self.factory.subscription.problem(why)
            self.transport.abortConnection()

        def messageReceived(self, pattern: object, channel: object, message: object) -> None:
            self.factory.subscription.message_received(message)

        def connectionLost(self, why: Failure) -> None:
            if self._keepalive is not None and self._keepalive.running:
                self._keepalive.stop()
            try:
                super().connectionLost(why)
            finally:
                self.factory.subscription.lost()

    return RevocationSubscriber


class SubscriberFactory(Factory):
    """Builds the revocation subscriber; ClientService reconnects it."""

    noisy = False
    # Read by txredisapi only to decide whether to log a failed AUTH itself, at every retry;
    # the subscription logs it once instead.
    isLazy = False

    def __init__(self, subscription: RevocationSubscription) -> None:
        self.subscription = subscription

    def buildProtocol(self, addr: object) -> Any:
        config = self.subscription.config
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
        self.subscription.problem(why)


@functools.cache
def pool_factories() -> tuple[type, type]:
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
        def connectionMade(self) -> Deferred[Any]:
            """
            txredisapi checks the server's ROLE here and returns that Deferred to Twisted,
            which drops it: a connection lost before the answer (a failover) would be an
            unhandled error. The loss itself is the pool's to handle (it reconnects).
            """
            checking: Deferred[Any] = super().connectionMade()
            return checking.addErrback(self._lost_before_role)

        def _lost_before_role(self, failure: Failure) -> None:
            failure.trap(txredisapi.ConnectionError)

    class StorePoolFactory:
        def __init__(self, *args: Any, store: RedisTokenStore, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.store = store
            self.isLazy = False  # as in SubscriberFactory: the store logs a failed AUTH once

        def stopTrying(self) -> Deferred[None]:
            """Called by txredisapi when AUTH or SELECT fails: keep trying, with backoff."""
            return succeed(None)

        def retryDelay(self, attempt: int) -> float:
            policy = self.store.reconnect_policy
            return policy(attempt) if policy is not None else super().retryDelay(attempt)  # type: ignore[misc]

        def connectionError(self, why: str) -> None:
            self.store.pool_problem(why)

        def addConnection(self, conn: Any) -> None:
            super().addConnection(conn)  # type: ignore[misc]
            if conn in self.pool:  # type: ignore[attr-defined]
                keep_alive(conn.transport)
                self.store.pool_connected(_peer_of(conn.transport))

        # txredisapi calls delConnection when a pool connection is gone, and sets `stopped`
        # on disconnect(); both undocumented, pinned by tests/integration/test_faults.py
        # (RedisStoppedTests: 4503 at once) and every test that stops a store.
        def delConnection(self, conn: Any) -> None:
            super().delConnection(conn)  # type: ignore[misc]
            if not self.pool and not self.stopped:  # type: ignore[attr-defined]
                self.store.pool_lost()

    class PoolFactory(StorePoolFactory, txredisapi.RedisFactory):  # type: ignore[misc]
        protocol = PoolProtocol

    class SentinelPoolFactory(StorePoolFactory, txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
        protocol = SentinelPoolProtocol

    return PoolFactory, SentinelPoolFactory


@functools.cache
def sentinel_class() -> type:
    """
    txredisapi's Sentinel client, with master discovery bounded on the store's clock and
    cancelled by C{disconnect()}. txredisapi's own C{discover_master} arms a timer on the
    global reactor that only an answer naming a healthy master cancels: during a failover
    (every Sentinel reports the master down) a store stopped meanwhile left it behind.
    Relies on txredisapi's C{sentinels} (one lazy connection per Sentinel),
    C{check_master_state} and C{discovery_timeout}, which both the pool's and the
    subscriber's endpoints go through; pinned by the Sentinel tests in
    tests/tokens/test_redis_store.py and tests/integration/test_sentinel.py.
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
class SentinelMasterEndpoint:
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


#: What a GET of a key of another type (a hash, a set...) answers, instead of an error.
FOREIGN_TYPE = object()


def foreign_type(failure: Failure) -> object:
    import txredisapi

    if failure.check(txredisapi.ResponseError) and "WRONGTYPE" in failure.getErrorMessage():
        return FOREIGN_TYPE
    return failure
