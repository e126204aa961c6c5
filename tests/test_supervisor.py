"""The supervisor on a task.Clock: timeouts, limits, revocation, write-back and drain."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.fakes import ClosingOwner, FakePeer
from tests.test_rfb import cut_text
from vncmux.events import Observers
from vncmux.interfaces import IActivitySink, IHashLookup, IRevocationFeed, ISharedLimits
from vncmux.refusals import (
    CLIENT_UNRESPONSIVE,
    IDLE_TIMEOUT,
    LIFETIME_REACHED,
    SHUTDOWN,
    TOKEN_EXPIRED_ENDING,
    TOKEN_REVOKED,
    TOO_MANY_SESSIONS,
    Refused,
)
from vncmux.relay import (
    CLIENT_BUFFER_SIZE,
    MAX_CLIENT_READ_SIZE,
    READ_BUDGET,
    Session,
    grow_read_size,
    read_size_for,
    upload_read_size_for,
)
from vncmux.rfb import ClientActivityScanner
from vncmux.settings import Limits
from vncmux.supervisor import Supervisor
from vncmux.tokens import TokenRecord

POINTER = b"\x05\x00\x00\x10\x00\x10"
HANDSHAKE = b"RFB 003.008\n\x01\x01"


@implementer(IActivitySink, IRevocationFeed)
class FakeBackchannel:
    """Records activity write-backs and revocation subscriptions."""

    def __init__(self) -> None:
        self.writes: list[dict[str, float]] = []
        self.on_revoke: Callable[[str], object] | None = None
        self.on_reconnect: Callable[[], object] | None = None
        self.pending: Deferred[None] | None = None
        self.records: dict[str, TokenRecord] = {}

    def record_activity(self, updates: Mapping[str, float]) -> Deferred[None]:
        self.writes.append(dict(updates))
        return self.pending if self.pending is not None else succeed(None)

    def watch_revocations(
        self, on_revoke: Callable[[str], object], on_reconnect: Callable[[], object] | None = None
    ) -> Deferred[None]:
        self.on_revoke = on_revoke
        self.on_reconnect = on_reconnect
        return succeed(None)

    def lookup_hash(self, token_hash: str) -> Deferred[TokenRecord | None]:
        return succeed(self.records.get(token_hash))


def record(n: int = 1, **fields: object) -> TokenRecord:
    return TokenRecord(f"{n:064x}", "127.0.0.1", 5900, **fields)  # type: ignore[arg-type]


MiB = 1024 * 1024


class SupervisorTestCase(SynchronousTestCase):
    def make(self, **limits: object) -> Supervisor:
        limits.setdefault("ping_interval", 0)  # fakes answer no pings unless a test says so
        self.clock = Clock()
        self.clock.advance(1000)
        self.backchannel = FakeBackchannel()
        supervisor = Supervisor(
            self.clock,
            Observers(),
            Limits(**limits),
            activity=self.backchannel,
            revocations=self.backchannel,
        )
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        self.supervisor = supervisor
        return supervisor

    def open(self, rec: TokenRecord | None = None, client: str = "198.51.100.1") -> Session:
        """Admit and start a session the way the WebSocket protocol does."""
        rec = rec or record()
        reservation = self.supervisor.reserve(rec, client)
        session = Session(
            f"s{len(self.supervisor.sessions)}-{rec.token_id}-{client}",
            rec,
            client,
            FakePeer(),
            FakePeer(),
            self.clock.seconds(),
            self.supervisor,
            ClientActivityScanner(),
            reservation,
            ClosingOwner(),
        )
        session.start(session.client.transport, session.backend.transport, _stats())
        session.from_client((HANDSHAKE,))
        return session


def _stats():  # type: ignore[no-untyped-def]
    from vncmux.relay import RelayStats

    return RelayStats()


class IdleTimeoutTests(SupervisorTestCase):
    """Idle sessions end with 4000, measured from the last user input."""

    def test_just_before_and_after(self) -> None:
        """Open at 1799 s idle, closed with 4000 once 1800 s have passed."""
        self.make(idle_timeout=1800)
        session = self.open()
        self.clock.pump([1.0] * 1799)
        self.assertIsNone(session.ending)
        self.clock.advance(1)
        self.assertIs(session.ending, IDLE_TIMEOUT)
        self.assertEqual(session.client.closed, (4000, "idle timeout"))
        self.assertEqual(self.supervisor.sessions, {})

    def test_reset_by_input(self) -> None:
        """A pointer event restarts the idle countdown."""
        self.make(idle_timeout=60)
        session = self.open()
        self.clock.pump([1.0] * 50)
        session.from_client((POINTER,))
        self.clock.pump([1.0] * 50)
        self.assertIsNone(session.ending)
        self.clock.pump([1.0] * 11)
        self.assertIs(session.ending, IDLE_TIMEOUT)

    def test_not_reset_by_screen_updates(self) -> None:
        """Framebuffer traffic (a ticking clock on the desktop) does not keep it open."""
        self.make(idle_timeout=60)
        session = self.open()
        for _ in range(61):
            session.from_backend(b"\x00" * 100)
            session.from_client((b"\x03\x01\x00\x00\x00\x00\x04\x00\x03\x00",))
            self.clock.advance(1)
        self.assertIs(session.ending, IDLE_TIMEOUT)

    def test_off(self) -> None:
        """An idle timeout of 0 never ends a session."""
        self.make(idle_timeout=0)
        session = self.open()
        self.clock.pump([100.0] * 100)
        self.assertIsNone(session.ending)


class LifetimeAndExpiryTests(SupervisorTestCase):
    """Absolute limits: --max-session and --enforce-expiry."""

    def test_lifetime(self) -> None:
        """A session ends with 4001 at its lifetime, however active it is."""
        self.make(idle_timeout=0, max_session=300)
        session = self.open()
        for _ in range(299):
            session.from_client((POINTER,))
            self.clock.advance(1)
        self.assertIsNone(session.ending)
        self.clock.advance(1)
        self.assertIs(session.ending, LIFETIME_REACHED)
        self.assertEqual(session.client.closed, (4001, "session lifetime reached"))

    def test_expiry(self) -> None:
        """With --enforce-expiry a session ends at its token's expires_at."""
        self.make(idle_timeout=0, enforce_expiry=True)
        session = self.open(record(expires_at=1100.0))
        self.clock.pump([1.0] * 99)
        self.assertIsNone(session.ending)
        self.clock.advance(1)
        self.assertIs(session.ending, TOKEN_EXPIRED_ENDING)

    def test_expiry_not_enforced(self) -> None:
        """Without --enforce-expiry the token's expiry only matters at connect time."""
        self.make(idle_timeout=0)
        session = self.open(record(expires_at=1100.0))
        self.clock.pump([1.0] * 200)
        self.assertIsNone(session.ending)


class ReadSizeTests(SupervisorTestCase):
    """Many consoles streaming at once each read less, so one reactor pass stays short."""

    def test_read_size_for(self) -> None:
        """Big reads for a few streaming consoles, a bounded total for many."""
        self.assertEqual(
            [read_size_for(n) for n in (0, 1, 16, 32, 100, 1000)],
            [512 * 1024, 512 * 1024, 256 * 1024, 128 * 1024, READ_BUDGET // 100, 32 * 1024],
        )

    def test_sweep_sets_every_read_size(self) -> None:
        """A sweep that sees 32 consoles stream while someone types cuts every read size to
        their share of the budget, 128 KiB (new sessions' too); a quiet sweep brings the big
        reads back."""
        self.make()
        sessions = [self.open(record(n)) for n in range(40)]
        for session in sessions[:32]:
            session.from_backend(b"x" * (512 * 1024))
        sessions[39].from_client((POINTER,))
        self.supervisor.sweep()
        later = self.open(record(99))
        sizes = {s.backend.transport.bufferSize for s in [*sessions, later]}
        self.assertEqual(sizes, {128 * 1024})
        self.supervisor.sweep()
        self.assertEqual({s.backend.transport.bufferSize for s in sessions}, {512 * 1024})


    def test_no_budget_while_nobody_types(self) -> None:
        """Without input from any browser since the last sweep nobody waits for an echo:
        32 streaming consoles keep their big reads (a session's start is not input). One
        pointer event brings the budget back at the next sweep."""
        self.make()
        sessions = [self.open(record(n)) for n in range(32)]
        for session in sessions:
            session.from_backend(b"x" * (512 * 1024))
        self.supervisor.sweep()
        self.assertEqual({s.backend.transport.bufferSize for s in sessions}, {512 * 1024})
        self.clock.advance(1)
        for session in sessions:
            session.from_backend(b"x" * (512 * 1024))
        sessions[0].from_client((POINTER,))
        self.supervisor.sweep()
        self.assertEqual({s.backend.transport.bufferSize for s in sessions}, {128 * 1024})


#: What a browser's upload looks like: a ClientCutText message, a quarter MiB in all.
UPLOAD = cut_text(b"x" * (CLIENT_BUFFER_SIZE - 8))


class UploadReadSizeTests(SupervisorTestCase):
    """A browser that uploads reads big, within the same read budget as streaming consoles."""

    def test_upload_read_size_for(self) -> None:
        """2 MiB for one upload, the budget's share for more, never under 256 KiB."""
        self.assertEqual(
            [upload_read_size_for(n) for n in (0, 1, 4, 8, 32, 1000)],
            [MAX_CLIENT_READ_SIZE, MAX_CLIENT_READ_SIZE, MiB, 512 * 1024, 256 * 1024, 256 * 1024],
        )

    def test_full_reads_double_up_to_the_most(self) -> None:
        """Each full read doubles the browser's read size, up to what the supervisor allows."""
        self.make()
        transport = self.open().client.transport
        self.assertEqual(transport.bufferSize, CLIENT_BUFFER_SIZE)
        sizes = []
        for _ in range(4):
            grow_read_size(transport, self.supervisor.upload_read_size)
            sizes.append(transport.bufferSize)
        self.assertEqual(sizes, [512 * 1024, MiB, 2 * MiB, 2 * MiB])
        grow_read_size(transport, MiB)
        self.assertEqual(transport.bufferSize, 2 * MiB)  # a lower bound shrinks nothing

    def test_sweep_shrinks_ended_uploads_and_shares_the_budget(self) -> None:
        """Four uploads and four streaming consoles share the 4 MiB budget: every upload is
        cut to 512 KiB and every console reads 512 KiB; an upload that stopped since the last
        sweep goes back to 256 KiB, as do the others once all stop."""
        self.make()
        uploads = [self.open(record(n)) for n in range(4)]
        consoles = [self.open(record(n + 4)) for n in range(4)]
        for session in uploads:
            session.set_client_read_size(2 * MiB)
            session.from_client((UPLOAD,))
        for session in consoles:
            session.from_backend(b"x" * (512 * 1024))
        self.supervisor.sweep()
        self.assertEqual(self.supervisor.upload_read_size, 512 * 1024)
        self.assertEqual({s.client_read_size for s in uploads}, {512 * 1024})
        self.assertEqual({s.backend.transport.bufferSize for s in consoles}, {512 * 1024})
        for session in uploads[1:]:
            session.from_client((UPLOAD,))
        self.supervisor.sweep()
        self.assertEqual(uploads[0].client_read_size, CLIENT_BUFFER_SIZE)
        self.assertEqual({s.client_read_size for s in uploads[1:]}, {512 * 1024})
        self.assertEqual(self.supervisor.upload_read_size, READ_BUDGET // 3)  # 3 stream now
        self.supervisor.sweep()
        self.assertEqual({s.client_read_size for s in uploads}, {CLIENT_BUFFER_SIZE})
        self.assertEqual(self.supervisor.upload_read_size, MAX_CLIENT_READ_SIZE)


class KeepaliveTests(SupervisorTestCase):
    """Keepalive pings go out on the sweep; a client that stops answering is dropped."""

    def test_ping_rounds(self) -> None:
        """Every ping interval each session without an outstanding ping gets one."""
        self.make(idle_timeout=0, ping_interval=30, ping_timeout=20)
        session = self.open()
        self.clock.pump([1.0] * 29)
        self.assertEqual(session.client.pings, 0)
        self.clock.advance(1)
        self.assertEqual(session.client.pings, 1)
        self.assertEqual(session.ping_sent_at, 1030.0)
        session.ping_sent_at = None  # the pong
        self.clock.pump([1.0] * 30)
        self.assertEqual(session.client.pings, 2)
        self.assertIsNone(session.ending)

    def test_unanswered(self) -> None:
        """A ping unanswered for the ping timeout drops the client and ends the session."""
        self.make(idle_timeout=0, ping_interval=30, ping_timeout=20)
        session = self.open()
        self.clock.pump([1.0] * 49)
        self.assertIsNone(session.ending)
        self.clock.advance(1)
        self.assertTrue(session.client.dropped)
        self.assertIs(session.ending, CLIENT_UNRESPONSIVE)
        self.assertEqual(session.backend.closed[0], 1006)

    def test_off(self) -> None:
        """A ping interval of 0 sends nothing."""
        self.make(idle_timeout=0, ping_interval=0)
        session = self.open()
        self.clock.pump([1.0] * 200)
        self.assertEqual(session.client.pings, 0)


class LimitTests(SupervisorTestCase):
    """Reservations count sessions against the process, token and client limits."""

    def test_process_limit(self) -> None:
        """The (n+1)th session of the process is refused with 4429."""
        self.make(max_sessions=2)
        self.open(record(1))
        self.open(record(2))
        e = self.assertRaises(Refused, self.supervisor.reserve, record(3), "c")
        self.assertEqual(e.refusal.code, 4429)

    def test_token_limit_from_record(self) -> None:
        """A record's max_sessions overrides --max-sessions-per-token."""
        self.make(max_sessions_per_token=5)
        rec = record(1, max_sessions=1)
        self.open(rec)
        e = self.assertRaises(Refused, self.supervisor.reserve, rec, "c")
        self.assertEqual(e.refusal.reason, "too many sessions")
        self.supervisor.reserve(record(2), "c")

    def test_client_limit(self) -> None:
        """One client address may hold only so many sessions."""
        self.make(max_sessions_per_client=1)
        self.open(record(1), client="c1")
        self.assertRaises(Refused, self.supervisor.reserve, record(2), "c1")
        self.supervisor.reserve(record(2), "c2")

    def test_ended_sessions_give_back(self) -> None:
        """An ended session frees its place; a released reservation too, once however often
        it is released."""
        self.make(max_sessions=2)
        session = self.open()
        session.end(IDLE_TIMEOUT)
        reservation = self.supervisor.reserve(record(2), "c")
        reservation.release()
        reservation.release()
        session.reservation.release()
        self.assertEqual(self.supervisor.reserved, 0)
        self.open(record(3))
        self.open(record(4))
        self.assertRaises(Refused, self.supervisor.reserve, record(5), "c")


@implementer(ISharedLimits)
class FakeSharedLimit:
    """A shared limit that answers when the test says: the workers' parent or Redis."""

    def __init__(self) -> None:
        self.asked: list[Deferred[object]] = []
        self.held = 0

    def claim(self, record: TokenRecord, client_address: str) -> Deferred[object]:
        self.asked.append(Deferred())
        return self.asked[-1]

    def grant(self) -> None:
        """Answer the oldest open claim with a place."""
        self.held += 1
        self.asked.pop(0).callback(self._give_back)

    def refuse(self) -> None:
        self.asked.pop(0).errback(Refused(TOO_MANY_SESSIONS, "the fleet is full"))

    def _give_back(self) -> None:
        self.held -= 1


class SharedLimitTests(SupervisorTestCase):
    """take_place counts a session under every shared limit and gives back all or nothing."""

    def shared(self, count: int = 2) -> list[FakeSharedLimit]:
        self.make(max_sessions=5)
        limits = [FakeSharedLimit() for _ in range(count)]
        self.supervisor.shared_limits = tuple(limits)
        return limits

    def test_granted_by_every_limit_in_turn(self) -> None:
        """The reservation comes once both limits granted; release gives all places back."""
        first, second = self.shared()
        placing = self.supervisor.take_place(record(), "c")
        self.assertEqual((len(first.asked), len(second.asked)), (1, 0))
        first.grant()
        self.assertNoResult(placing)
        second.grant()
        reservation = self.successResultOf(placing)
        self.assertEqual((self.supervisor.reserved, first.held, second.held), (1, 1, 1))
        reservation.release()
        reservation.release()
        self.assertEqual((self.supervisor.reserved, first.held, second.held), (0, 0, 0))

    def test_refused_by_a_shared_limit(self) -> None:
        """A refusal fails with its reason and gives back the places taken so far."""
        first, second = self.shared()
        placing = self.supervisor.take_place(record(), "c")
        first.grant()
        second.refuse()
        self.assertEqual(self.failureResultOf(placing, Refused).value.detail, "the fleet is full")
        self.assertEqual((self.supervisor.reserved, first.held), (0, 0))

    def test_local_limit_asks_no_shared_limit(self) -> None:
        """Over this process's own limit, no shared limit is asked."""
        (limit,) = self.shared(1)
        self.supervisor.limits = Limits(max_sessions=0, max_sessions_per_token=1)
        self.supervisor.reserve(record(), "c")
        self.failureResultOf(self.supervisor.take_place(record(), "c"), Refused)
        self.assertEqual(limit.asked, [])

    def test_cancelled_while_asking_gives_back_late_places(self) -> None:
        """A client gone while a shared limit answers: the late place is given back."""
        (limit,) = self.shared(1)
        placing = self.supervisor.take_place(record(), "c")
        placing.cancel()
        self.failureResultOf(placing)
        self.assertEqual(self.supervisor.reserved, 0)
        limit.grant()
        self.assertEqual(limit.held, 0)


class RevocationTests(SupervisorTestCase):
    """Messages on the revocation channel end matching sessions with 4002."""

    def test_by_token(self) -> None:
        """A token hash ends that token's sessions only."""
        self.make()
        doomed, kept = self.open(record(1)), self.open(record(2))
        for interface in (IActivitySink, IRevocationFeed, IHashLookup):
            verifyObject(interface, self.backchannel)
        self.assertEqual(self.backchannel.on_revoke(record(1).token_hash), 1)
        self.assertIs(doomed.ending, TOKEN_REVOKED)
        self.assertEqual(doomed.client.closed, (4002, "token revoked"))
        self.assertIsNone(kept.ending)

    def test_by_instance(self) -> None:
        """instance:<uuid> ends every session of that instance."""
        self.make()
        a = self.open(record(1, instance_uuid="u1"))
        b = self.open(record(2, instance_uuid="u1"))
        c = self.open(record(3, instance_uuid="u2"))
        self.assertEqual(self.supervisor.revoked("instance:u1"), 2)
        self.assertEqual([a.ending, b.ending, c.ending], [TOKEN_REVOKED, TOKEN_REVOKED, None])

    def test_recheck_after_reconnect(self) -> None:
        """Revocations missed while the channel was down are found on reconnect: sessions
        whose records are gone end with 4002, the others go on."""
        self.make()
        gone, kept = self.open(record(1)), self.open(record(2))
        self.backchannel.records = {record(2).token_hash: record(2)}
        self.successResultOf(self.backchannel.on_reconnect())
        self.assertIs(gone.ending, TOKEN_REVOKED)
        self.assertIsNone(kept.ending)


class WriteBackTests(SupervisorTestCase):
    """last_activity_at goes back to the store in one batch per flush interval."""

    def test_one_batch_per_interval(self) -> None:
        """Many sessions and many packets make one write per interval, newest stamp per
        token, and only for tokens that saw input (or a new session) since the last flush."""
        self.make(idle_timeout=0, flush_interval=10)
        a1, a2 = self.open(record(1)), self.open(record(1))
        b, quiet = self.open(record(2)), self.open(record(3))
        self.clock.pump([1.0] * 10)
        opened = {record(n).token_hash: 1000.0 for n in (1, 2, 3)}
        self.assertEqual(self.backchannel.writes, [opened])
        self.clock.advance(3)
        a1.from_client((POINTER * 50,))
        b.from_client((POINTER,))
        self.clock.advance(3)
        a2.from_client((POINTER,))
        self.clock.pump([1.0] * 4)
        self.assertEqual(
            self.backchannel.writes[1:],
            [{record(1).token_hash: 1016.0, record(2).token_hash: 1013.0}],
        )
        self.clock.pump([1.0] * 10)
        self.assertEqual(len(self.backchannel.writes), 2, "nothing new, nothing written")
        self.assertIsNone(quiet.ending)

    def test_input_right_after_a_flush(self) -> None:
        """Input stamped with the very sweep time of the last flush still goes out next."""
        self.make(idle_timeout=0, flush_interval=10)
        session = self.open()
        self.clock.pump([1.0] * 10)
        session.from_client((POINTER,))  # stamped 1010, the time of the flush just made
        self.clock.pump([1.0] * 10)
        self.assertEqual(self.backchannel.writes[-1], {record().token_hash: 1010.0})

    def test_ended_sessions_flushed(self) -> None:
        """A session that ended between flushes still has its last input written."""
        self.make(idle_timeout=0, flush_interval=10)
        session = self.open()
        self.clock.pump([1.0] * 12)
        session.from_client((POINTER,))
        session.end(IDLE_TIMEOUT)
        self.successResultOf(self.supervisor.stopService())
        self.assertEqual(self.backchannel.writes[-1], {record().token_hash: 1012.0})

    def test_failed_flush_is_retried(self) -> None:
        """A failed write keeps the activity for the next flush."""
        self.make(idle_timeout=0, flush_interval=10)
        session = self.open()
        self.backchannel.pending = Deferred()
        self.clock.advance(1)
        session.from_client((POINTER,))
        self.clock.pump([1.0] * 10)
        self.backchannel.pending.errback(ConnectionError("redis down"))
        self.backchannel.pending = None
        self.clock.pump([1.0] * 10)
        self.assertEqual(len(self.backchannel.writes), 2)
        self.assertEqual(self.backchannel.writes[1], self.backchannel.writes[0])


    def test_nothing_kept_without_a_sink(self) -> None:
        """Without a store that takes activity (a token file, nova) nothing is kept for a
        write-back: the stamps of ended sessions would pile up, one per token, for ever."""
        self.make(idle_timeout=0, flush_interval=10)
        self.supervisor.activity = None
        for n in range(3):
            self.open(record(n)).end(IDLE_TIMEOUT)
        self.clock.pump([1.0] * 10)
        self.assertEqual(self.supervisor._ended_activity, {})
        self.assertEqual(self.backchannel.writes, [])


class DrainTests(SupervisorTestCase):
    """Shutdown lets sessions run for the grace period, then ends them with 1001."""

    def test_grace_then_going_away(self) -> None:
        """Sessions alive after the grace period get 1001; the drain waits for sockets."""
        self.make(idle_timeout=0)
        session = self.open()
        self.supervisor.connections.opened()
        draining = self.supervisor.drain(30, 5)
        self.clock.advance(29)
        self.assertIsNone(session.ending)
        self.assertNoResult(draining)
        self.clock.advance(1)
        self.assertIs(session.ending, SHUTDOWN)
        self.assertEqual(session.client.closed, (1001, "going away"))
        self.assertNoResult(draining)
        self.supervisor.connections.closed()
        self.successResultOf(draining)

    def test_sessions_ending_on_their_own(self) -> None:
        """When the last session ends during the grace period the drain finishes early."""
        self.make(idle_timeout=0)
        session = self.open()
        draining = self.supervisor.drain(30, 5)
        self.clock.advance(5)
        session.end(IDLE_TIMEOUT)
        self.successResultOf(draining)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 1006.0)

    def test_stuck_sockets_bounded(self) -> None:
        """Sockets that never close do not hold shutdown past the close timeout."""
        self.make(idle_timeout=0)
        self.supervisor.connections.opened()
        draining = self.supervisor.drain(0, 5)
        self.clock.advance(0)
        self.assertNoResult(draining)
        self.clock.advance(5)
        self.successResultOf(draining)
