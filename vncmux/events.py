"""Session events: fan-out to several observers, and the structured log of every session."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from twisted.logger import Logger
from zope.interface import implementer

from vncmux.interfaces import ISessionObserver
from vncmux.refusals import Refusal

if TYPE_CHECKING:
    from vncmux.relay import Session


@implementer(ISessionObserver)
class Observers:
    """Tells every observer in turn; one observer's bug does not silence the others."""

    _log = Logger()

    def __init__(self, observers: Iterable[ISessionObserver] = ()) -> None:
        self._observers = list(observers)

    def add(self, observer: ISessionObserver) -> None:
        """Listen to every later event."""
        self._observers.append(observer)

    def _each(self, method: str, *args: object) -> None:
        for observer in self._observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                self._log.failure("session observer {observer!r} failed", observer=observer)

    def session_rejected(
        self,
        session_id: str,
        client_address: str,
        refusal: Refusal,
        detail: str,
        token_id: str | None,
    ) -> None:
        self._each("session_rejected", session_id, client_address, refusal, detail, token_id)

    def session_opened(self, session: Session) -> None:
        self._each("session_opened", session)

    def session_closed(self, session: Session, duration: float) -> None:
        self._each("session_closed", session, duration)

    def stage_timed(self, stage: str, seconds: float) -> None:
        self._each("stage_timed", stage, seconds)


_session_log = Logger(namespace="vncmux.session")


def _security_of(session: Session) -> str:
    """What the security proxy negotiated with the VNC server, or that RFB passed through."""
    negotiation = getattr(session.backend, "security", None)
    if negotiation is None:
        return "relayed"
    return f"{negotiation.negotiated} to the VNC server, None to the browser"


@implementer(ISessionObserver)
class SessionLog:
    """
    One log event per refusal, session start and session end, with fields a log pipeline
    can index (``vncmux_event``, ``session_id``, ``token_id``, …). Never the token.
    """

    def session_rejected(
        self,
        session_id: str,
        client_address: str,
        refusal: Refusal,
        detail: str,
        token_id: str | None,
    ) -> None:
        _session_log.info(
            "session {session_id} from {client_address} refused ({close_code} {close_reason}):"
            " {detail}",
            vncmux_event="session_rejected",
            session_id=session_id,
            client_address=client_address,
            token_id=token_id,
            close_code=refusal.code,
            close_reason=refusal.reason,
            detail=detail,
        )

    def session_opened(self, session: Session) -> None:
        record = session.record
        _session_log.info(
            "session {session_id} from {client_address} opened to {backend}"
            " ({console_type} console, token {token_id}, security {security})",
            vncmux_event="session_opened",
            console_type=record.console_type,
            session_id=session.id,
            client_address=session.client_address,
            backend=record.target,
            token_id=record.token_id,
            instance_uuid=record.instance_uuid,
            security=_security_of(session),
        )

    def session_closed(self, session: Session, duration: float) -> None:
        record = session.record
        ending = session.ending
        _session_log.info(
            "session {session_id} ({console_type} console) closed after {duration:.1f}s:"
            " {close_reason} ({bytes_to_backend} bytes in, {bytes_to_client} bytes out)",
            vncmux_event="session_closed",
            console_type=record.console_type,
            session_id=session.id,
            client_address=session.client_address,
            backend=record.target,
            token_id=record.token_id,
            instance_uuid=record.instance_uuid,
            duration=duration,
            bytes_to_backend=session.bytes_to_backend,
            bytes_to_client=session.bytes_to_client,
            close_code=ending.code if ending else None,
            close_reason=ending.reason if ending else None,
            outcome=ending.label if ending else None,
        )

    def stage_timed(self, stage: str, seconds: float) -> None:
        """Timings go to metrics, not to the log."""
