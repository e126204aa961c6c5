"""``/healthz`` and ``/readyz``, and the JSON answers they share with the admin API.

Liveness says the reactor answers. Readiness says this process can start a console now: the
console listener is listening, the session limit is not reached, and the token store answered
a real round trip in time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from vncmux.interfaces import ITokenStore
from vncmux.tokens import TokenStoreUnavailable

if TYPE_CHECKING:
    from vncmux.settings import Limits

#: Seconds the token store has to answer a readiness round trip.
READINESS_DEADLINE = 1.0

_log = Logger(namespace="vncmux.http")
T = TypeVar("T")


def write_json(request: Request, status: int, body: object) -> bytes:
    """Set the status and JSON headers of C{request}; return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode("utf-8") + b"\n"


def answer_later(request: Request, answer: Deferred[tuple[int, object]]) -> int:
    """
    Finish C{request} with the C{(status, body)} that C{answer} fires with (a failure is a
    logged 500); a client that went away meanwhile is not written to.

    @return: C{NOT_DONE_YET}, for C{render_*} to return.
    """
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)

    def failed(failure: Failure) -> tuple[int, object]:
        _log.failure("{method} {path} failed", failure, method=request.method, path=_path(request))
        return 500, {"error": "internal error"}

    def finish(result: tuple[int, object]) -> None:
        if gone:
            return
        status, body = result
        request.write(write_json(request, status, body))
        request.finish()

    answer.addErrback(failed).addCallback(finish)
    return NOT_DONE_YET


def within(d: Deferred[T], seconds: float, clock: IReactorTime) -> Deferred[T]:
    """
    A Deferred with the result of C{d}, or failing with L{TimeoutError} after C{seconds}.

    Unlike C{addTimeout}, C{d} is not cancelled: the store finishes (and logs) its own call,
    and a late result is dropped.
    """
    result: Deferred[T] = Deferred()

    def late() -> None:
        result.errback(TimeoutError(f"no answer within {seconds:g}s"))

    timer = clock.callLater(seconds, late)

    def answered(outcome: T | Failure) -> None:
        if timer.active():
            timer.cancel()
            result.callback(outcome)  # a Failure outcome errbacks

    d.addBoth(answered)
    return result


def _path(request: Request) -> str:
    """The request path without anything after the first path segment (may hold a token)."""
    path = request.path.decode("latin-1")
    return "/" + path.lstrip("/").split("/", 1)[0]


class CountedSessions(Protocol):
    """What readiness reads of a session count: the supervisor's (this process), or the
    parent's of C{--workers} (every worker's)."""

    @property
    def limits(self) -> Limits: ...

    @property
    def reserved(self) -> int: ...


class Liveness(Resource):
    """``GET /healthz``: 200 whenever the reactor runs this code at all."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """Always alive."""
        return write_json(request, 200, {"alive": True})


class Readiness(Resource):
    """
    ``GET /readyz``: 200 when the console listener is up, the process is below its
    ``--max-sessions`` (a load balancer should send new consoles elsewhere rather than to
    a certain 4429), and the token store answered C{ping()} within C{deadline} seconds of
    C{clock}; otherwise 503 with a JSON reason. Changes are logged once.

    A failed round trip is not a token store error in the metrics: that count would then
    depend on how often probers probe. Token lookups refused with 4503 are counted instead.
    """

    isLeaf = True
    deadline = READINESS_DEADLINE

    def __init__(
        self,
        store: ITokenStore,
        clock: IReactorTime,
        listener_up: Callable[[], bool],
        supervisor: CountedSessions,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self._store = store
        self._clock = clock
        self._listener_up = listener_up
        self._supervisor = supervisor
        self._last_reason: str | None = None

    def check(self) -> Deferred[str | None]:
        """Fire with C{None} when ready, else with the reason it is not."""
        if not self._listener_up():
            return succeed("console listener is not listening")
        limit = self._supervisor.limits.max_sessions
        if limit and self._supervisor.reserved >= limit:
            return succeed("session limit reached")
        answer = within(maybeDeferred(self._store.ping), self.deadline, self._clock)
        return answer.addCallbacks(lambda _: None, self._store_failed)

    def _store_failed(self, failure: Failure) -> str:
        if failure.check(TimeoutError):
            return f"token store did not answer within {self.deadline:g}s"
        if failure.check(TokenStoreUnavailable):
            return f"token store unavailable: {failure.getErrorMessage()}"
        return f"token store failed: {failure.type.__name__}"  # type: ignore[union-attr]

    def _report(self, reason: str | None) -> tuple[int, object]:
        if reason != self._last_reason:
            if reason is None:
                _log.info("ready again", vncmux_event="ready")
            else:
                _log.warn("not ready: {reason}", vncmux_event="not_ready", reason=reason)
            self._last_reason = reason
        if reason is None:
            return 200, {"ready": True}
        return 503, {"ready": False, "reason": reason}

    def render_GET(self, request: Request) -> int:
        """Check now and answer when the check is done (at most C{deadline} later)."""
        return answer_later(request, self.check().addCallback(self._report))


__all__ = [
    "READINESS_DEADLINE",
    "Liveness",
    "Readiness",
    "answer_later",
    "within",
    "write_json",
]
