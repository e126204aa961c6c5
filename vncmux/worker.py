"""
One worker of ``twistd vncmux --workers N``, started by the parent (L{vncmux.workers}) as::

    python -m vncmux.worker INDEX novnc=FD:FAMILY [serial=FD:FAMILY ...] -- OPTIONS...

OPTIONS are the parent's own, parsed by the same L{vncmux.tap.Options}; the worker then runs
today's single process (L{vncmux.tap.build_proxy}) on the listening sockets it inherited,
with its control channel to the parent on descriptor 3. It logs JSON events on its standard
output, which the parent republishes tagged with the worker's index. SIGTERM drains it like
a single process; so does the loss of its parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.admin import LocalSessions
from vncmux.interfaces import ISessionDirectory, ISharedLimits
from vncmux.metrics import Metrics, new_registry
from vncmux.refusals import TOO_MANY_SESSIONS, Refused
from vncmux.workers import (
    CONTROL_FD,
    Claim,
    Collect,
    EndSession,
    GetSession,
    GiveBack,
    Listening,
    ListSessions,
    OneProtocol,
    PlaceRefused,
    Revoke,
    TypedAMP,
    families_json,
)

if TYPE_CHECKING:
    from vncmux.service import ProxyService
    from vncmux.tokens import TokenRecord

_log = Logger()


def parse_listeners(specs: Sequence[str]) -> dict[str, tuple[int, int]]:
    """C{TYPE=FD:FAMILY} arguments as C{{console_type: (fd, family)}}."""
    listeners = {}
    for spec in specs:
        console_type, _, where = spec.partition("=")
        fd, _, family = where.partition(":")
        listeners[console_type] = (int(fd), int(family))
    return listeners


def _die_with_parent() -> None:
    """Linux: SIGTERM when the parent dies (PR_SET_PDEATHSIG), so a worker never outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)


def main(argv: Sequence[str]) -> int:
    """Run one worker until SIGTERM or the end of its control channel."""
    from twisted.internet import reactor as global_reactor

    from vncmux.tap import (
        Options,
        build_proxy,
        freeze_startup_objects,
        raise_open_files_limit,
        tune_allocator,
    )

    reactor: Any = global_reactor
    _die_with_parent()
    split = list(argv).index("--")
    index, listener_specs, arguments = int(argv[0]), argv[1:split], list(argv[split + 1 :])
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)], redirectStandardIO=False)
    config = Options()
    try:
        config.parseOptions(arguments)
    except usage.UsageError as e:
        _log.critical("worker {index}: {error}", index=index, error=str(e))
        return 2
    raise_open_files_limit(config["max-sessions"])  # the parent said it if it is too low
    tune_allocator()
    link = WorkerLink(index, parse_listeners(listener_specs))
    service = build_proxy(config, reactor, link)
    control = socket.socket(fileno=CONTROL_FD)
    control.setblocking(False)
    reactor.adoptStreamConnection(control.fileno(), socket.AF_UNIX, OneProtocol(link))
    control.close()
    stop = StopOnce(reactor)
    link.parent_gone = stop
    service.privilegedStartService()  # type: ignore[no-untyped-call]  # python/mypy#16651
    service.startService()  # type: ignore[no-untyped-call]  # python/mypy#16651
    link.tell_listening()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(signal.signal, signal.SIGTERM, stop.on_signal)
    freeze_startup_objects()
    reactor.run()
    return 0


class StopOnce:
    """
    Stop the worker's reactor (so the proxy drains) once, whatever asks first: SIGTERM from
    the parent, SIGTERM from systemd to every process of the unit (often both), or the end
    of the control channel. The reactor's own handler would try to stop it again, and log
    an error, on the second signal.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stopping = False

    def __call__(self) -> None:
        if not self._stopping and self._reactor.running:
            self._stopping = True
            _log.info("draining", vncmux_event="worker_draining")
            self._reactor.stop()

    def on_signal(self, number: int, frame: object) -> None:
        self._reactor.callFromThread(self)


@implementer(ISharedLimits)
class WorkerLink(TypedAMP):
    """
    A worker's end of the control channel: its sessions take their places with the parent
    (L{ISharedLimits}), and the parent's questions are answered from its supervisor and
    metrics (attached by L{vncmux.tap.build_proxy}).
    """

    def __init__(self, index: int, listeners: Mapping[str, tuple[int, int]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self.index = index
        self._listeners = dict(listeners)
        self._service: ProxyService | None = None
        self._registry: CollectorRegistry | None = None
        self._sessions: ISessionDirectory | None = None
        self._lost = False
        #: Called when the parent is gone (the worker stops then).
        self.parent_gone: Callable[[], object] = lambda: None

    def attach(self, service: ProxyService, metrics: Metrics) -> None:
        """Serve the parent's sockets, count under its limits, answer from C{service}."""
        self._service = service
        supervisor = service.console.supervisor
        # The parent first: it answers over a local socket, and its refusal saves a fleet's
        # round trip to Redis when a fleet limit is also in force.
        supervisor.shared_limits = (self, *supervisor.shared_limits)
        for console_type, listener in service.listeners.items():
            fd, family = self._listeners[console_type]
            listener.adopt(fd, family)
        self.serve(LocalSessions(supervisor), metrics)

    def serve(self, sessions: ISessionDirectory, metrics: Metrics) -> None:
        """Answer the parent's questions from C{sessions} and C{metrics}."""
        self._sessions = sessions
        self._registry = new_registry(metrics)

    def tell_listening(self) -> Deferred[None]:
        """Once every listener accepts, say so to the parent."""
        assert self._service is not None
        up = [listener.listening() for listener in self._service.listeners.values()]
        listening: Deferred[list[IListeningPort]] = gatherResults(up)
        return listening.addCallback(lambda _: self.call(Listening)).addCallback(lambda _: None)

    # ISharedLimits

    def claim(self, record: TokenRecord, client_address: str) -> Deferred[Callable[[], None]]:
        if self._lost:
            return fail(Refused(TOO_MANY_SESSIONS, "the parent is gone: this worker stops"))
        asking = self.call(
            Claim,
            token_hash=record.token_hash,
            token_id=record.token_id,
            record_limit=record.max_sessions,
            client=client_address,
        )

        def granted(answer: dict[str, int]) -> Callable[[], None]:
            place = answer["place"]
            return lambda: self._give_back(place)

        def refused(failure: Failure) -> Failure:
            if failure.check(PlaceRefused):
                raise Refused(TOO_MANY_SESSIONS, str(failure.value))
            return failure

        return asking.addCallbacks(granted, refused)

    def _give_back(self, place: int) -> None:
        if not self._lost:
            self.call(GiveBack, place=place)

    # the parent's questions

    @Collect.responder
    def collect(self) -> dict[str, Any]:
        assert self._registry is not None
        return {"families": families_json(self._registry.collect())}

    @ListSessions.responder
    def list_sessions(self) -> Deferred[dict[str, Any]]:
        assert self._sessions is not None
        return self._sessions.list_sessions().addCallback(lambda s: {"sessions": s})

    @GetSession.responder
    def get_session(self, session_id: str) -> Deferred[dict[str, Any]]:
        assert self._sessions is not None
        getting = self._sessions.get_session(session_id)
        return getting.addCallback(lambda s: {"session": s})

    @EndSession.responder
    def end_session(self, session_id: str) -> Deferred[dict[str, Any]]:
        assert self._sessions is not None
        return self._sessions.end_session(session_id).addCallback(lambda e: {"ended": e})

    @Revoke.responder
    def revoke(self, message: str) -> Deferred[dict[str, Any]]:
        assert self._sessions is not None
        return self._sessions.revoked(message).addCallback(lambda n: {"ended": n})

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # python/mypy#16653
        self.parent_gone()


__all__ = ["StopOnce", "WorkerLink", "main", "parse_listeners"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
