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

    The text of each line is made here, once, by an f-string, and logged as C{{text}}:
    Twisted's formatter would parse a format string of a dozen fields for every observer
    (and a worker's line again in the parent), some 50 us a line, two lines a session.
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
            "{text}",
            text=f"session {session_id} from {client_address} refused"
            f" ({refusal.code} {refusal.reason}): {detail}",
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
        security = _security_of(session)
        _session_log.info(
            "{text}",
            text=f"session {session.id} from {session.client_address} opened to"
            f" {record.target} ({record.console_type} console, token {record.token_id},"
            f" security {security})",
            vncmux_event="session_opened",
            console_type=record.console_type,
            session_id=session.id,
            client_address=session.client_address,
            backend=record.target,
            token_id=record.token_id,
            instance_uuid=record.instance_uuid,
            security=security,
        )

    def session_closed(self, session: Session, duration: float) -> None:
        record = session.record
        ending = session.ending
        _session_log.info(
            "{text}",
            text=f"session {session.id} ({record.console_type} console) closed after"
            f" {duration:.1f}s: {ending.reason if ending else None}"
            f" ({session.bytes_to_backend} bytes in, {session.bytes_to_client} bytes out)",
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
