"""
The fleet view through Redis (docs/sessions.md, "The fleet"; keys in docs/running.md, "The
Redis layout").

With a Redis token store every proxy process is an I{instance} of the fleet: it writes its
live sessions and its per-token session counts under ``vncmux:fleet:``, next to a heartbeat
key, all with a TTL of three heartbeats that every heartbeat renews. So the admin API of any
instance lists and ends every session of the fleet (L{FleetSessions}), per-token limits hold
across instances (L{FleetLimits}), and a crashed instance's sessions and counts expire by
themselves; readers also skip and sweep instances whose heartbeat key is gone.

Redis cost: one script call per session at its start (the per-token claim) plus session
writes batched, at most one every L{WRITE_INTERVAL} (the start and end of every session in
that time, one call), and one call per heartbeat for the whole instance (renewing the TTLs
and refreshing the byte counts and activity of the sessions that changed). Every call is
one round trip.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.admin import session_json
from vncmux.interfaces import ISessionDirectory, ISessionObserver, ISharedLimits
from vncmux.options import BY_NAME
from vncmux.refusals import STORE_UNAVAILABLE, TOKEN_REVOKED, TOO_MANY_SESSIONS, Refused
from vncmux.relay import Session
from vncmux.supervisor import INSTANCE_PREFIX, Supervisor
from vncmux.tokens import (
    REVOKE_CHANNEL,
    RedisTokenStore,
    TokenRecord,
    TokenStoreUnavailable,
    token_id_of,
)
from vncmux.tokens.redis.scripts import REPLICATE_COMMANDS

#: The SET of instance ids; it lives as long as the longest TTL any instance gave it.
INSTANCES_KEY = "vncmux:fleet:instances"
#: ``…:alive:<id>``: a STRING (JSON: host, pid, started_at, heartbeat), the heartbeat key.
ALIVE_KEY_PREFIX = "vncmux:fleet:alive:"
#: ``…:sessions:<id>``: a HASH, session id -> the session as the admin API shows it (JSON).
SESSIONS_KEY_PREFIX = "vncmux:fleet:sessions:"
#: ``…:counts:<id>``: a HASH, token hash -> places the instance holds under its limit.
COUNTS_KEY_PREFIX = "vncmux:fleet:counts:"
#: Published on the revocation channel to end one session on whichever instance holds it.
SESSION_MESSAGE_PREFIX = "session:"
#: Seconds between the starts of two writes at least: under load every session that started
#: or ended meanwhile goes in one call (and one that started and ended is never written);
#: after a quiet spell a change goes out in the next reactor turn.
WRITE_INTERVAL = 0.05

DEFAULT_HEARTBEAT: float = BY_NAME["fleet-heartbeat"].default
#: An instance's keys live this many heartbeats: two heartbeats may be lost or late.
TTL_HEARTBEATS = 3

# Lua: the other instances whose heartbeat key is there; the keys of the others are deleted
# and they leave the SET (they expire by themselves too; this only tidies up sooner).
# ARGV[1] own id, ARGV[2] alive prefix, ARGV[3] sessions prefix, ARGV[4] counts prefix.
_LIVE_OTHERS = (
    REPLICATE_COMMANDS
    + """
local function live_others(set)
  local live = {}
  for _, member in ipairs(redis.call('SMEMBERS', set)) do
    if member ~= ARGV[1] then
      if redis.call('EXISTS', ARGV[2] .. member) == 1 then
        live[#live + 1] = member
      else
        redis.call('SREM', set, member)
        redis.call('DEL', ARGV[3] .. member, ARGV[4] .. member)
      end
    end
  end
  return live
end
"""
)

_WRITE = (
    REPLICATE_COMMANDS
    + """
-- KEYS[1] alive, KEYS[2] sessions, KEYS[3] counts, KEYS[4] instance SET
-- ARGV[1] mode: 'delta' (sessions started and ended), 'beat' (also renew every TTL),
-- 'full' (replace everything); ARGV[2] TTL (ms); ARGV[3] instance id; ARGV[4] heartbeat
-- value; then n, n pairs (session id, JSON); m, m session ids to remove; k, k pairs
-- (token hash, count: added in delta and beat, as is in full).
-- Returns 0 without writing when the heartbeat key is gone (expired, or Redis lost it):
-- the instance then writes everything again ('full').
local mode, ttl = ARGV[1], tonumber(ARGV[2])
if mode ~= 'full' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if mode == 'full' then redis.call('DEL', KEYS[2], KEYS[3]) end
local i = 5
local n = tonumber(ARGV[i])
for _ = 1, n do
  redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
  i = i + 2
end
i = i + 1
n = tonumber(ARGV[i])
for _ = 1, n do
  redis.call('HDEL', KEYS[2], ARGV[i + 1])
  i = i + 1
end
i = i + 1
n = tonumber(ARGV[i])
for _ = 1, n do
  if mode == 'full' then
    redis.call('HSET', KEYS[3], ARGV[i + 1], ARGV[i + 2])
  elseif redis.call('HINCRBY', KEYS[3], ARGV[i + 1], ARGV[i + 2]) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[i + 1])
  end
  i = i + 2
end
if mode == 'delta' then
  -- A hash created by this write has no TTL yet: it gets the heartbeat key's.
  local left = redis.call('PTTL', KEYS[1])
  for _, key in ipairs({KEYS[2], KEYS[3]}) do
    if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, left) end
  end
  return 1
end
redis.call('SET', KEYS[1], ARGV[4], 'PX', ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('SADD', KEYS[4], ARGV[3])
if redis.call('PTTL', KEYS[4]) < ttl then redis.call('PEXPIRE', KEYS[4], ttl) end
return 1
"""
)

_CLAIM = (
    _LIVE_OTHERS
    + """
-- KEYS[1] instance SET, KEYS[2] own counts, KEYS[3] own alive
-- ARGV[5] token hash, ARGV[6] limit, ARGV[7] TTL (ms), ARGV[8] places of the token this
-- instance gave back since its last write (taken off its count first).
-- Returns {1, alive} (counted; alive 0: the own heartbeat key is gone) or {0, held}.
local back = tonumber(ARGV[8])
if back > 0 and redis.call('HINCRBY', KEYS[2], ARGV[5], -back) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[5])
end
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[5]) or '0')
for _, member in ipairs(live_others(KEYS[1])) do
  held = held + tonumber(redis.call('HGET', ARGV[4] .. member, ARGV[5]) or '0')
end
if held >= tonumber(ARGV[6]) then return {0, held} end
redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
local left = redis.call('PTTL', KEYS[3])
if redis.call('PTTL', KEYS[2]) == -1 then
  redis.call('PEXPIRE', KEYS[2], left > 0 and left or tonumber(ARGV[7]))
end
return {1, left > 0 and 1 or 0}
"""
)

_LIST = (
    _LIVE_OTHERS
    + """
-- KEYS[1] instance SET. Returns the JSON of every session of the other live instances.
local found = {}
for _, member in ipairs(live_others(KEYS[1])) do
  for _, value in ipairs(redis.call('HVALS', ARGV[3] .. member)) do
    found[#found + 1] = value
  end
end
return found
"""
)

_FIND = (
    _LIVE_OTHERS
    + """
-- KEYS[1] instance SET; ARGV[5] session id, ARGV[6] channel to announce its end on, or ''.
-- Returns the session's JSON when another live instance holds it, else nil.
for _, member in ipairs(live_others(KEYS[1])) do
  local value = redis.call('HGET', ARGV[3] .. member, ARGV[5])
  if value then
    if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], 'session:' .. ARGV[5]) end
    return value
  end
end
return false
"""
)

_LEAVE = """
-- KEYS[1] alive, KEYS[2] sessions, KEYS[3] counts, KEYS[4] instance SET; ARGV[1] own id
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"""

#: Write modes, the stronger one wins when several are wanted before a write goes out.
_MODES = ("delta", "beat", "full")


def new_instance_id() -> str:
    """``host:pid:random``: unique even for several workers of one host, and across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def heartbeat_ttl(heartbeat: float) -> float:
    """Seconds an instance's keys outlive its last heartbeat."""
    return heartbeat * TTL_HEARTBEATS


@implementer(ISessionObserver)
class FleetInstance(Service):
    """
    This process as one instance of the fleet: registers its sessions (a session observer)
    and its per-token places in Redis, renews them every C{heartbeat} seconds of C{clock}, and
    ends its sessions that another instance's admin API ends (``session:<id>`` on the
    revocation channel). Writes go out one at a time, so they reach Redis in order; after
    anything that may have lost them (a failed write, Redis reconnected, the heartbeat key
    gone) the next write replaces everything. A clean stop deletes the instance's keys.
    """

    _log = Logger()
    name = "fleet"

    def __init__(
        self,
        store: RedisTokenStore,
        supervisor: Supervisor,
        clock: IReactorTime,
        heartbeat: float = DEFAULT_HEARTBEAT,
        instance_id: str | None = None,
    ) -> None:
        if not heartbeat > 0:
            raise ValueError("the fleet heartbeat must be a positive number of seconds")
        self.store = store
        self.supervisor = supervisor
        self.clock = clock
        self.heartbeat = heartbeat
        self.instance_id = instance_id or new_instance_id()
        self.started_at = clock.seconds()
        self._ttl_ms = str(round(heartbeat_ttl(heartbeat) * 1000))
        self._keys = [
            ALIVE_KEY_PREFIX + self.instance_id,
            SESSIONS_KEY_PREFIX + self.instance_id,
            COUNTS_KEY_PREFIX + self.instance_id,
            INSTANCES_KEY,
        ]
        self._prefixes = [
            self.instance_id,
            ALIVE_KEY_PREFIX,
            SESSIONS_KEY_PREFIX,
            COUNTS_KEY_PREFIX,
        ]
        #: Places this instance holds, per token hash (what a full write counts).
        self.held: Counter[str] = Counter()
        # What the next delta carries: sessions started, ended, places given back.
        self._opened: set[str] = set()
        self._closed: set[str] = set()
        self._given_back: Counter[str] = Counter()
        # Per written session: (last_activity_at, bytes to backend, bytes to client) as written.
        self._written: dict[str, tuple[float, int, int]] = {}
        self._wanted: str | None = None
        self._writing: Deferred[Any] | None = None
        self._writing_mode: str | None = None
        # The outcome of a write or claim is unknown: the next heartbeat writes everything.
        self._next_full = False
        # Writes fail since the last one that worked (logged once).
        self._failing = False
        self._soon: IDelayedCall | None = None
        self._last_write_at = -WRITE_INTERVAL
        self._claims_in_flight = 0
        self._after_full: list[Deferred[None]] = []
        self._settled_waiters: list[Deferred[None]] = []
        self._reconnects_seen = store.reconnects
        self._watching = False
        self._beating = LoopingCall(self.beat)
        self._beating.clock = clock

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        if not self._watching:
            self._watching = True
            self.store.watch_revocations(self._message)
        self._wanted = "full"
        self._beating.start(self.heartbeat, now=True)
        self._log.info(
            "fleet: instance {instance}, heartbeat every {heartbeat:g} s, keys expire {ttl:g} s"
            " after the last one",
            instance=self.instance_id,
            heartbeat=self.heartbeat,
            ttl=heartbeat_ttl(self.heartbeat),
        )

    def stopService(self) -> Deferred[None]:
        """Stop the heartbeat, let a write in flight finish, then delete every key of ours."""
        super().stopService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        if self._beating.running:
            self._beating.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        self._wanted = None
        self._release_claims()
        self._check_settled()
        writing = self._writing or succeed(None)

        def leave(_: object) -> Deferred[None]:
            leaving = self.store.evaluate("fleet leave", _LEAVE, self._keys, [self.instance_id])
            return leaving.addCallbacks(lambda _: None, self._leave_failed)

        return writing.addBoth(leave)

    def _leave_failed(self, failure: Failure) -> None:
        self._log.warn(
            "fleet: could not delete the keys of instance {instance}: {error}; they expire"
            " within {ttl:g} s",
            instance=self.instance_id,
            error=failure.getErrorMessage(),
            ttl=heartbeat_ttl(self.heartbeat),
        )

    # -- ISessionObserver ------------------------------------------------------------------

    def session_rejected(self, *args: object) -> None:
        """Refusals are not sessions."""

    def stage_timed(self, stage: str, seconds: float) -> None:
        """Timings are not sessions."""

    def session_opened(self, session: Session) -> None:
        self._opened.add(session.id)
        self._want("delta")

    def session_closed(self, session: Session, duration: float) -> None:
        self._written.pop(session.id, None)
        if session.id in self._opened:
            self._opened.discard(session.id)  # never written: nothing to remove
            return
        self._closed.add(session.id)
        self._want("delta")

    # -- places under the fleet's per-token limit ------------------------------------------

    def claim(self, token_hash: str, limit: int) -> Deferred[tuple[bool, int]]:
        """
        Count one more session of C{token_hash} unless the live instances hold C{limit}
        already: fires with C{(True, 0)}, or C{(False, sessions held)}.
        """
        if self._wanted == "full" or self._writing_full():
            waiting: Deferred[None] = Deferred()
            self._after_full.append(waiting)
            return waiting.addCallback(lambda _: self.claim(token_hash, limit))
        self._claims_in_flight += 1
        given_back = self._given_back.pop(token_hash, 0)  # not written yet: the claim does it
        args = [*self._prefixes, token_hash, str(limit), self._ttl_ms, str(given_back)]
        keys = [INSTANCES_KEY, self._keys[2], self._keys[0]]
        claiming = self.store.evaluate("fleet claim", _CLAIM, keys, args)

        def answered(reply: object) -> tuple[bool, int]:
            granted, detail = _pair(reply)
            if granted:
                self.held[token_hash] += 1
                if not detail:
                    self._want("full")  # counted, but our heartbeat key is gone
                return True, 0
            return False, detail

        def failed(failure: Failure) -> Failure:
            self._lost()  # the script may have counted it before its answer was lost
            return failure

        def done(result: object) -> object:
            self._claims_in_flight -= 1
            if not self._claims_in_flight and self._wanted == "full":
                self._send_soon()
            return result

        claiming.addCallback(answered).addErrback(failed)
        return claiming.addBoth(done)

    def give_back(self, token_hash: str) -> None:
        """A place of C{token_hash} is free again (written with the next batch)."""
        if self.held[token_hash] <= 1:
            del self.held[token_hash]
        else:
            self.held[token_hash] -= 1
        self._given_back[token_hash] += 1
        self._want("delta")

    # -- the directory ---------------------------------------------------------------------

    def session_json(self, session: Session) -> dict[str, Any]:
        """A session as the admin API shows it, with the instance that holds it."""
        shown = session_json(session)
        shown["instance"] = self.instance_id
        return shown

    # -- writing ---------------------------------------------------------------------------

    def beat(self) -> None:
        """Renew every key, with the byte counts and activity that changed since."""
        if self.store.reconnects != self._reconnects_seen:
            self._reconnects_seen = self.store.reconnects
            self._want("full")  # a restarted Redis may have lost or kept stale keys
        self._want("beat")

    def _lost(self) -> None:
        """A write's or claim's outcome is unknown: the next heartbeat writes everything."""
        self._next_full = True

    def _want(self, mode: str) -> None:
        if self._next_full and mode == "beat":
            mode = "full"
        if self._wanted is None or _MODES.index(mode) > _MODES.index(self._wanted):
            self._wanted = mode
        self._send_soon()

    def _writing_full(self) -> bool:
        return self._writing is not None and self._writing_mode == "full"

    def _send_soon(self) -> None:
        """One write per L{WRITE_INTERVAL} at most: everything that happened meanwhile goes
        with it. A full write goes out at once: claims wait for it."""
        if not self.running or self._writing is not None:
            return
        now = self.clock.seconds()
        wait = min(max(self._last_write_at + WRITE_INTERVAL - now, 0.0), WRITE_INTERVAL)
        if self._wanted == "full":
            wait = 0.0
        if self._soon is None:
            self._soon = self.clock.callLater(wait, self._send)
        elif self._soon.getTime() > now + wait:
            self._soon.reset(wait)

    def _send(self) -> None:
        self._soon = None
        mode = self._wanted
        if mode is None or self._writing is not None or not self.running:
            self._check_settled()
            return
        if mode == "full" and self._claims_in_flight:
            return  # sent when the last claim in flight has its answer
        self._wanted = None
        if mode == "full":
            self._next_full = False
        args = self._write_args(mode)
        if args is None:
            self._check_settled()
            return
        self._writing_mode = mode
        self._last_write_at = self.clock.seconds()
        writing = self._writing = self.store.evaluate("fleet write", _WRITE, self._keys, args)
        writing.addCallbacks(self._written_ok, self._write_failed)
        writing.addBoth(self._write_done)

    def _write_args(self, mode: str) -> list[str] | None:
        sessions = self.supervisor.sessions
        if mode == "full":
            self._opened.clear()
            self._closed.clear()
            self._given_back.clear()
            self._written.clear()
            writes = list(sessions.values())
            removes: list[str] = []
            counts = [(h, n) for h, n in self.held.items()]
        else:
            opened, self._opened = self._opened, set()
            writes = [sessions[i] for i in opened if i in sessions]
            if mode == "beat":
                writes += [
                    s
                    for i, s in sessions.items()
                    if i in self._written and self._written[i] != _stamp(s)
                ]
            removes, self._closed = list(self._closed), set()
            counts = [(h, -n) for h, n in self._given_back.items()]
            self._given_back.clear()
            if mode == "delta" and not (writes or removes or counts):
                return None
        args = [mode, self._ttl_ms, self.instance_id, self._about(), str(len(writes))]
        for session in writes:
            self._written[session.id] = _stamp(session)
            args += [session.id, json.dumps(self.session_json(session))]
        args.append(str(len(removes)))
        args += removes
        args.append(str(len(counts)))
        for token_hash, count in counts:
            args += [token_hash, str(count)]
        return args

    def _about(self) -> str:
        return json.dumps(
            {
                "instance": self.instance_id,
                "pid": os.getpid(),
                "started_at": self.started_at,
                "heartbeat_at": self.clock.seconds(),
                "sessions": len(self.supervisor.sessions),
            }
        )

    def _written_ok(self, reply: object) -> None:
        if self._failing:
            self._failing = False
            self._log.info(
                "fleet: instance {instance} written to Redis again", instance=self.instance_id
            )
        if reply == 0:
            self._log.info(
                "fleet: the keys of instance {instance} were gone from Redis; writing them again",
                instance=self.instance_id,
            )
            self._wanted = "full"

    def _write_failed(self, failure: Failure) -> None:
        self._next_full = True  # whatever this write carried is in the next full one
        if self._failing:
            return  # logged once per outage (the store logs every failed call)
        self._failing = True
        self._log.warn(
            "fleet: could not write instance {instance} to Redis: {error}; the next heartbeat"
            " writes everything again",
            instance=self.instance_id,
            error=failure.getErrorMessage(),
        )

    def _write_done(self, _: object) -> None:
        mode, self._writing, self._writing_mode = self._writing_mode, None, None
        if mode == "full" or self._wanted != "full":
            self._release_claims()
        if self._wanted is not None:
            self._send_soon()
        self._check_settled()

    def settled(self) -> Deferred[None]:
        """Fires once every change so far has been written (or its write failed)."""
        waiter: Deferred[None] = Deferred()
        self._settled_waiters.append(waiter)
        self._check_settled()
        return waiter

    def _check_settled(self) -> None:
        if (self._wanted is None or not self.running) and self._writing is None:
            waiters, self._settled_waiters = self._settled_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _release_claims(self) -> None:
        """Claims held back while everything was written again go out now."""
        waiters, self._after_full = self._after_full, []
        for waiter in waiters:
            waiter.callback(None)

    # -- sessions ended elsewhere ----------------------------------------------------------

    def _message(self, message: str) -> None:
        if not self.running or not message.startswith(SESSION_MESSAGE_PREFIX):
            return
        session_id = message[len(SESSION_MESSAGE_PREFIX) :]
        if self.supervisor.end(session_id, TOKEN_REVOKED):
            self._log.info(
                "fleet: session {session_id} ended by another instance's admin API",
                vncmux_event="fleet_session_ended",
                session_id=session_id,
            )


def _stamp(session: Session) -> tuple[float, int, int]:
    return (session.last_activity_at, session.bytes_to_backend, session.bytes_to_client)


def _pair(reply: object) -> tuple[int, int]:
    if not (isinstance(reply, list) and len(reply) == 2 and all(isinstance(x, int) for x in reply)):
        raise TypeError(f"the fleet claim answered {reply!r}")
    return reply[0], reply[1]


def _store_refusal(failure: Failure, what: str) -> Failure:
    """Redis down, slow or answering garbage: refused as a failed token lookup is (4503)."""
    failure.trap(TokenStoreUnavailable, TypeError)
    raise Refused(STORE_UNAVAILABLE, f"{what}: {failure.getErrorMessage()}")


@implementer(ISharedLimits)
class FleetLimits:
    """
    Per-token session limits counted over every live instance of the fleet
    (C{--max-sessions-per-token}, or the record's C{max_sessions}), atomically in Redis.
    Tokens without a limit are not counted. When Redis cannot answer, the session is
    refused with 4503, as its token lookup would have been.
    """

    def __init__(self, instance: FleetInstance, max_sessions_per_token: int) -> None:
        self._instance = instance
        self._max_sessions_per_token = max_sessions_per_token

    def claim(self, record: TokenRecord, client_address: str) -> Deferred[Callable[[], None]]:
        limit = record.max_sessions or self._max_sessions_per_token
        if not limit:
            return succeed(_nothing_to_give_back)
        token_hash = record.token_hash

        def answered(outcome: tuple[bool, int]) -> Callable[[], None]:
            granted, held = outcome
            if not granted:
                raise Refused(
                    TOO_MANY_SESSIONS,
                    f"token {record.token_id} fleet limit of {limit} reached ({held} sessions"
                    " on live instances)",
                )
            return lambda: self._instance.give_back(token_hash)

        granted = self._instance.claim(token_hash, limit).addCallback(answered)
        return granted.addErrback(_store_refusal, "fleet session count")


def _nothing_to_give_back() -> None:
    """A token without a limit took no place."""


@implementer(ISessionDirectory)
class FleetSessions:
    """
    The admin API's view of every live instance. An instance's own sessions are read from its
    own table (current figures), the others' from Redis (byte counts and activity as of
    their last heartbeat). Ending another instance's session publishes ``session:<id>`` on the
    revocation channel; the instance that holds it closes it with 4002 on receipt. Without
    C{instance} (a process that holds no sessions, e.g. a parent of workers) every session
    is read from Redis.
    """

    def __init__(self, store: RedisTokenStore, instance: FleetInstance | None = None) -> None:
        self._store = store
        self._instance = instance
        own = instance.instance_id if instance is not None else ""
        self._prefixes = [own, ALIVE_KEY_PREFIX, SESSIONS_KEY_PREFIX, COUNTS_KEY_PREFIX]

    def _own(self) -> dict[str, Session]:
        """This instance's live sessions (none without an instance)."""
        return self._instance.supervisor.sessions if self._instance is not None else {}

    def _shown(self, session: Session) -> dict[str, Any]:
        assert self._instance is not None  # only this instance's sessions are shown from here
        return self._instance.session_json(session)

    def _others(self) -> Deferred[list[dict[str, Any]]]:
        """Every session of the other live instances, as they last wrote it."""
        listing = self._store.evaluate("fleet list", _LIST, [INSTANCES_KEY], self._prefixes)
        return listing.addCallback(lambda values: [json.loads(v) for v in values or ()])

    def _find(self, session_id: str, end: bool) -> Deferred[dict[str, Any] | None]:
        """Another live instance's session; with C{end}, that instance is told to end it."""
        args = [*self._prefixes, session_id, REVOKE_CHANNEL if end else ""]
        finding = self._store.evaluate("fleet find", _FIND, [INSTANCES_KEY], args)
        return finding.addCallback(lambda value: None if value is None else json.loads(value))

    def list_sessions(self) -> Deferred[list[dict[str, Any]]]:
        def together(others: list[dict[str, Any]]) -> list[dict[str, Any]]:
            own = [self._shown(s) for s in self._own().values()]
            return sorted(own + others, key=lambda s: s["started_at"])

        return self._others().addCallback(together)

    def get_session(self, session_id: str) -> Deferred[dict[str, Any] | None]:
        session = self._own().get(session_id)
        if session is not None:
            return succeed(self._shown(session))
        return self._find(session_id, end=False)

    def end_session(self, session_id: str) -> Deferred[bool]:
        session = self._own().get(session_id)
        if session is not None:
            return succeed(session.end(TOKEN_REVOKED))
        return self._find(session_id, end=True).addCallback(lambda found: found is not None)

    def revoked(self, message: str) -> Deferred[int]:
        """
        End this instance's matching sessions now; the other instances end theirs when the
        store announces the revocation. Fires with the fleet's count of them.
        """
        ended = self._instance.supervisor.revoked(message) if self._instance is not None else 0

        def count(others: list[dict[str, Any]]) -> int:
            return ended + sum(1 for s in others if _matches(s, message))

        def uncounted(failure: Failure) -> int:
            failure.trap(TokenStoreUnavailable)  # logged by the store; the revocation goes on
            return ended

        return self._others().addCallbacks(count, uncounted)


def _matches(session: dict[str, Any], message: str) -> bool:
    """Whether a revocation message (token hash or ``instance:<uuid>``) names C{session}."""
    if message.startswith(INSTANCE_PREFIX):
        return bool(session.get("instance_uuid") == message[len(INSTANCE_PREFIX) :])
    return bool(session.get("token_id") == token_id_of(message))


def fleet_for(
    store: object, supervisor: Supervisor, clock: IReactorTime, heartbeat: float
) -> FleetInstance | None:
    """The fleet instance of this process when the token store is Redis and the heartbeat
    is on (C{heartbeat} > 0), else C{None}."""
    if not isinstance(store, RedisTokenStore) or not heartbeat:
        return None
    return FleetInstance(store, supervisor, clock, heartbeat)


__all__ = [
    "ALIVE_KEY_PREFIX",
    "COUNTS_KEY_PREFIX",
    "DEFAULT_HEARTBEAT",
    "INSTANCES_KEY",
    "SESSIONS_KEY_PREFIX",
    "FleetInstance",
    "FleetLimits",
    "FleetSessions",
    "fleet_for",
    "heartbeat_ttl",
    "new_instance_id",
]
