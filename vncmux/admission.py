"""Admission: from a raw token to a checked record and a greeted backend connection.

Nothing is dialed before the token is known, unexpired and within its limits, and the client
never chooses a host or port: the target comes from the token store only.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from vncmux.backend import BackendDialer, BackendProtocol
from vncmux.interfaces import ISessionObserver, ITokenStore
from vncmux.refusals import INVALID_TOKEN, STORE_UNAVAILABLE, TOKEN_EXPIRED, Refused
from vncmux.tokens import TokenRecord, TokenStoreUnavailable


class Gate:
    """Looks a token up (bounded by a timeout), checks it, then dials its VNC server."""

    def __init__(
        self,
        store: ITokenStore,
        dialer: BackendDialer,
        clock: IReactorTime,
        observer: ISessionObserver,
        store_timeout: float,
    ) -> None:
        self._store = store
        self._dialer = dialer
        self._clock = clock
        self._observer = observer
        self.store_timeout = store_timeout

    def admit(self, token: str) -> Deferred[tuple[TokenRecord, BackendProtocol]]:
        """
        Fire with the token's record and a paused, greeted backend connection, or fail with
        L{Refused}. Cancelling the Deferred abandons the lookup or closes the dial.
        """
        started = self._clock.seconds()
        looking = self._store.lookup(token)
        looking.addTimeout(self.store_timeout, self._clock)
        looking.addCallbacks(self._check_record, self._store_failed)
        looking.addBoth(self._timed, "token_lookup", started)
        looking.addCallback(self._dial)
        return looking

    def _timed(self, result: object, stage: str, started: float) -> object:
        if not isinstance(result, Failure) or result.check(Refused):
            self._observer.stage_timed(stage, self._clock.seconds() - started)
        return result

    def _check_record(self, record: TokenRecord | None) -> TokenRecord:
        if record is None:
            raise Refused(INVALID_TOKEN, "unknown token")
        if record.expired(self._clock.seconds()):
            raise Refused(TOKEN_EXPIRED, f"token {record.token_id} expired at {record.expires_at}")
        return record

    def _store_failed(self, failure: Failure) -> Failure:
        if failure.check(TimeoutError):
            raise Refused(STORE_UNAVAILABLE, f"no answer within {self.store_timeout:g}s")
        if failure.check(TokenStoreUnavailable):
            raise Refused(STORE_UNAVAILABLE, failure.getErrorMessage())
        return failure

    def _dial(self, record: TokenRecord) -> Deferred[tuple[TokenRecord, BackendProtocol]]:
        started = self._clock.seconds()
        dialing = self._dialer.dial(record.host, record.port)
        dialing.addBoth(self._timed, "backend_connect", started)
        return dialing.addCallback(lambda backend: (record, backend))
