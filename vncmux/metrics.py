"""Prometheus metrics (docs/metrics.md), from a private registry, rendered on the reactor.

Nothing here runs per packet. Sessions count their bytes in plain integers
(L{vncmux.relay.Session}); the relay counts pauses in L{vncmux.relay.RelayStats}; session events
bump plain integers here. A custom collector turns all of it into metric families when
C{/metrics} is scraped, on the reactor thread, so it can walk the live session table safely.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from vncmux.interfaces import ISessionObserver
from vncmux.refusals import (
    ALL_REFUSALS,
    BACKEND_CLOSED,
    BACKEND_ERROR,
    CLIENT_CLOSED,
    IDLE_TIMEOUT,
    INTERNAL_ERROR,
    LIFETIME_REACHED,
    SHUTDOWN,
    STORE_UNAVAILABLE,
    TOKEN_EXPIRED_ENDING,
    TOKEN_REVOKED,
    TOO_MANY_FAILED,
    Refusal,
)
from vncmux.relay import BACKEND_TO_CLIENT, CLIENT_TO_BACKEND

if TYPE_CHECKING:
    from vncmux.relay import RelayStats, Session

DIRECTIONS = (CLIENT_TO_BACKEND, BACKEND_TO_CLIENT)
#: Values of the ``reason`` label of ``vncmux_sessions_rejected_total``: the refusal reasons
#: of docs/protocol.md.
REJECT_REASONS = tuple(dict.fromkeys(r.reason for r in (*ALL_REFUSALS, INTERNAL_ERROR)))
#: Values of the ``reason`` label of ``vncmux_sessions_closed_total``.
CLOSE_REASONS = tuple(
    dict.fromkeys(
        e.label
        for e in (
            CLIENT_CLOSED,
            BACKEND_CLOSED,
            IDLE_TIMEOUT,
            LIFETIME_REACHED,
            TOKEN_EXPIRED_ENDING,
            TOKEN_REVOKED,
            SHUTDOWN,
            BACKEND_ERROR,
        )
    )
)
STAGES = ("token_lookup", "backend_connect")

#: Sessions last from seconds to a working day.
DURATION_BUCKETS = (1.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)
#: A token lookup takes a millisecond on a healthy Redis; a dial can take the connect timeout.
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Bucket counts and a sum in plain numbers; no locks, no timestamps."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation in the first bucket whose upper bound is >= C{value}."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """The ``le`` buckets in Prometheus order, ending with ``+Inf``."""
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), float(running)))
        return buckets


@implementer(ISessionObserver)
class Metrics:
    """
    Listens to session events and is the registry's collector of every vncmux metric.

    @param sessions: the supervisor's live table (id to session), read at scrape time.
    @param relay_stats: the relay's pause counters, read at scrape time.
    @param store_reconnects: how often the token store connected again after losing every
        connection (L{vncmux.tokens.RedisTokenStore.reconnects}), read at scrape time;
        by default none (a token file never disconnects).
    """

    def __init__(
        self,
        sessions: Mapping[str, Session],
        relay_stats: RelayStats,
        store_reconnects: Callable[[], int] = lambda: 0,
    ) -> None:
        self._sessions = sessions
        self._relay_stats = relay_stats
        self._store_reconnects = store_reconnects
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        #: Bytes of sessions that already closed; live sessions are added at scrape time.
        self.closed_bytes = dict.fromkeys(DIRECTIONS, 0)
        self.token_store_errors = 0
        self.failed_token_blocks = 0
        self.durations = Histogram(DURATION_BUCKETS)
        self.stages = {stage: Histogram(CONNECT_BUCKETS) for stage in STAGES}

    # ISessionObserver

    def session_rejected(
        self,
        session_id: str,
        client_address: str,
        refusal: Refusal,
        detail: str,
        token_id: str | None,
    ) -> None:
        """
        Count the refusal by reason. A 4503 'token store unavailable' is also the one kind
        of token store error: it counts what users met, not how often /readyz was probed.
        A 4429 'too many failed attempts' is also an upgrade blocked by the brute-force
        limiter.
        """
        self.rejected[refusal.reason] = self.rejected.get(refusal.reason, 0) + 1
        if refusal == STORE_UNAVAILABLE:
            self.token_store_errors += 1
        elif refusal == TOO_MANY_FAILED:
            self.failed_token_blocks += 1

    def session_opened(self, session: Session) -> None:
        """Nothing to keep: opened sessions are the live ones plus the closed ones, and
        both are counted already (a second counter could only drift from them)."""

    def session_closed(self, session: Session, duration: float) -> None:
        """Keep the session's final byte counts, its duration and its close reason."""
        self.closed_bytes[CLIENT_TO_BACKEND] += session.bytes_to_backend
        self.closed_bytes[BACKEND_TO_CLIENT] += session.bytes_to_client
        label = session.ending.label if session.ending is not None else "error"
        self.closed[label] = self.closed.get(label, 0) + 1
        self.durations.observe(duration)

    def stage_timed(self, stage: str, seconds: float) -> None:
        """Time one connect stage; unknown stages are ignored to keep the label set fixed."""
        histogram = self.stages.get(stage)
        if histogram is not None:
            histogram.observe(seconds)

    # the Prometheus collector protocol

    def describe(self) -> Iterable[Metric]:
        """The families this collector exposes (the registry checks names with it)."""
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        """Every vncmux metric, computed now from the live table and the running totals."""
        sessions = list(self._sessions.values())
        yield GaugeMetricFamily(
            "vncmux_sessions_active", "Sessions relaying now.", value=len(sessions)
        )
        yield CounterMetricFamily(
            "vncmux_sessions_opened",
            "Sessions that passed their checks and started relaying.",
            value=len(sessions) + sum(self.closed.values()),
        )
        yield _labelled(
            "vncmux_sessions_rejected",
            "Connections refused, by close reason.",
            "reason",
            self.rejected,
        )
        yield _labelled(
            "vncmux_sessions_closed",
            "Relaying sessions that ended, by why they ended.",
            "reason",
            self.closed,
        )
        to_backend = self.closed_bytes[CLIENT_TO_BACKEND]
        to_client = self.closed_bytes[BACKEND_TO_CLIENT]
        for session in sessions:
            to_backend += session.bytes_to_backend
            to_client += session.bytes_to_client
        yield _labelled(
            "vncmux_bytes",
            "Payload bytes relayed, by direction.",
            "direction",
            {CLIENT_TO_BACKEND: to_backend, BACKEND_TO_CLIENT: to_client},
        )
        duration = HistogramMetricFamily(
            "vncmux_session_duration_seconds", "How long relaying sessions lasted.", labels=[]
        )
        duration.add_metric([], self.durations.cumulative(), self.durations.total)
        yield duration
        connect = HistogramMetricFamily(
            "vncmux_connect_seconds", "Time spent in each connect stage.", labels=["stage"]
        )
        for stage, histogram in self.stages.items():
            connect.add_metric([stage], histogram.cumulative(), histogram.total)
        yield connect
        yield CounterMetricFamily(
            "vncmux_token_store_errors",
            "Token lookups refused with 4503 because the token store was down or too slow.",
            value=self.token_store_errors,
        )
        yield CounterMetricFamily(
            "vncmux_token_store_reconnects",
            "Times the token store connected again after losing every connection to Redis"
            " (a restart, or a Sentinel failover to another master).",
            value=self._store_reconnects(),
        )
        yield CounterMetricFamily(
            "vncmux_failed_token_blocks",
            "Upgrades refused with 4429 without a token lookup: their client address sent"
            " more than --max-failed-tokens unknown tokens in a minute.",
            value=self.failed_token_blocks,
        )
        yield _labelled(
            "vncmux_backpressure_pauses",
            "Times reading from one side paused because the other side's buffer was full,"
            " by the direction that paused.",
            "direction",
            self._relay_stats.pauses,
        )


def _labelled(name: str, documentation: str, label: str, values: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in values.items():
        family.add_metric([value], count)
    return family


def new_registry(metrics: Metrics, process: bool = True) -> CollectorRegistry:
    """A private registry with C{metrics} and, unless told not to, the process metrics."""
    registry = CollectorRegistry()
    registry.register(metrics)
    if process:
        ProcessCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """
    ``GET /metrics``: the registry in the format the scraper asks for (Prometheus text by
    default, OpenMetrics when its Accept header says so), rendered on the reactor thread.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        """Collect now and answer with the text."""
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return encoder(self._registry)


__all__ = [
    "CLOSE_REASONS",
    "DIRECTIONS",
    "REJECT_REASONS",
    "STAGES",
    "Histogram",
    "Metrics",
    "MetricsPage",
    "new_registry",
]
