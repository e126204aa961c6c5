"""
The fleet registry (vncmux.fleet): what an instance writes and when, on a task.Clock against
a store that answers when the test says; then the Lua scripts against a real redis-server
shared by the test session, with several instances in this process (each with its own
store connection, supervisor and id, as separate processes would have).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.fakes import ClosingOwner, FakePeer
from tests.redis_server import RedisServer, session_redis, start_redis
from tests.webtesting import open_session
from vncmux.events import Observers
from vncmux.fleet import (
    ALIVE_KEY_PREFIX,
    COUNTS_KEY_PREFIX,
    INSTANCES_KEY,
    SESSIONS_KEY_PREFIX,
    WRITE_INTERVAL,
    FleetInstance,
    FleetLimits,
    FleetSessions,
    fleet_for,
    heartbeat_ttl,
)
from vncmux.interfaces import ISessionDirectory, ISessionObserver, ISharedLimits
from vncmux.refusals import STORE_UNAVAILABLE, TOKEN_REVOKED, TOO_MANY_SESSIONS, Refused
from vncmux.relay import RelayStats, Session
from vncmux.settings import Limits
from vncmux.supervisor import Supervisor
from vncmux.tokens import (
    FileTokenStore,
    RedisConfig,
    RedisTokenStore,
    TokenRecord,
    TokenStoreUnavailable,
    hash_token,
)


@dataclass
class Call:
    what: str
    keys: list[str]
    args: list[str]
    answer: Deferred[Any]


class FakeStore:
    """The part of RedisTokenStore the fleet uses; script calls wait for the test's answer."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.reconnects = 0
        self.watchers: list[Any] = []

    def evaluate(self, what: str, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        self.calls.append(Call(what, keys, args, Deferred()))
        return self.calls[-1].answer

    def watch_revocations(self, on_revoke: Any, on_reconnect: Any = None) -> Deferred[None]:
        self.watchers.append(on_revoke)
        return succeed(None)

    def take(self, what: str) -> Call:
        """The oldest unanswered call; it must be C{what}."""
        call = self.calls.pop(0)
        assert call.what == what, (call.what, what)
        return call


@dataclass
class Write:
    """A write script's arguments, decoded."""

    mode: str
    sessions: dict[str, dict[str, Any]]
    removed: list[str]
    counts: dict[str, int]


def decode(call: Call) -> Write:
    args = call.args
    mode, i = args[0], 4
    n = int(args[i])
    sessions = {args[i + 1 + 2 * j]: json.loads(args[i + 2 + 2 * j]) for j in range(n)}
    i += 1 + 2 * n
    m = int(args[i])
    removed = args[i + 1 : i + 1 + m]
    i += 1 + m
    k = int(args[i])
    counts = {args[i + 1 + 2 * j]: int(args[i + 2 + 2 * j]) for j in range(k)}
    return Write(mode, sessions, removed, counts)


def record(token: str = "token-1", max_sessions: int | None = None) -> TokenRecord:
    return TokenRecord(hash_token(token), "10.0.0.5", 5901, max_sessions=max_sessions)


class InstanceTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeStore()
        self.observers = Observers()
        self.supervisor = Supervisor(self.clock, self.observers, Limits())
        self.stats = RelayStats()
        self.fleet = FleetInstance(self.store, self.supervisor, self.clock, 10.0, "host:1:ab")  # type: ignore[arg-type]
        self.observers.add(self.fleet)
        self.fleet.startService()
        self.clock.advance(0)
        self.first = self.store.take("fleet write")
        self.first.answer.callback(1)

    def open(self, session_id: str, token: str = "token-1") -> Session:
        session, _, _ = open_session(self.supervisor, self.stats, token, session_id)
        return session

    def written(self) -> Write:
        """Let the write interval pass and answer the write it sends."""
        self.clock.advance(WRITE_INTERVAL)
        call = self.store.take("fleet write")
        call.answer.callback(1)
        return decode(call)


class WriteTests(InstanceTestCase):
    """Sessions and places reach Redis batched (one write per WRITE_INTERVAL at most), in
    order, and again in full whenever Redis may have lost them."""

    def test_first_write_is_full(self) -> None:
        """Starting registers the instance with everything, renewing every TTL."""
        self.assertEqual(decode(self.first).mode, "full")
        self.assertEqual(self.first.keys[0], ALIVE_KEY_PREFIX + "host:1:ab")
        self.assertEqual(self.first.args[1], str(round(heartbeat_ttl(10.0) * 1000)))
        self.assertTrue(verifyObject(ISessionObserver, self.fleet))

    def test_one_write_per_interval(self) -> None:
        """Sessions started in one write interval go out in one call, as the admin API shows
        them plus the instance; one started and ended meanwhile is never written."""
        self.open("s1")
        self.open("s2")
        self.open("s3").end(TOKEN_REVOKED)
        write = self.written()
        self.assertEqual(
            (write.mode, sorted(write.sessions), write.removed), ("delta", ["s1", "s2"], [])
        )
        self.assertEqual(write.sessions["s1"]["instance"], "host:1:ab")
        self.assertEqual(write.sessions["s1"]["token_id"], record().token_id)
        self.assertNotIn(hash_token("token-1"), json.dumps(write.sessions))
        self.clock.advance(WRITE_INTERVAL)
        self.assertEqual(self.store.calls, [])

    def test_at_most_one_write_per_interval(self) -> None:
        """After a quiet spell a change goes out in the next reactor turn; one right after a
        write waits until WRITE_INTERVAL has passed since that write began, and goes out
        with everything else that happened meanwhile."""
        self.clock.advance(WRITE_INTERVAL)  # quiet since the first write
        self.open("s1")
        self.clock.advance(0)
        self.store.take("fleet write").answer.callback(1)
        self.open("s2").end(TOKEN_REVOKED)
        self.open("s3")
        self.clock.advance(WRITE_INTERVAL * 0.9)
        self.assertEqual(self.store.calls, [])
        self.clock.advance(WRITE_INTERVAL * 0.1)
        write = decode(self.store.take("fleet write"))
        self.assertEqual((list(write.sessions), write.removed), (["s3"], []))

    def test_one_write_in_flight(self) -> None:
        """Changes made while a write is in flight wait for its answer, then go out together."""
        first = self.open("s1")
        self.clock.advance(WRITE_INTERVAL)
        in_flight = self.store.take("fleet write")
        first.end(TOKEN_REVOKED)
        self.open("s2")
        self.clock.advance(WRITE_INTERVAL)
        self.assertEqual(self.store.calls, [])
        in_flight.answer.callback(1)
        write = self.written()
        self.assertEqual((list(write.sessions), write.removed), (["s2"], ["s1"]))

    def test_heartbeat_refreshes_what_changed(self) -> None:
        """A heartbeat renews the TTLs and rewrites only the sessions whose byte counts or
        activity changed since they were written."""
        busy, _ = self.open("busy"), self.open("idle")
        self.written()
        busy.bytes_to_client += 100
        self.clock.advance(10)
        write = self.written()
        self.assertEqual((write.mode, list(write.sessions)), ("beat", ["busy"]))
        self.assertEqual(write.sessions["busy"]["bytes_to_client"], 100)
        self.clock.advance(10)
        self.assertEqual(self.written().sessions, {})

    def test_failed_write_makes_the_next_beat_full(self) -> None:
        """A write that failed may or may not have reached Redis: the next heartbeat
        replaces everything (sessions and the places held). An outage is logged once, and
        its end."""
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.open("s1")
        self.clock.advance(WRITE_INTERVAL)
        self.store.take("fleet write").answer.errback(TokenStoreUnavailable("down"))
        self.clock.advance(10)
        self.store.take("fleet write").answer.errback(TokenStoreUnavailable("down"))
        self.assertEqual([e["log_level"].name for e in self.logged], ["warn"])  # once
        self.clock.advance(10)
        write = self.written()
        self.assertEqual((write.mode, list(write.sessions)), ("full", ["s1"]))
        self.assertIn("again", self.logged[-1]["log_format"])

    def test_keys_gone_means_full_write(self) -> None:
        """When the script finds the heartbeat key gone (expired, Redis restarted), the
        instance writes everything again at once, in the next reactor turn."""
        self.open("s1")
        self.clock.advance(WRITE_INTERVAL)
        self.store.take("fleet write").answer.callback(0)
        self.clock.advance(0)
        write = decode(self.store.take("fleet write"))
        self.assertEqual((write.mode, list(write.sessions)), ("full", ["s1"]))

    def test_full_write_does_not_wait_for_the_interval(self) -> None:
        """A delta waiting for the interval is sent at once when a full write is wanted
        (after Redis reconnected): claims wait for that write."""
        self.clock.advance(WRITE_INTERVAL)
        self.open("s1")
        self.written()
        self.open("s2")  # a delta, due WRITE_INTERVAL after the last write
        self.store.reconnects += 1
        self.fleet.beat()
        self.clock.advance(0)
        self.assertEqual(decode(self.store.take("fleet write")).mode, "full")

    def test_stop_settles(self) -> None:
        """Stopping with a write scheduled but none in flight: whoever waits for the writes
        to settle is told at once."""
        self.open("s1")
        settled = self.fleet.settled()
        self.assertNoResult(settled)
        self.fleet.stopService()
        self.successResultOf(settled)

    def test_reconnected_redis_gets_full_write(self) -> None:
        """After the store reconnected to Redis the next heartbeat writes everything."""
        self.open("s1")
        self.written()
        self.store.reconnects += 1
        self.clock.advance(10)
        self.assertEqual(self.written().mode, "full")

    def test_clean_stop_leaves(self) -> None:
        """Stopping waits for the write in flight, then deletes the instance's keys."""
        self.open("s1")
        self.clock.advance(WRITE_INTERVAL)
        in_flight = self.store.take("fleet write")
        stopped = self.fleet.stopService()
        self.assertEqual(self.store.calls, [])
        in_flight.answer.callback(1)
        leave = self.store.take("fleet leave")
        self.assertEqual(
            leave.keys[:3],
            [k + "host:1:ab" for k in (ALIVE_KEY_PREFIX, SESSIONS_KEY_PREFIX, COUNTS_KEY_PREFIX)],
        )
        self.assertNoResult(stopped)
        leave.answer.callback(1)
        self.successResultOf(stopped)

    def test_ends_its_session_on_message(self) -> None:
        """``session:<id>`` on the revocation channel ends that session here with 4002;
        other messages (token hashes) are the supervisor's."""
        session = self.open("s1")
        (on_message,) = self.store.watchers
        on_message(hash_token("token-1"))
        self.assertIsNone(session.ending)
        on_message("session:s1")
        self.assertIs(session.ending, TOKEN_REVOKED)


class ClaimTests(InstanceTestCase):
    """Places under the fleet's per-token limit."""

    def limits(self, per_token: int = 2) -> FleetLimits:
        limits = FleetLimits(self.fleet, per_token)
        self.assertTrue(verifyObject(ISharedLimits, limits))
        return limits

    def test_granted_and_given_back(self) -> None:
        """A granted place is counted here and given back with the next write."""
        claiming = self.limits().claim(record(), "c")
        call = self.store.take("fleet claim")
        self.assertEqual(call.args[4:8], [hash_token("token-1"), "2", "30000", "0"])
        call.answer.callback([1, 1])
        give_back = self.successResultOf(claiming)
        self.assertEqual(self.fleet.held, {hash_token("token-1"): 1})
        give_back()
        self.assertEqual(self.fleet.held, {})
        self.assertEqual(self.written().counts, {hash_token("token-1"): -1})

    def test_claim_carries_places_not_written_back_yet(self) -> None:
        """A place given back since the last write goes with the token's next claim (the
        script takes it off the count before counting), not with the next write: a token at
        its limit gets its place back at once on this instance."""
        limits = self.limits()
        claiming = limits.claim(record(), "c")
        self.store.take("fleet claim").answer.callback([1, 1])
        self.successResultOf(claiming)()
        claiming = limits.claim(record(), "c")
        call = self.store.take("fleet claim")
        self.assertEqual(call.args[7], "1")
        call.answer.callback([1, 1])
        self.successResultOf(claiming)
        self.clock.advance(WRITE_INTERVAL)
        self.assertEqual(self.store.calls, [])  # nothing left for a write to carry

    def test_refused(self) -> None:
        """Over the limit the claim fails with 4429 and says how many the fleet holds."""
        claiming = self.limits().claim(record(max_sessions=3), "c")
        call = self.store.take("fleet claim")
        self.assertEqual(call.args[5], "3")  # the record's own limit wins
        call.answer.callback([0, 3])
        refused = self.failureResultOf(claiming, Refused).value
        self.assertIs(refused.refusal, TOO_MANY_SESSIONS)
        self.assertIn("fleet limit of 3 reached (3 sessions", refused.detail)

    def test_unlimited_token_not_counted(self) -> None:
        """Without a per-token limit nothing is counted and Redis is not asked."""
        self.successResultOf(self.limits(0).claim(record(), "c"))()
        self.assertEqual(self.store.calls, [])

    def test_store_down(self) -> None:
        """When Redis does not answer, the session is refused as a lookup would be (4503),
        and the next heartbeat writes the counts again (the claim may have counted)."""
        claiming = self.limits().claim(record(), "c")
        self.store.take("fleet claim").answer.errback(TokenStoreUnavailable("no answer"))
        self.assertIs(self.failureResultOf(claiming, Refused).value.refusal, STORE_UNAVAILABLE)
        self.clock.advance(10)
        self.assertEqual(self.written().mode, "full")

    def test_full_write_waits_for_claims(self) -> None:
        """A full write replaces the counts: it waits for claims in flight, and claims made
        meanwhile wait for it, so no place is lost or counted twice."""
        limits = self.limits()
        early = limits.claim(record(), "c")
        self.store.reconnects += 1
        self.clock.advance(10)
        late = limits.claim(record(), "c")
        self.assertEqual([c.what for c in self.store.calls], ["fleet claim"])
        self.store.take("fleet claim").answer.callback([1, 1])
        self.successResultOf(early)
        self.clock.advance(WRITE_INTERVAL)
        full = self.store.take("fleet write")
        self.assertEqual(decode(full).counts, {hash_token("token-1"): 1})
        self.assertEqual(self.store.calls, [])
        full.answer.callback(1)
        self.store.take("fleet claim").answer.callback([1, 1])
        self.successResultOf(late)
        self.assertEqual(self.fleet.held, {hash_token("token-1"): 2})


class DirectoryUnitTests(InstanceTestCase):
    """FleetSessions answers for this instance from its own table, without Redis."""

    def test_local_session(self) -> None:
        """This instance's session is read and ended here, with current figures."""
        directory = FleetSessions(self.store, self.fleet)  # type: ignore[arg-type]
        self.assertTrue(verifyObject(ISessionDirectory, directory))
        session = self.open("s1")
        session.bytes_to_backend = 7
        shown = self.successResultOf(directory.get_session("s1"))
        self.assertEqual((shown["bytes_to_backend"], shown["instance"]), (7, "host:1:ab"))
        self.assertTrue(self.successResultOf(directory.end_session("s1")))
        self.assertIs(session.ending, TOKEN_REVOKED)

    def test_fleet_only_with_redis(self) -> None:
        """A token file (one process) has no fleet; a heartbeat of 0 turns it off."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("")
        self.assertIsNone(
            fleet_for(FileTokenStore(path, self.clock), self.supervisor, self.clock, 10)
        )
        redis = RedisTokenStore(RedisConfig.from_url("redis://127.0.0.1:1/0"), self.clock)
        self.assertIsNone(fleet_for(redis, self.supervisor, self.clock, 0))
        self.assertIsInstance(fleet_for(redis, self.supervisor, self.clock, 5), FleetInstance)

    def test_revoked_counts_despite_store_failure(self) -> None:
        """Revocation ends local sessions even when the fleet's count cannot be read."""
        directory = FleetSessions(self.store, self.fleet)  # type: ignore[arg-type]
        session = self.open("s1")
        counting = directory.revoked(hash_token("token-1"))
        self.store.take("fleet list").answer.errback(TokenStoreUnavailable("down"))
        self.assertEqual(self.successResultOf(counting), 1)
        self.assertIs(session.ending, TOKEN_REVOKED)


class Closed:
    """A session observer whose Deferred fires with the next session that closes."""

    def __init__(self) -> None:
        self.next: Deferred[Session] = Deferred()

    def session_closed(self, session: Session, duration: float) -> None:
        if not self.next.called:
            self.next.callback(session)

    def session_opened(self, session: Session) -> None: ...
    def session_rejected(self, *args: object) -> None: ...
    def stage_timed(self, *args: object) -> None: ...


@dataclass
class Member:
    """One instance of the fleet in this process."""

    store: RedisTokenStore
    supervisor: Supervisor
    fleet: FleetInstance
    directory: FleetSessions
    limits: FleetLimits
    closed: Closed

    def open(self, session_id: str, token: str = "token-1") -> Session:
        session, _, _ = open_session(
            self.supervisor, RelayStats(), token, session_id, instance_uuid="vm-" + token
        )
        return session


class RedisFleetTests(TestCase):
    """The scripts against a real redis-server: instances A and B share it."""

    timeout = 30

    def setUp(self) -> None:
        self.server: RedisServer = session_redis(self)
        self.redis = self.server.client()
        self.addCleanup(self.redis.close)

    async def member(self, name: str, per_token: int = 2, heartbeat: float = 1000.0) -> Member:
        """A started instance; its heartbeat is long: the tests call beat() themselves."""
        store = RedisTokenStore(RedisConfig.from_url(self.server.url()), reactor, reactor=reactor)
        store.startService()
        self.addCleanup(store.stopService)
        closed = Closed()
        observers = Observers()
        supervisor = Supervisor(Clock(), observers, Limits())
        fleet = FleetInstance(store, supervisor, reactor, heartbeat, name)
        observers.add(fleet)
        observers.add(closed)  # after the fleet: it has seen the end when the test resumes
        fleet.startService()
        self.addCleanup(lambda: fleet.running and fleet.stopService())
        await store.watch_revocations(lambda message: None)  # subscribed
        await fleet.settled()
        return Member(
            store,
            supervisor,
            fleet,
            FleetSessions(store, fleet),
            FleetLimits(fleet, per_token),
            closed,
        )

    def test_every_instance_listed(self) -> None:
        """A lists its own sessions and B's, oldest first, each with its instance; one
        session is read from B through A."""
        return Deferred.fromCoroutine(self._listed())

    async def _listed(self) -> None:
        a, b = await self.member("A"), await self.member("B")
        b.supervisor.clock.advance(1)  # type: ignore[attr-defined]
        a.supervisor.clock.advance(2)  # type: ignore[attr-defined]
        a.open("a1")
        b.open("b1", "token-2")
        await a.fleet.settled()
        await b.fleet.settled()
        listed = await a.directory.list_sessions()
        self.assertEqual(
            [(s["session_id"], s["instance"]) for s in listed], [("b1", "B"), ("a1", "A")]
        )
        shown = await a.directory.get_session("b1")
        self.assertEqual((shown["instance_uuid"], shown["backend_port"]), ("vm-token-2", 5901))
        self.assertIsNone(await a.directory.get_session("nothing"))

    def test_end_session_of_another_instance(self) -> None:
        """A ends B's session: B closes it with 4002 within a second; an unknown session
        (or one of an instance that is gone) is not found."""
        return Deferred.fromCoroutine(self._end())

    async def _end(self) -> None:
        a, b = await self.member("A"), await self.member("B")
        session = b.open("b1")
        await b.fleet.settled()
        asked_at = reactor.seconds()
        self.assertTrue(await a.directory.end_session("b1"))
        self.assertIs(await b.closed.next, session)
        self.assertLess(reactor.seconds() - asked_at, 1.0)
        self.assertIs(session.ending, TOKEN_REVOKED)
        await b.fleet.settled()
        self.assertFalse(await a.directory.end_session("b1"))
        self.assertFalse(await a.directory.end_session("nothing"))

    def test_view_from_outside(self) -> None:
        """A process holding no sessions (a parent of workers) sees and ends them all
        through Redis alone."""
        return Deferred.fromCoroutine(self._outside())

    async def _outside(self) -> None:
        a, b = await self.member("A"), await self.member("B")
        a.open("a1")
        session = b.open("b1", "token-2")
        await a.fleet.settled()
        await b.fleet.settled()
        outside = FleetSessions(a.store)
        listed = await outside.list_sessions()
        self.assertEqual(
            sorted((s["session_id"], s["instance"]) for s in listed), [("a1", "A"), ("b1", "B")]
        )
        self.assertEqual((await outside.get_session("a1"))["instance"], "A")
        self.assertEqual(await outside.revoked(hash_token("token-2")), 1)
        self.assertEqual(await outside.revoked("instance:vm-token-1"), 1)
        self.assertEqual(await outside.revoked(hash_token("token-3")), 0)
        self.assertIsNone(session.ending)  # the store's announcement ends it, not this count
        self.assertTrue(await outside.end_session("b1"))
        self.assertIs(await b.closed.next, session)

    def test_per_token_limit_across_instances(self) -> None:
        """Two places of a token limited to 2, one on A and one on B: the third is refused
        on either; a place given back on B is free for A."""
        return Deferred.fromCoroutine(self._limit())

    async def _limit(self) -> None:
        a, b = await self.member("A"), await self.member("B")
        await a.limits.claim(record(), "c")
        give_back = await b.limits.claim(record(), "c")
        for member in (a, b):
            with self.assertRaises(Refused) as refused:
                await member.limits.claim(record(), "c")
            self.assertIs(refused.exception.refusal, TOO_MANY_SESSIONS)
        await a.limits.claim(record("token-2"), "c")  # another token has its own count
        give_back()
        await b.fleet.settled()
        give_back = await a.limits.claim(record(), "c")
        give_back()  # and again at once, before A writes: its own place given back counts
        await a.limits.claim(record(), "c")
        self.assertEqual(
            self.redis.hgetall(COUNTS_KEY_PREFIX + "A"),
            {hash_token("token-1"): "2", hash_token("token-2"): "1"},
        )
        self.assertEqual(self.redis.hgetall(COUNTS_KEY_PREFIX + "B"), {})

    def test_dead_instance_not_counted(self) -> None:
        """An instance whose heartbeat key expired (it crashed or froze) counts for nothing:
        its sessions leave the listing and its places the limits, and readers delete its
        keys. Every key of an instance carries the TTL of three heartbeats."""
        return Deferred.fromCoroutine(self._dead())

    async def _dead(self) -> None:
        a, b = await self.member("A", per_token=1), await self.member("B", heartbeat=2.0)
        b.open("b1")
        await b.limits.claim(record(), "c")
        await b.fleet.settled()
        for prefix in (ALIVE_KEY_PREFIX, SESSIONS_KEY_PREFIX, COUNTS_KEY_PREFIX):
            self.assertTrue(0 < self.redis.pttl(prefix + "B") <= 6000, prefix)
        with self.assertRaises(Refused):
            await a.limits.claim(record(), "c")
        self.redis.delete(ALIVE_KEY_PREFIX + "B")  # what its expiry does
        self.assertEqual(await a.directory.list_sessions(), [])
        await a.limits.claim(record(), "c")
        self.assertEqual(self.redis.exists(SESSIONS_KEY_PREFIX + "B", COUNTS_KEY_PREFIX + "B"), 0)
        self.assertEqual(self.redis.smembers(INSTANCES_KEY), {"A"})
        b.fleet.beat()  # B was only frozen: its next heartbeat writes it all again
        await b.fleet.settled()
        self.assertEqual([s["session_id"] for s in await a.directory.list_sessions()], ["b1"])

    def test_clean_stop_removes_keys(self) -> None:
        """A stopped instance's keys are gone at once; the other's stay."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.member("A")
        b = await self.member("B")
        b.open("b1")
        await b.limits.claim(record(), "c")
        await b.fleet.settled()
        await b.fleet.stopService()
        self.assertEqual(
            sorted(self.redis.keys("vncmux:fleet:*")), [ALIVE_KEY_PREFIX + "A", INSTANCES_KEY]
        )
        self.assertEqual(self.redis.smembers(INSTANCES_KEY), {"A"})


class RedisRestartTests(TestCase):
    """A Redis that lost everything gets the registry back with the next heartbeat."""

    timeout = 30

    def test_rewritten_after_restart(self) -> None:
        """Redis restarts empty; once the store has reconnected, the next heartbeat writes
        the instance, its sessions and its places again."""
        return Deferred.fromCoroutine(self._restart())

    async def _restart(self) -> None:
        server = start_redis(self)
        store = RedisTokenStore(
            RedisConfig.from_url(server.url()),
            reactor,
            reactor=reactor,
            reconnect_policy=lambda _: 0.05,
        )
        store.startService()
        self.addCleanup(store.stopService)
        supervisor = Supervisor(Clock(), Observers(), Limits())
        fleet = FleetInstance(store, supervisor, reactor, 1000.0, "A")
        supervisor.observer.add(fleet)  # type: ignore[attr-defined]
        fleet.startService()
        self.addCleanup(fleet.stopService)
        open_session(supervisor, RelayStats(), "token-1", "a1")
        await FleetLimits(fleet, 5).claim(record(), "c")
        await fleet.settled()
        reconnected = store.next_reconnection()
        server.restart()
        with server.client() as client:
            self.assertEqual(client.keys("vncmux:fleet:*"), [])
            await store.ping().addErrback(lambda f: f.trap(TokenStoreUnavailable))
            await reconnected
            fleet.beat()
            await fleet.settled()
            self.assertEqual(list(client.hgetall(SESSIONS_KEY_PREFIX + "A")), ["a1"])
            self.assertEqual(client.hgetall(COUNTS_KEY_PREFIX + "A"), {hash_token("token-1"): "1"})
            self.assertEqual(client.smembers(INSTANCES_KEY), {"A"})


class RedisCostTests(TestCase):
    """
    The Redis cost per session that docs/sessions.md states, counted by Redis itself
    (INFO commandstats): benchmarks/fleet_cost.py measures the same in more detail.
    """

    timeout = 30

    def script_calls(self) -> int:
        """Script calls Redis has answered so far: each is one round trip of the proxy."""
        stats = self.redis.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))

    def test_round_trips_per_session(self) -> None:
        """A session costs two round trips at its start (its place, its registration), one
        at its end, none while it lives: a heartbeat is one call for the whole instance."""
        return Deferred.fromCoroutine(self._cost())

    async def _cost(self) -> None:
        self.server = session_redis(self)
        self.redis = self.server.client()
        self.addCleanup(self.redis.close)
        member = await RedisFleetTests.member(self, "A")  # type: ignore[arg-type]
        member.supervisor.shared_limits = (member.limits,)
        sessions = []
        for n in range(20):
            before = self.script_calls()
            placed = record(f"token-{n}")
            reservation = await member.supervisor.take_place(placed, "c")
            session = Session(
                f"s{n}", placed, "c", FakePeer(), FakePeer(), 0.0, member.supervisor, None,
                reservation, ClosingOwner(),
            )  # fmt: skip
            session.start(session.client.transport, session.backend.transport, RelayStats())
            await member.fleet.settled()
            self.assertEqual(self.script_calls() - before, 2)
            sessions.append(session)
        before = self.script_calls()
        for session in sessions:
            session.bytes_to_client += 1
        member.fleet.beat()
        await member.fleet.settled()
        self.assertEqual(self.script_calls() - before, 1)
        for session in sessions:
            before = self.script_calls()
            session.end(TOKEN_REVOKED)  # gives its place back too
            await member.fleet.settled()
            self.assertLessEqual(self.script_calls() - before, 1)
        self.assertEqual(self.redis.hgetall(COUNTS_KEY_PREFIX + "A"), {})
