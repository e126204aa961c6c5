"""The table of live sessions and what ends them from outside the relay."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime

from vncmux.interfaces import ISessionObserver
from vncmux.refusals import Ending
from vncmux.relay import Session


class Supervisor(Service):
    """Knows every relaying session of this process, so it can list, end and drain them."""

    def __init__(self, clock: IReactorTime, observer: ISessionObserver) -> None:
        self.clock = clock
        self.observer = observer
        self.sessions: dict[str, Session] = {}

    def session_started(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.observer.session_opened(session)

    def session_ended(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.observer.session_closed(session, self.clock.seconds() - session.started_at)

    def end_all(self, ending: Ending) -> int:
        """End every live session with C{ending}; returns how many there were."""
        live = list(self.sessions.values())
        for session in live:
            session.end(ending)
        return len(live)
