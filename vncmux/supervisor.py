"""The table of live sessions and everything that ends them from outside the relay.

One periodic sweep on the injected clock serves every session: it refreshes the coarse
``now`` that the relay stamps as activity, ends idle, over-age and expired sessions, and
batches ``last_activity_at`` back to the token store. Nothing here runs per packet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    FirstError,
    TimeoutError,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from vncmux.interfaces import IActivitySink, IRevocationFeed, ISessionObserver, ISharedLimits
from vncmux.refusals import (
    CLIENT_UNRESPONSIVE,
    IDLE_TIMEOUT,
    LIFETIME_REACHED,
    SHUTDOWN,
    TOKEN_EXPIRED_ENDING,
    TOKEN_REVOKED,
    TOO_MANY_SESSIONS,
    Ending,
    Refused,
)
from vncmux.relay import (
    BACKEND_READ_SIZE,
    CLIENT_BUFFER_SIZE,
    MAX_CLIENT_READ_SIZE,
    READ_BUDGET,
    Session,
    read_size_for,
    upload_read_size_for,
)
from vncmux.settings import Limits
from vncmux.tokens import TokenRecord

INSTANCE_PREFIX = "instance:"


class Supervisor(Service):
    """
    Knows every session of this process, from admission to its end: counts them against
    the limits, ends them on timeouts and revocations, and drains them at shutdown.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        observer: ISessionObserver,
        limits: Limits = Limits(),
        activity: IActivitySink | None = None,
        revocations: IRevocationFeed | None = None,
        shared_limits: Sequence[ISharedLimits] = (),
    ) -> None:
        self.clock = clock
        #: Limits counted beyond this process, checked after this process's own.
        self.shared_limits = tuple(shared_limits)
        self.observer = observer
        #: This process's count of sessions against C{limits}.
        self.places = PlaceCounter(limits, "process")
        #: Where the activity of sessions is written back (none: nowhere).
        self.activity = activity
        #: Where revocations are announced (none: sessions end only by their own limits).
        self.revocations = revocations
        self.sessions: dict[str, Session] = {}
        #: The sweep's idea of the time; the relay stamps it as activity, so a packet costs
        #: an attribute read instead of a clock call. Accurate to one sweep interval.
        self.now = clock.seconds()
        #: What every VNC server reads at once, from how many stream (L{read_size_for}),
        #: and the most an uploading browser does (L{upload_read_size_for}).
        self.read_size = BACKEND_READ_SIZE
        self.upload_read_size = MAX_CLIENT_READ_SIZE
        #: What this process's streaming sessions read in one reactor pass together: a
        #: worker of C{--workers N} takes an N-th, as the N share the machine's cores.
        self.read_budget = READ_BUDGET
        self._flushed_at = self.now
        self._next_flush = self.now + limits.flush_interval
        self._next_ping = self.now + limits.ping_interval
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock
        self._flushing: Deferred[None] | None = None
        self._drain_waiters: list[Deferred[None]] = []
        #: Activity of sessions that ended since the last flush, newest per token.
        self._ended_activity: dict[str, float] = {}
        self.connections = ConnectionTracker()
        self.pending = PendingConnections(limits.max_pending, limits.max_pending_per_client)

    @property
    def limits(self) -> Limits:
        """The limits and timeouts in force (the session counts' limits too)."""
        return self.places.limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self.places.limits = limits

    # -- admission -------------------------------------------------------------------------

    def reserve(self, record: TokenRecord, client_address: str) -> Reservation:
        """
        Count a session that is about to start against every limit, or raise L{Refused}
        (too many sessions). The returned L{Reservation} is the only way to give it back.
        """
        self.places.take(record.token_hash, record.token_id, record.max_sessions, client_address)
        return Reservation(self, record.token_hash, client_address)

    def take_place(self, record: TokenRecord, client_address: str) -> Deferred[Reservation]:
        """
        L{reserve}, then a place under every shared limit (the workers' parent, the fleet):
        fires with the L{Reservation}, or fails with L{Refused} with nothing left counted.
        """
        try:
            reservation = self.reserve(record, client_address)
        except Refused:
            return fail()
        if not self.shared_limits:
            return succeed(reservation)
        return reservation.claim_shared(iter(self.shared_limits), record)

    def _give_back(self, token_hash: str, client_address: str) -> None:
        self.places.give_back(token_hash, client_address)

    @property
    def reserved(self) -> int:
        """Sessions counted against the limits: relaying, or admitted and about to."""
        return self.places.reserved

    # -- the relay's registry ----------------------------------------------------------------

    def session_started(self, session: Session) -> None:
        self.sessions[session.id] = session
        if self.read_size != BACKEND_READ_SIZE:
            session.set_read_size(self.read_size)
        self.observer.session_opened(session)

    def session_ended(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        if self.activity is not None and session.last_activity_at >= self._flushed_at:
            token_hash = session.record.token_hash
            stamp = max(session.last_activity_at, self._ended_activity.get(token_hash, 0.0))
            self._ended_activity[token_hash] = stamp
        self.observer.session_closed(session, self.clock.seconds() - session.started_at)
        if not self.sessions and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    # -- what ends sessions from outside -------------------------------------------------------

    def sweep(self) -> None:
        """
        End every session past its idle timeout, lifetime or token expiry; drop clients
        that left a keepalive ping unanswered; send the next round of pings when due.
        """
        now = self.now = self.clock.seconds()
        limits = self.limits
        idle_before = now - limits.idle_timeout if limits.idle_timeout else None
        born_before = now - limits.max_session if limits.max_session else None
        ping_before = now - limits.ping_timeout if limits.ping_interval else None
        ping_round = bool(limits.ping_interval) and now >= self._next_ping
        if ping_round:
            self._next_ping = now + limits.ping_interval
        doomed: list[tuple[Session, Ending]] = []
        streaming = 0
        interactive = 0
        uploads: list[Session] = []
        for session in self.sessions.values():
            if session.input_since_sweep:
                session.input_since_sweep = False
                interactive += 1
            sent = session.bytes_to_client
            if sent - session.bytes_to_client_swept >= BACKEND_READ_SIZE:
                streaming += 1
            session.bytes_to_client_swept = sent
            received = session.bytes_to_backend
            if received - session.bytes_to_backend_swept >= CLIENT_BUFFER_SIZE:
                streaming += 1
                uploads.append(session)
            elif session.client_read_size > CLIENT_BUFFER_SIZE:
                session.set_client_read_size(CLIENT_BUFFER_SIZE)  # the upload is over
            session.bytes_to_backend_swept = received
            if idle_before is not None and session.last_activity_at <= idle_before:
                doomed.append((session, IDLE_TIMEOUT))
            elif born_before is not None and session.started_at <= born_before:
                doomed.append((session, LIFETIME_REACHED))
            elif limits.enforce_expiry and session.record.expired(now):
                doomed.append((session, TOKEN_EXPIRED_ENDING))
            elif ping_before is not None and session.ping_sent_at is not None:
                if session.ping_sent_at <= ping_before:
                    doomed.append((session, CLIENT_UNRESPONSIVE))
            elif ping_round:
                session.ping_sent_at = now
                session.client.ping()
        for session, ending in doomed:
            if ending is CLIENT_UNRESPONSIVE:
                session.client.drop()
            session.end(ending)
        # The budget keeps a pass short for the echoes of someone's input: without input
        # since the last sweep, nobody waits, and the streams read as much as they can.
        budgeted = streaming if interactive else 0
        read_size = read_size_for(budgeted, self.read_budget)
        if read_size != self.read_size:
            self.read_size = read_size
            for session in self.sessions.values():
                session.set_read_size(read_size)
        self.upload_read_size = upload_read_size_for(budgeted, self.read_budget)
        for session in uploads:
            if session.client_read_size > self.upload_read_size:
                session.set_client_read_size(self.upload_read_size)
        if now >= self._next_flush:
            self.flush_activity()

    def flush_activity(self) -> Deferred[None]:
        """
        Write the newest ``last_activity_at`` of every token that saw input since the last
        flush, in one round trip for the whole process.
        """
        self._next_flush = self.now + self.limits.flush_interval
        if self.activity is None or self._flushing is not None:
            return succeed(None)
        since, self._flushed_at = self._flushed_at, self.now
        updates, self._ended_activity = self._ended_activity, {}
        for session in self.sessions.values():
            stamp = session.last_activity_at
            # Input is stamped with the sweep's time, so input that arrived after the last
            # flush (made in the same sweep) carries exactly C{since}: include it.
            if stamp >= since and stamp > updates.get(session.record.token_hash, 0.0):
                updates[session.record.token_hash] = stamp
        if not updates:
            return succeed(None)
        flushing = self._flushing = self.activity.record_activity(updates)

        def done(result: object) -> None:
            self._flushing = None
            if isinstance(result, Failure):
                self._flushed_at = min(self._flushed_at, since)
                for token_hash, stamp in updates.items():
                    if stamp > self._ended_activity.get(token_hash, 0.0):
                        self._ended_activity[token_hash] = stamp
                self._log.warn(
                    "could not write activity of {n} tokens back: {error}",
                    n=len(updates),
                    error=result.getErrorMessage(),
                )

        return flushing.addBoth(done)

    def revoked(self, message: str) -> int:
        """
        Handle one message of the revocation channel: a token hash, or ``instance:<uuid>``.
        Ends the matching sessions with 4002; returns how many.
        """
        if message.startswith(INSTANCE_PREFIX):
            uuid = message[len(INSTANCE_PREFIX) :]
            matches = [s for s in self.sessions.values() if s.record.instance_uuid == uuid]
        else:
            matches = [s for s in self.sessions.values() if s.record.token_hash == message]
        for session in matches:
            session.end(TOKEN_REVOKED)
        return len(matches)

    def recheck(self) -> Deferred[None]:
        """
        After the revocation channel was re-established (messages sent meanwhile are lost):
        end the sessions whose token records are gone from the store.
        """
        assert self.revocations is not None
        checks = []
        for token_hash in {s.record.token_hash for s in self.sessions.values()}:
            looking = self.revocations.lookup_hash(token_hash)
            looking.addCallback(self._revoke_if_gone, token_hash)
            checks.append(looking)

        def failed(failure: Failure) -> None:
            first = failure.value
            assert isinstance(first, FirstError)  # how gatherResults fails
            self._log.warn(
                "could not re-check live sessions: {error}",
                error=first.subFailure.getErrorMessage(),
            )

        return gatherResults(checks, consumeErrors=True).addCallbacks(lambda _: None, failed)

    def _revoke_if_gone(self, record: TokenRecord | None, token_hash: str) -> None:
        if record is None:
            self.revoked(token_hash)

    def end(self, session_id: str, ending: Ending) -> bool:
        """End one session by id (the admin API); False when there is no such session."""
        session = self.sessions.get(session_id)
        return session is not None and session.end(ending)

    def end_all(self, ending: Ending) -> int:
        """End every live session with C{ending}; returns how many there were."""
        live = list(self.sessions.values())
        for session in live:
            session.end(ending)
        return len(live)

    def drain(self, grace: float, close_timeout: float) -> Deferred[None]:
        """
        Let live sessions run for up to C{grace} seconds, then end the rest with 1001 and
        wait (at most C{close_timeout}) until every connection has flushed and closed, so
        no byte already read from either side is lost.
        """
        empty: Deferred[None] = Deferred()
        if self.sessions:
            self._drain_waiters.append(empty)
        else:
            empty.callback(None)
        empty.addTimeout(grace, self.clock)

        def cut(_: object) -> Deferred[None]:
            ended = self.end_all(SHUTDOWN)
            if ended:
                self._log.info("drain: ended {n} sessions after {grace}s", n=ended, grace=grace)
            closing = self.connections.all_closed()
            closing.addTimeout(close_timeout, self.clock)
            return closing.addErrback(lambda f: f.trap(TimeoutError))

        return empty.addBoth(cut)

    # -- service -------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self._sweeper.start(self.limits.sweep_interval, now=False)
        if self.revocations is not None:
            self.revocations.watch_revocations(self.revoked, self.recheck)

    def stopService(self) -> Deferred[None]:
        """Stop sweeping, then write the last activity back (after a flush in flight)."""
        super().stopService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        if self._sweeper.running:
            self._sweeper.stop()
        self.now = self.clock.seconds()
        if self._flushing is not None:
            return self._flushing.addCallback(lambda _: self.flush_activity())
        return self.flush_activity()


class PlaceCounter:
    """
    Sessions counted against C{--max-sessions}, per token (C{--max-sessions-per-token} or
    the record's C{max_sessions}) and per client address: one process's (the supervisor's),
    or every worker's (the parent of C{--workers}). C{scope} names it in refusals.
    """

    __slots__ = ("limits", "scope", "reserved", "_per_token", "_per_client")

    def __init__(self, limits: Limits, scope: str) -> None:
        self.limits = limits
        self.scope = scope
        self.reserved = 0
        self._per_token: Counter[str] = Counter()
        self._per_client: Counter[str] = Counter()

    def take(
        self, token_hash: str, token_id: str, record_limit: int | None, client_address: str
    ) -> None:
        """Count one more session, or raise L{Refused} (too many sessions) counting nothing."""
        limits = self.limits
        per_token = record_limit or limits.max_sessions_per_token
        if limits.max_sessions and self.reserved >= limits.max_sessions:
            raise Refused(TOO_MANY_SESSIONS, f"{self.scope} limit of {limits.max_sessions} reached")
        if per_token and self._per_token[token_hash] >= per_token:
            raise Refused(TOO_MANY_SESSIONS, f"token {token_id} limit of {per_token} reached")
        per_client = limits.max_sessions_per_client
        if per_client and self._per_client[client_address] >= per_client:
            raise Refused(
                TOO_MANY_SESSIONS, f"client {client_address} limit of {per_client} reached"
            )
        self.reserved += 1
        self._per_token[token_hash] += 1
        self._per_client[client_address] += 1

    def give_back(self, token_hash: str, client_address: str) -> None:
        """Uncount one session that L{take} counted."""
        self.reserved -= 1
        _decrement(self._per_token, token_hash)
        _decrement(self._per_client, client_address)


class Reservation:
    """
    One session's place under the limits, from admission to the end of the session.

    Whoever holds it gives it back with L{release}, which is safe to call more than once:
    every path that abandons a session (failed dial, failed upgrade, client gone, session
    ended) just calls it, and the counters come back exactly once, the shared ones too
    (a shared place granted after the release is given back as it arrives).
    """

    __slots__ = ("_supervisor", "_token_hash", "_client_address", "_shared")

    def __init__(self, supervisor: Supervisor, token_hash: str, client_address: str) -> None:
        self._supervisor: Supervisor | None = supervisor
        self._token_hash = token_hash
        self._client_address = client_address
        #: How to give back each place taken under a shared limit.
        self._shared: list[Callable[[], None]] = []

    @property
    def held(self) -> bool:
        """Whether this reservation still counts against the limits."""
        return self._supervisor is not None

    def claim_shared(
        self, limits: Iterator[ISharedLimits], record: TokenRecord
    ) -> Deferred[Reservation]:
        """
        Take a place under each of C{limits} in turn. Cancelling the result releases the
        reservation; a limiter's answer is never cancelled, but given back when it comes.
        """
        result: Deferred[Reservation] = Deferred(lambda _: self.release())
        self._claim_next(limits, record, result)
        return result

    def _claim_next(
        self, limits: Iterator[ISharedLimits], record: TokenRecord, result: Deferred[Reservation]
    ) -> None:
        limit = next(limits, None)
        if limit is None:
            result.callback(self)
            return

        def granted(give_back: Callable[[], None]) -> None:
            if not self.held:
                give_back()
                return
            self._shared.append(give_back)
            self._claim_next(limits, record, result)

        def refused(failure: Failure) -> None:
            self.release()
            if not result.called:
                result.errback(failure)

        limit.claim(record, self._client_address).addCallbacks(granted, refused)

    def release(self) -> None:
        """Give the place back (once; later calls do nothing)."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor._give_back(self._token_hash, self._client_address)
            shared, self._shared = self._shared, []
            for give_back in shared:
                give_back()


class PendingConnections:
    """
    Connections that hold resources without being sessions yet: reading the upgrade request,
    waiting for the token store or the VNC server, or showing a refusal. A client that opens
    many of them and never finishes can hold no more than its share (C{--max-pending},
    C{--max-pending-per-client}; 0 turns a cap off).
    """

    __slots__ = ("max_total", "max_per_client", "total", "_per_client")

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self._per_client: Counter[str] = Counter()

    def take(self, client_address: str, limit_client: bool = True) -> PendingSlot | None:
        """
        A slot for a new connection from C{client_address}, or None when over a cap. A
        trusted proxy's connections (C{limit_client} false) are held to the per-client cap
        only once the request names the client behind it (L{PendingSlot.move_to}).
        """
        if self.max_total and self.total >= self.max_total:
            return None
        if limit_client and not self._fits(client_address):
            return None
        self.total += 1
        self._per_client[client_address] += 1
        return PendingSlot(self, client_address)

    def _fits(self, client_address: str) -> bool:
        return not self.max_per_client or self._per_client[client_address] < self.max_per_client

    def _move(self, old: str, new: str) -> bool:
        if old == new:
            return True
        if not self._fits(new):
            return False
        _decrement(self._per_client, old)
        self._per_client[new] += 1
        return True

    def _give_back(self, client_address: str) -> None:
        self.total -= 1
        _decrement(self._per_client, client_address)


class PendingSlot:
    """One pending connection's place; L{release} is idempotent like L{Reservation}'s."""

    __slots__ = ("_pending", "client_address")

    def __init__(self, pending: PendingConnections, client_address: str) -> None:
        self._pending: PendingConnections | None = pending
        self.client_address = client_address

    def move_to(self, client_address: str) -> bool:
        """
        Count this connection under another client address (the one a trusted proxy named
        in X-Forwarded-For); False, and nothing changed, when that address is over its cap.
        """
        pending = self._pending
        if pending is None or not pending._move(self.client_address, client_address):
            return pending is None
        self.client_address = client_address
        return True

    def release(self) -> None:
        """Give the place back (once; later calls do nothing)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending._give_back(self.client_address)


class ConnectionTracker:
    """Counts open sockets (both sides) so that shutdown can wait for the last to close."""

    __slots__ = ("count", "_waiters")

    def __init__(self) -> None:
        self.count = 0
        self._waiters: list[Deferred[None]] = []

    def opened(self) -> None:
        self.count += 1

    def closed(self) -> None:
        self.count -= 1
        if self.count == 0:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def all_closed(self) -> Deferred[None]:
        """Fire when no connection is open (at once when none is)."""
        if self.count == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter


def _decrement(counter: Counter[str], key: str) -> None:
    if counter[key] <= 1:
        del counter[key]
    else:
        counter[key] -= 1
