"""Metrics, /metrics, /healthz, /readyz and JSON logs: unit tests without sockets or real time."""

from __future__ import annotations

import gc
import io
import json
import os
import re
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.webtesting import fetch, http_site, open_session, send
from vncmux.admin import LocalSessions, admin_resources
from vncmux.backendpolicy import BackendPolicy
from vncmux.events import Observers
from vncmux.health import Readiness
from vncmux.interfaces import ISessionObserver
from vncmux.logformat import JsonLineObserver, event_as_dict, json_observer
from vncmux.metrics import (
    CLOSE_REASONS,
    REJECT_REASONS,
    Histogram,
    Metrics,
    new_registry,
)
from vncmux.observability import build_http_root, build_observability
from vncmux.refusals import (
    ALL_REFUSALS,
    BACKEND_CLOSED,
    BACKEND_NOT_ALLOWED,
    CLIENT_CLOSED,
    CONSOLE_UNREACHABLE,
    IDLE_TIMEOUT,
    INVALID_TOKEN,
    STORE_UNAVAILABLE,
    TOO_MANY_FAILED,
)
from vncmux.relay import BACKEND_TO_CLIENT, CLIENT_TO_BACKEND, RelayStats
from vncmux.settings import Limits
from vncmux.supervisor import Supervisor
from vncmux.tokens import MemoryTokenStore, TokenRecord, TokenStoreUnavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: docs/metrics.md, written out independently of the code: name -> (type, label names).
CONTRACT = {
    "vncmux_sessions_active": ("gauge", set()),
    "vncmux_sessions_opened": ("counter", set()),
    "vncmux_sessions_rejected": ("counter", {"reason"}),
    "vncmux_sessions_closed": ("counter", {"reason"}),
    "vncmux_bytes": ("counter", {"direction"}),
    "vncmux_session_duration_seconds": ("histogram", set()),
    "vncmux_connect_seconds": ("histogram", {"stage"}),
    "vncmux_token_store_errors": ("counter", set()),
    "vncmux_token_store_reconnects": ("counter", set()),
    "vncmux_failed_token_blocks": ("counter", set()),
    "vncmux_backpressure_pauses": ("counter", {"direction"}),
}
DOCUMENTED_CLOSE_REASONS = {
    "client", "backend", "idle", "lifetime", "expired", "revoked", "shutdown", "error",
}  # fmt: skip


class _Setup:
    """A supervisor on a Clock with the metrics observer, as build_service wires them."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.observers = Observers()
        self.supervisor = Supervisor(self.clock, self.observers, limits or Limits())
        self.stats = RelayStats()
        self.metrics = Metrics(self.supervisor.sessions, self.stats)
        self.observers.add(self.metrics)
        self.registry = new_registry(self.metrics, process=False)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def readiness(
        self, store: MemoryTokenStore, listening: Callable[[], bool] = lambda: True
    ) -> Readiness:
        """/readyz over C{store} and this supervisor; C{listening()} says the listener is up."""
        return Readiness(store, self.clock, listening, self.supervisor)


class MetricsTests(SynchronousTestCase):
    """The collector reads plain integers and exposes exactly the metrics of docs/metrics.md."""

    def setUp(self) -> None:
        self.s = _Setup()

    def test_observer_interface(self) -> None:
        """Metrics is a complete ISessionObserver."""
        verifyObject(ISessionObserver, self.s.metrics)

    def test_names_types_and_labels(self) -> None:
        """The exposition holds exactly the contract's families, types and label names,
        plus process metrics, and nothing else."""
        root = build_http_root(self.s.metrics, self.s.readiness(MemoryTokenStore()))
        text = fetch(http_site(root, self.s.clock), "GET", "/metrics").body.decode()
        found: dict[str, tuple[str, set[str]]] = {}
        for family in text_string_to_metric_families(text):
            labels = {k for sample in family.samples for k in sample.labels} - {"le"}
            found[family.name] = (family.type, labels)
        process = {name for name in found if name.startswith("process_")}
        self.assertIn("process_resident_memory_bytes", process)
        self.assertEqual({k: v for k, v in found.items() if k not in process}, CONTRACT)

    def test_label_values_start_at_zero(self) -> None:
        """Every reason, direction and stage is exposed at 0 before anything happens, so
        rate() and alerts work from the first scrape."""
        for refusal in ALL_REFUSALS:
            self.assertEqual(
                self.s.value("vncmux_sessions_rejected_total", reason=refusal.reason), 0
            )
        self.assertEqual(set(CLOSE_REASONS), DOCUMENTED_CLOSE_REASONS)
        for reason in CLOSE_REASONS:
            self.assertEqual(self.s.value("vncmux_sessions_closed_total", reason=reason), 0)
        for direction in (CLIENT_TO_BACKEND, BACKEND_TO_CLIENT):
            self.assertEqual(self.s.value("vncmux_bytes_total", direction=direction), 0)
            self.assertEqual(
                self.s.value("vncmux_backpressure_pauses_total", direction=direction), 0
            )
        for stage in ("token_lookup", "backend_connect"):
            self.assertEqual(self.s.value("vncmux_connect_seconds_count", stage=stage), 0)
        self.assertEqual(self.s.value("vncmux_sessions_active"), 0)
        self.assertEqual(self.s.value("vncmux_token_store_errors_total"), 0)

    def test_bytes_of_live_and_closed_sessions(self) -> None:
        """Bytes are summed from live sessions at scrape time plus the final counts of
        closed ones, so a closed session's bytes are neither lost nor counted twice."""
        one, _, _ = open_session(self.s.supervisor, self.s.stats, session_id="a")
        two, _, _ = open_session(self.s.supervisor, self.s.stats, session_id="b", token="t2")
        one.from_client((b"x" * 10,))
        one.from_backend(b"y" * 1000)
        two.from_client((b"x" * 5,))
        self.assertEqual(self.s.value("vncmux_sessions_active"), 2)
        self.assertEqual(self.s.value("vncmux_bytes_total", direction=CLIENT_TO_BACKEND), 15)
        self.assertEqual(self.s.value("vncmux_bytes_total", direction=BACKEND_TO_CLIENT), 1000)
        one.end(CLIENT_CLOSED)
        two.from_backend(b"z" * 7)
        self.assertEqual(self.s.value("vncmux_sessions_active"), 1)
        self.assertEqual(self.s.value("vncmux_bytes_total", direction=CLIENT_TO_BACKEND), 15)
        self.assertEqual(self.s.value("vncmux_bytes_total", direction=BACKEND_TO_CLIENT), 1007)
        two.end(BACKEND_CLOSED)
        self.assertEqual(self.s.value("vncmux_sessions_active"), 0)
        self.assertEqual(self.s.value("vncmux_bytes_total", direction=CLIENT_TO_BACKEND), 15)
        self.assertEqual(self.s.value("vncmux_bytes_total", direction=BACKEND_TO_CLIENT), 1007)

    def test_opened_closed_and_duration(self) -> None:
        """Opened and closed sessions are counted, closed ones by reason, with their
        duration in the histogram."""
        session, _, _ = open_session(self.s.supervisor, self.s.stats)
        self.s.clock.advance(42)
        session.end(IDLE_TIMEOUT)
        self.assertEqual(self.s.value("vncmux_sessions_opened_total"), 1)
        self.assertEqual(self.s.value("vncmux_sessions_closed_total", reason="idle"), 1)
        self.assertEqual(self.s.value("vncmux_session_duration_seconds_count"), 1)
        self.assertEqual(self.s.value("vncmux_session_duration_seconds_sum"), 42)
        self.assertEqual(self.s.value("vncmux_session_duration_seconds_bucket", le="30.0"), 0)
        self.assertEqual(self.s.value("vncmux_session_duration_seconds_bucket", le="60.0"), 1)
        self.assertEqual(self.s.value("vncmux_session_duration_seconds_bucket", le="+Inf"), 1)

    def test_rejections_by_reason(self) -> None:
        """Refusals count under their reason of docs/protocol.md; a store refusal is also a token
        store error."""
        m = self.s.metrics
        m.session_rejected("a", "192.0.2.1", INVALID_TOKEN, "unknown token", None)
        m.session_rejected("b", "192.0.2.1", INVALID_TOKEN, "unknown token", None)
        m.session_rejected("c", "192.0.2.1", STORE_UNAVAILABLE, "down", None)
        m.session_rejected("d", "192.0.2.1", CONSOLE_UNREACHABLE, "refused", "abc")
        self.assertEqual(self.s.value("vncmux_sessions_rejected_total", reason="invalid token"), 2)
        self.assertEqual(
            self.s.value("vncmux_sessions_rejected_total", reason="token store unavailable"), 1
        )
        self.assertEqual(
            self.s.value("vncmux_sessions_rejected_total", reason="console unreachable"), 1
        )
        self.assertEqual(self.s.value("vncmux_token_store_errors_total"), 1)
        self.assertIn("internal error", REJECT_REASONS)

    def test_failed_token_blocks(self) -> None:
        """An upgrade refused by the brute-force limiter counts under its reason and as a
        blocked attempt; other refusals do not; the new reasons are exported from 0."""
        m = self.s.metrics
        self.assertEqual(self.s.value("vncmux_failed_token_blocks_total"), 0)
        for reason in ("too many failed attempts", "backend not allowed"):
            self.assertEqual(self.s.value("vncmux_sessions_rejected_total", reason=reason), 0)
        m.session_rejected("a", "192.0.2.1", TOO_MANY_FAILED, "blocked", None)
        m.session_rejected("b", "192.0.2.1", TOO_MANY_FAILED, "blocked", None)
        m.session_rejected("c", "192.0.2.1", BACKEND_NOT_ALLOWED, "169.254.169.254", "abc")
        self.assertEqual(self.s.value("vncmux_failed_token_blocks_total"), 2)
        self.assertEqual(
            self.s.value("vncmux_sessions_rejected_total", reason="too many failed attempts"), 2
        )
        self.assertEqual(self.s.value("vncmux_token_store_errors_total"), 0)

    def test_stage_timings(self) -> None:
        """Connect stages land in their own histogram; unknown stages add no label."""
        m = self.s.metrics
        m.stage_timed("token_lookup", 0.002)
        m.stage_timed("backend_connect", 0.3)
        m.stage_timed("warp_drive", 1.0)
        self.assertEqual(
            self.s.value("vncmux_connect_seconds_bucket", stage="token_lookup", le="0.0025"), 1
        )
        self.assertEqual(
            self.s.value("vncmux_connect_seconds_bucket", stage="backend_connect", le="0.25"), 0
        )
        self.assertEqual(
            self.s.value("vncmux_connect_seconds_bucket", stage="backend_connect", le="0.5"), 1
        )
        self.assertIsNone(self.s.value("vncmux_connect_seconds_count", stage="warp_drive"))

    def test_backpressure_pauses(self) -> None:
        """Pauses counted by the relay's throttles are exposed by direction."""
        session, client, backend = open_session(self.s.supervisor, self.s.stats)
        client.transport.producer.pauseProducing()
        client.transport.producer.pauseProducing()
        backend.transport.producer.pauseProducing()
        self.assertEqual(
            self.s.value("vncmux_backpressure_pauses_total", direction=BACKEND_TO_CLIENT), 2
        )
        self.assertEqual(
            self.s.value("vncmux_backpressure_pauses_total", direction=CLIENT_TO_BACKEND), 1
        )

    def test_histogram_bounds(self) -> None:
        """A value equal to a bound falls in that bucket (Prometheus' ``le``)."""
        h = Histogram((1.0, 2.0))
        for value in (0.5, 1.0, 1.5, 2.0, 9.0):
            h.observe(value)
        self.assertEqual(h.cumulative(), [("1.0", 2.0), ("2.0", 4.0), ("+Inf", 5.0)])
        self.assertEqual(h.total, 14.0)

    def test_openmetrics_negotiated(self) -> None:
        """A scraper asking for OpenMetrics gets it; the default is the 0.0.4 text format."""
        root = build_http_root(self.s.metrics, self.s.readiness(MemoryTokenStore()))
        site = http_site(root, self.s.clock)
        plain = fetch(site, "GET", "/metrics")
        self.assertTrue(plain.headers["content-type"].startswith("text/plain; version=0.0.4"))
        om = fetch(
            site, "GET", "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        self.assertTrue(om.headers["content-type"].startswith("application/openmetrics-text"))
        self.assertTrue(om.body.endswith(b"# EOF\n"))


class HealthTests(SynchronousTestCase):
    """/healthz and /readyz on a Clock, with an in-memory token store."""

    def setUp(self) -> None:
        self.s = _Setup()
        self.store = MemoryTokenStore()
        self.listening = True
        self.readiness = self.s.readiness(self.store, lambda: self.listening)
        self.site = http_site(build_http_root(self.s.metrics, self.readiness), self.s.clock)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_healthz(self) -> None:
        """/healthz answers 200 with JSON."""
        response = fetch(self.site, "GET", "/healthz")
        self.assertEqual((response.status, response.json()), (200, {"alive": True}))

    def test_ready(self) -> None:
        """Listener up and the store answering: 200."""
        response = fetch(self.site, "GET", "/readyz")
        self.assertEqual((response.status, response.json()), (200, {"ready": True}))

    def test_store_down(self) -> None:
        """A store that fails its ping gives 503 with the reason; the change is logged once,
        and so is the recovery. Probes are not token store errors (their count would follow
        the probing rate): only consoles refused with 4503 are."""
        self.store.available = False
        for _ in range(2):
            response = fetch(self.site, "GET", "/readyz")
            self.assertEqual(response.status, 503)
            self.assertEqual(
                response.json(),
                {
                    "ready": False,
                    "reason": "token store unavailable: memory store marked unavailable",
                },
            )
        self.assertEqual(self.s.value("vncmux_token_store_errors_total"), 0)
        self.store.available = True
        self.assertEqual(fetch(self.site, "GET", "/readyz").status, 200)
        changes = [e.get("vncmux_event") for e in self.events if e.get("vncmux_event")]
        self.assertEqual(changes, ["not_ready", "ready"])

    def test_store_too_slow(self) -> None:
        """A ping that does not answer within the deadline gives 503 at the deadline,
        not before."""
        pending: Deferred[None] = Deferred()
        self.store.ping = lambda: pending  # type: ignore[method-assign]
        exchange = send(self.site, "GET", "/readyz")
        self.s.clock.advance(0.999)
        self.assertFalse(exchange.done())
        self.s.clock.advance(0.001)
        response = exchange.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["reason"], "token store did not answer within 1s")
        self.assertEqual(self.s.value("vncmux_token_store_errors_total"), 0)
        self.assertEqual(self.s.clock.getDelayedCalls(), [])

    def test_listener_down(self) -> None:
        """A console listener that is not listening gives 503 without asking the store."""
        self.listening = False
        self.store.ping = lambda: fail(TokenStoreUnavailable("must not be asked"))  # type: ignore[method-assign]
        response = fetch(self.site, "GET", "/readyz")
        self.assertEqual(response.status, 503)
        self.assertEqual(response.json()["reason"], "console listener is not listening")
        self.assertEqual(self.s.value("vncmux_token_store_errors_total"), 0)

    def test_client_gone_before_answer(self) -> None:
        """A probe that hangs up before the store answers is not written to."""
        pending: Deferred[None] = Deferred()
        self.store.ping = lambda: pending  # type: ignore[method-assign]
        exchange = send(self.site, "GET", "/readyz")
        exchange.close()
        pending.callback(None)
        self.assertEqual(exchange.transport.value(), b"")
        # Finishing a request whose connection is gone raises RuntimeError inside the
        # Deferred; it would surface as an unhandled error once the Deferred is collected.
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])

    def test_unknown_path_and_admin_off(self) -> None:
        """Unknown paths are a JSON 404; without a secret the admin API does not exist."""
        for path in ("/nope", "/sessions", "/tokens/abc"):
            response = fetch(self.site, "GET", path)
            self.assertEqual((response.status, response.json()), (404, {"error": "not found"}))

    def test_index(self) -> None:
        """``/`` lists the paths this port serves."""
        response = fetch(self.site, "GET", "/")
        self.assertEqual(response.json(), {"paths": ["/healthz", "/metrics", "/readyz"]})

    def test_no_access_log(self) -> None:
        """A started site (its access log open, as in production) writes no line for a
        ``DELETE /tokens/<token>``: the path holds the token."""
        token = "raw-secret-token"
        self.store.add(token, "10.0.0.5", 5901)
        policy = BackendPolicy(resolve=lambda host: fail(OSError(host)), clock=self.s.clock)
        admin = admin_resources(
            b"s3cret",
            LocalSessions(self.s.supervisor),
            self.store,
            self.s.clock,
            backend_policy=policy,
        )
        site = http_site(build_http_root(self.s.metrics, self.readiness, admin), self.s.clock)
        site.doStart()
        self.addCleanup(site.doStop)
        response = fetch(site, "DELETE", f"/tokens/{token}", {"Authorization": "Bearer s3cret"})
        self.assertEqual(response.status, 200)  # the request got through to the admin API
        self.assertIsNone(self.successResultOf(self.store.lookup(token)))
        self.assertNotIn(token, json.dumps([repr(e) for e in self.events]))

    def test_session_limit(self) -> None:
        """At --max-sessions /readyz is 503 'session limit reached' (a new console would get
        4429) without asking the store; below it, 200 again."""
        s = _Setup(Limits(max_sessions=2))
        site = http_site(build_http_root(s.metrics, s.readiness(self.store)), s.clock)
        record = TokenRecord("0" * 64, "10.0.0.5", 5901)
        s.supervisor.reserve(record, "192.0.2.1")
        self.assertEqual(fetch(site, "GET", "/readyz").status, 200)
        second = s.supervisor.reserve(record, "192.0.2.2")
        self.store.ping = lambda: fail(TokenStoreUnavailable("must not be asked"))  # type: ignore[method-assign]
        response = fetch(site, "GET", "/readyz")
        self.assertEqual(
            (response.status, response.json()),
            (503, {"ready": False, "reason": "session limit reached"}),
        )
        del self.store.ping
        second.release()
        self.assertEqual(fetch(site, "GET", "/readyz").status, 200)

    def test_no_session_limit(self) -> None:
        """--max-sessions 0 means no limit: any number of sessions leaves /readyz at 200."""
        record = TokenRecord("0" * 64, "10.0.0.5", 5901)
        for _ in range(3):
            self.s.supervisor.reserve(record, "192.0.2.1")
        self.assertEqual(fetch(self.site, "GET", "/readyz").status, 200)


class BuildTests(SynchronousTestCase):
    """build_observability: what build_service gets back."""

    def test_disabled(self) -> None:
        """--metrics none: no service, but an observer that still counts."""
        s = _Setup()
        service, metrics = build_observability(
            None, s.clock, s.supervisor, MemoryTokenStore(), s.stats, lambda: True
        )
        self.assertIsNone(service)
        verifyObject(ISessionObserver, metrics)

    def test_admin_secret_file_problems(self) -> None:
        """An unreadable or empty admin token file is a ValueError naming the file."""
        s = _Setup()
        empty = self.mktemp()
        with open(empty, "w") as f:
            f.write("\n")
        for path in (empty, self.mktemp()):
            with self.assertRaises(ValueError) as caught:
                build_observability(
                    "tcp:0",
                    s.clock,
                    s.supervisor,
                    MemoryTokenStore(),
                    s.stats,
                    lambda: True,
                    admin_token_file=path,
                )
            self.assertIn(path, str(caught.exception))


class JsonLogTests(SynchronousTestCase):
    """JSON log lines: one object per event, scalar fields kept, failures as text."""

    def test_session_event(self) -> None:
        """A structured event becomes one line with its message and fields."""
        out = io.StringIO()
        observer = JsonLineObserver(out)
        observer(
            {
                "log_format": "session {session_id} closed: {close_reason}",
                "log_level": LogLevel.info,
                "log_namespace": "vncmux.session",
                "log_time": 1_700_000_000.25,
                "session_id": "abc",
                "close_reason": "idle timeout",
                "bytes_to_client": 12,
                "record": object(),
            }
        )
        line = out.getvalue()
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(
            json.loads(line),
            {
                "time": "2023-11-14T22:13:20.250Z",
                "level": "info",
                "namespace": "vncmux.session",
                "message": "session abc closed: idle timeout",
                "session_id": "abc",
                "close_reason": "idle timeout",
                "bytes_to_client": 12,
            },
        )

    def test_failure_and_legacy_event(self) -> None:
        """A failure carries its traceback; a legacy log.msg event keeps its message."""
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            failure = Failure()
        record = event_as_dict(
            {"log_format": "boom", "log_level": LogLevel.error, "log_failure": failure}
        )
        self.assertEqual(record["level"], "error")
        self.assertIn("ZeroDivisionError", record["failure"])
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            legacy_log.msg("hello", "world", system="vncmux")
        finally:
            globalLogPublisher.removeObserver(events.append)
        legacy = event_as_dict(events[-1])
        self.assertEqual((legacy["message"], legacy["system"]), ("hello world", "vncmux"))
        self.assertNotIn("isError", legacy)

    def test_twistd_factory(self) -> None:
        """The --logger factory takes no arguments and returns an ILogObserver."""
        from twisted.logger import ILogObserver

        self.assertTrue(ILogObserver.providedBy(json_observer()))


def exposed_metrics() -> dict[str, str]:
    """Every vncmux metric name as exposed (counters with ``_total``) and its type, from the
    collector's own describe(): the one place where the names of docs/metrics.md are
    written in the code."""
    s = _Setup()
    return {
        f.name + ("_total" if f.type == "counter" else ""): f.type for f in s.metrics.describe()
    }


class DeploymentFilesTests(SynchronousTestCase):
    """The dashboard and the alert rules only use metrics that exist."""

    def _known(self) -> set[str]:
        known = set()
        for name, kind in exposed_metrics().items():
            known.add(name)
            if kind == "histogram":
                known |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        return known

    def _names_in(self, expr: str) -> set[str]:
        return set(re.findall(r"\b(vncmux_[a-z_]+)\b", expr))

    def test_dashboard(self) -> None:
        """The Grafana dashboard is valid JSON; each panel has queries, and every metric
        they name exists."""
        with open(os.path.join(ROOT, "etc", "grafana", "vncmux-dashboard.json")) as f:
            dashboard = json.load(f)
        panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
        self.assertGreater(len(panels), 5)
        used: set[str] = set()
        for panel in panels:
            exprs = [t["expr"] for t in panel.get("targets", [])]
            self.assertTrue(exprs, panel.get("title"))
            for expr in exprs:
                names = self._names_in(expr)
                self.assertTrue(names or "process_" in expr, expr)
                self.assertLessEqual(names, self._known(), expr)
                used |= names
        self.assertLessEqual(
            set(exposed_metrics()),
            {n.removesuffix("_bucket") for n in used}
            | {n.removesuffix("_sum").removesuffix("_count") for n in used},
        )

    def test_alert_rules_use_known_metrics(self) -> None:
        """The rules file has the four alerts of the issue plus VncmuxDown, and names only
        metrics that exist (promtool checks the syntax in the integration suite)."""
        with open(os.path.join(ROOT, "etc", "prometheus", "vncmux-alerts.yml")) as f:
            text = f.read()
        self.assertEqual(
            set(re.findall(r"^\s*- alert: (\w+)$", text, re.MULTILINE)),
            {
                "VncmuxTokenStoreErrors",
                "VncmuxRejectionRateHigh",
                "VncmuxBackendsUnreachable",
                "VncmuxSessionsNearLimit",
                "VncmuxDown",
            },
        )
        self.assertLessEqual(self._names_in(text), self._known())

    def test_docs_cover_metrics_and_alerts(self) -> None:
        """docs/metrics.md explains every metric and every alert."""
        with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
            docs = f.read()
        with open(os.path.join(ROOT, "etc", "prometheus", "vncmux-alerts.yml")) as f:
            alerts = re.findall(r"- alert: (\w+)", f.read())
        for name in [*exposed_metrics(), *alerts]:
            self.assertIn(f"`{name}`", docs)
