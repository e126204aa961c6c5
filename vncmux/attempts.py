"""Brute-force resistance: failed token lookups counted per client address.

A token is a bearer secret of 256 bits, so guessing one is hopeless; but a client that sends
token after token still costs a lookup each, fills the log with refusals and probes a
``format=websockify`` namespace. Past ``--max-failed-tokens`` failures in a minute an
address is blocked for a cooldown: its upgrades get 4429 "too many failed attempts" without
a token lookup. With Redis as the token store the counts are shared by every proxy
instance, and the cooldown check and the lookup are one script (one round trip; the lookup
does not run for a blocked client); otherwise each process counts for itself.

When Redis cannot be asked the upgrade gets 4503 for its lookup, and a failure that cannot
be counted is let go (failing open: a store outage blocks nobody).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from vncmux.interfaces import ITokenStore
from vncmux.tokens import GuardSet, RedisTokenStore, TokenRecord, TokenStoreUnavailable

DEFAULT_MAX_FAILED = 20
WINDOW = 60.0
COOLDOWN = 60.0
#: The memory limiter forgets the oldest addresses beyond this many (memory stays bounded
#: when failures come from a whole IPv6 prefix).
MAX_ADDRESSES = 100_000

FAILED_KEY_PREFIX = "vncmux:failed:"
BLOCKED_KEY_PREFIX = "vncmux:blocked:"


class ClientBlocked(Exception):
    """The client is cooling down after too many failed lookups: its token was not looked
    up."""


class IFailedAttempts(Interface):
    """Failed token lookups per client address, and the lookups they guard."""

    def lookup_unless_blocked(address: str, token: str) -> Deferred[TokenRecord | None]:
        """
        C{token}'s record (C{None} when unknown), looked up only when C{address} is not
        cooling down: fails with L{ClientBlocked} when it is, and with
        L{TokenStoreUnavailable} as the lookup does.
        """

    def failed(address: str) -> Deferred[None]:
        """Count one failed token lookup from C{address} (never fails)."""


@dataclass
class _Entry:
    window_ends: float
    count: int = 0
    blocked_until: float = 0.0


@implementer(IFailedAttempts)
class MemoryFailedAttempts:
    """
    The limiter of one process: fixed one-minute windows that start at an address's first
    failure; the failure past C{max_failed} starts a cooldown of C{cooldown} seconds.
    C{max_failed} of 0 turns the limiter off. Entries whose window and cooldown are over are
    swept, oldest first, on every call: no timers.
    """

    _log = Logger()

    def __init__(
        self,
        store: ITokenStore,
        clock: IReactorTime,
        max_failed: int = DEFAULT_MAX_FAILED,
        window: float = WINDOW,
        cooldown: float = COOLDOWN,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self._store = store
        self._clock = clock
        self.max_failed = max_failed
        self.window = window
        self.cooldown = cooldown
        self._max_addresses = max_addresses
        self._entries: dict[str, _Entry] = {}

    def lookup_unless_blocked(self, address: str, token: str) -> Deferred[TokenRecord | None]:
        now = self._clock.seconds()
        self._sweep(now)
        entry = self._entries.get(address)
        if entry is not None and entry.blocked_until > now:
            return fail(ClientBlocked(address))
        return self._store.lookup(token)

    def failed(self, address: str) -> Deferred[None]:
        if not self.max_failed:
            return succeed(None)
        now = self._clock.seconds()
        self._sweep(now)
        entry = self._entries.get(address)
        if entry is None or entry.window_ends <= now:
            entry = self._entries.pop(address, None) or _Entry(now + self.window)
            entry.window_ends, entry.count = now + self.window, 0
            self._entries[address] = entry  # to the end: the order of expiry
            while len(self._entries) > self._max_addresses:
                del self._entries[next(iter(self._entries))]
        entry.count += 1
        if entry.count > self.max_failed and entry.blocked_until <= now:
            entry.blocked_until = now + self.cooldown
            _log_blocked(self._log, address, self.max_failed, self.window, self.cooldown)
        return succeed(None)

    def _sweep(self, now: float) -> None:
        while self._entries:
            address, entry = next(iter(self._entries.items()))
            if max(entry.window_ends, entry.blocked_until) > now:
                return
            del self._entries[address]


# KEYS[1] failure counter, KEYS[2] cooldown flag; ARGV: max_failed, window, cooldown (ms).
# One round trip, atomic across proxies: the counter expires with its window, the failure
# past the limit sets the cooldown flag (only once per cooldown). Returns 1 when it did.
_FAILED = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if count > tonumber(ARGV[1]) then
  if redis.call('SET', KEYS[2], '1', 'PX', ARGV[3], 'NX') then return 1 end
end
return 0
"""


@implementer(IFailedAttempts)
class RedisFailedAttempts:
    """
    The same limiter with its counters in Redis, shared by every proxy using C{store}
    (a L{vncmux.tokens.RedisTokenStore}): ``vncmux:failed:<address>`` counts failures
    (expiring with the window), ``vncmux:blocked:<address>`` exists during a cooldown and
    is checked by the token lookup's own script (L{RedisTokenStore.lookup_unless_set}). A
    failure that cannot be counted is logged by the store and let go.
    """

    _log = Logger()

    def __init__(
        self,
        store: RedisTokenStore,
        max_failed: int = DEFAULT_MAX_FAILED,
        window: float = WINDOW,
        cooldown: float = COOLDOWN,
    ) -> None:
        self._store = store
        self.max_failed = max_failed
        self.window = window
        self.cooldown = cooldown

    def lookup_unless_blocked(self, address: str, token: str) -> Deferred[TokenRecord | None]:
        if not self.max_failed:
            lookup: Deferred[TokenRecord | None] = self._store.lookup(token)
            return lookup
        guarded: Deferred[TokenRecord | None] = self._store.lookup_unless_set(
            token, BLOCKED_KEY_PREFIX + address
        )
        return guarded.addErrback(_blocked_if_set, address)

    def failed(self, address: str) -> Deferred[None]:
        if not self.max_failed:
            return succeed(None)
        keys = [FAILED_KEY_PREFIX + address, BLOCKED_KEY_PREFIX + address]
        args = [str(self.max_failed), _ms(self.window), _ms(self.cooldown)]
        counting: Deferred[object] = self._store.evaluate(
            "failed-attempts count", _FAILED, keys, args
        )

        def counted(started: object) -> None:
            if started == 1:
                _log_blocked(self._log, address, self.max_failed, self.window, self.cooldown)

        return counting.addCallbacks(counted, _fail_open)


def attempts_for(
    store: ITokenStore, clock: IReactorTime, max_failed: int = DEFAULT_MAX_FAILED
) -> IFailedAttempts:
    """The limiter for a token store: shared through Redis when that is the store."""
    if isinstance(store, RedisTokenStore):
        return RedisFailedAttempts(store, max_failed)
    return MemoryFailedAttempts(store, clock, max_failed)


def _ms(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def _fail_open(failure: Failure) -> None:
    """The errback of a count: the store has logged the error; nobody is blocked for it."""
    failure.trap(TokenStoreUnavailable)


def _blocked_if_set(failure: Failure, address: str) -> NoReturn:
    """The guarded lookup found the cooldown flag: the client is blocked."""
    failure.trap(GuardSet)
    raise ClientBlocked(address)


def _log_blocked(log: Logger, address: str, limit: int, window: float, cooldown: float) -> None:
    log.warn(
        "client {client_address} blocked for {cooldown:g} s: more than {limit} failed token"
        " lookups in {window:g} s",
        vncmux_event="client_blocked",
        client_address=address,
        limit=limit,
        window=window,
        cooldown=cooldown,
    )


__all__ = [
    "DEFAULT_MAX_FAILED",
    "ClientBlocked",
    "IFailedAttempts",
    "MemoryFailedAttempts",
    "RedisFailedAttempts",
    "attempts_for",
]
