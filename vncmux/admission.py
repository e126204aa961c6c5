"""Admission: from a raw token to a checked record and a greeted backend connection.

Nothing is dialed before the token is known, unexpired and within its limits, and the client
never chooses a host or port: the target comes from the token store only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from vncmux.attempts import ClientBlocked, IFailedAttempts
from vncmux.backend import BackendDialer, BackendProtocol
from vncmux.backendpolicy import BackendPolicy
from vncmux.interfaces import ISessionObserver, ISingleUse, ITokenStore
from vncmux.refusals import (
    INVALID_TOKEN,
    STORE_UNAVAILABLE,
    TOKEN_EXPIRED,
    TOKEN_USED,
    TOO_MANY_FAILED,
    Refused,
)
from vncmux.supervisor import Reservation
from vncmux.tokens import TokenRecord, TokenStoreUnavailable

_Result = TypeVar("_Result")


class Places(Protocol):
    """Where a session takes its place under the limits: the supervisor, or a listener
    whose sessions are several connections (L{vncmux.spice.SpiceSessions})."""

    def take_place(self, record: TokenRecord, client_address: str) -> Deferred[Reservation]: ...


@dataclass(frozen=True, slots=True)
class Admission:
    """A session that may start: its record, its greeted (paused) VNC connection, and its
    place under the limits, which the holder gives back when the session ends."""

    record: TokenRecord
    backend: BackendProtocol
    reservation: Reservation


class Gate:
    """
    Looks a token up (bounded by a timeout) unless its client failed too often (the limiter
    guards the lookup: one round trip with Redis), checks the record (its expiry, and that
    it is a console of the type this listener serves) and its target, then dials its
    console. C{attempts} looks tokens up in its own store (L{vncmux.attempts.attempts_for}
    gives it C{store}); C{store} itself is asked only to use up single-use tokens.
    """

    def __init__(
        self,
        store: ITokenStore,
        dialer: BackendDialer,
        supervisor: Places,
        clock: IReactorTime,
        observer: ISessionObserver,
        store_timeout: float,
        policy: BackendPolicy,
        attempts: IFailedAttempts,
        console_type: str = "novnc",
    ) -> None:
        self.console_type = console_type
        self._policy = policy
        self._attempts = attempts
        self._claims = ISingleUse(store, None)
        self._dialer = dialer
        self._supervisor = supervisor
        self._clock = clock
        self._observer = observer
        self.store_timeout = store_timeout

    def admit(self, token: str, client_address: str) -> Deferred[Admission]:
        """
        Fire with an L{Admission}, or fail with L{Refused}. A failed or cancelled admission
        has given its reservation back and closed its dial; cancelling abandons the lookup.
        """
        started = self._clock.seconds()
        looking = self._attempts.lookup_unless_blocked(client_address, token)
        looking.addTimeout(self.store_timeout, self._clock)
        checked = looking.addCallbacks(self._check_record, self._store_failed)
        checked.addBoth(self._timed, "token_lookup", started)
        checked.addErrback(self._blocked, client_address)
        checked.addErrback(self._count_failure, client_address)
        checked.addCallback(self._check_console_type)
        return checked.addCallback(self._reserve_and_dial, client_address)

    @staticmethod
    def _blocked(failure: Failure, client_address: str) -> Failure:
        """A client cooling down is refused without a lookup (and not timed as one)."""
        if failure.check(ClientBlocked):
            raise Refused(TOO_MANY_FAILED, f"client {client_address} failed too many tokens")
        return failure

    def _count_failure(self, failure: Failure, client_address: str) -> Failure:
        """An unknown token counts against its client (expired ones were real tokens)."""
        if isinstance(failure.value, Refused) and failure.value.refusal is INVALID_TOKEN:
            self._attempts.failed(client_address)
        return failure

    def _timed(self, result: _Result, stage: str, started: float) -> _Result:
        if not isinstance(result, Failure) or isinstance(result.value, Refused):
            self._observer.stage_timed(stage, self._clock.seconds() - started)
        return result

    def _check_record(self, record: TokenRecord | None) -> TokenRecord:
        if record is None:
            raise Refused(INVALID_TOKEN, "unknown token")
        if record.expired(self._clock.seconds()):
            raise Refused(TOKEN_EXPIRED, f"token expired at {record.expires_at}", record.token_id)
        return record

    def _check_console_type(self, record: TokenRecord) -> TokenRecord:
        """
        A token of another console type is refused as invalid, as nova does (the user is
        not told that the token exists); the operator's log says which type it was. It is a
        real token, not a guess: it does not count against its client.
        """
        if record.console_type != self.console_type:
            raise Refused(
                INVALID_TOKEN,
                f"token of console type {record.console_type!r} on the"
                f" {self.console_type!r} listener",
                record.token_id,
            )
        return record

    def _store_failed(self, failure: Failure) -> Failure:
        if failure.check(TimeoutError):
            raise Refused(STORE_UNAVAILABLE, f"no answer within {self.store_timeout:g}s")
        if failure.check(TokenStoreUnavailable):
            raise Refused(STORE_UNAVAILABLE, failure.getErrorMessage())
        return failure

    def _reserve_and_dial(self, record: TokenRecord, client_address: str) -> Deferred[Admission]:
        """Resolve and check the target (once: the address checked is the one dialled),
        then take a place under the limits and dial."""
        checking = self._policy.address_for(record.host, record.port)
        dialing = checking.addCallback(self._dial, record, client_address)

        def named(failure: Failure) -> Failure:
            if isinstance(failure.value, Refused):
                failure.value.token_id = record.token_id
            return failure

        return dialing.addErrback(named)

    def _dial(self, address: str, record: TokenRecord, client_address: str) -> Deferred[Admission]:
        placing = self._supervisor.take_place(record, client_address)
        return placing.addCallback(self._dial_in_place, address, record)

    def _dial_in_place(
        self, reservation: Reservation, address: str, record: TokenRecord
    ) -> Deferred[Admission]:
        started = self._clock.seconds()
        dialing = self._dialer.dial(address, record.port, record)
        dialing.addBoth(self._timed, "backend_connect", started)
        if record.single_use:
            dialing.addCallback(self._claim, record)

        def give_back(failure: Failure) -> Failure:
            reservation.release()
            return failure

        dialing.addErrback(give_back)
        return dialing.addCallback(lambda backend: Admission(record, backend, reservation))

    def _claim(self, backend: BackendProtocol, record: TokenRecord) -> Deferred[BackendProtocol]:
        """Use up a single-use token only once its console answered (failures don't count)."""
        if self._claims is None:
            backend.close()
            raise Refused(TOKEN_USED, "token store cannot enforce single use")
        claiming = self._claims.claim_use(record.token_hash)
        claiming.addTimeout(self.store_timeout, self._clock)

        def claimed(first: bool) -> BackendProtocol:
            if not first:
                raise Refused(TOKEN_USED, f"single-use token {record.token_id} used before")
            return backend

        def failed(failure: Failure) -> Failure:
            backend.close()
            if failure.check(Refused):
                return failure
            raise Refused(STORE_UNAVAILABLE, f"could not claim single use: {failure.value}")

        return claiming.addCallback(claimed).addErrback(failed)
