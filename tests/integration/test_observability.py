"""Metrics, health, admin API and logs on real loopback sockets, through the real relay.

Tools that CI must have (``promtool`` from Debian's ``prometheus``, ``redis-server``) fail the
test when missing under CI (env ``CI`` set) and skip it elsewhere, naming the package.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import SkipTest

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.processes import loopback_listener, spawn_with_listener, stop_process, twistd_command
from tests.redis_server import start_redis
from tests.support import (
    GREETING,
    Proxy,
    Response,
    async_test,
    connect_client,
    listen_fake_vnc,
    listen_proxy,
    parse_response,
    raw_request,
)
from vncmux.interfaces import ITokenStore
from vncmux.logformat import JsonLineObserver
from vncmux.metrics import Metrics
from vncmux.observability import build_observability
from vncmux.settings import Limits
from vncmux.tokens import MemoryTokenStore, TokenStoreUnavailable, open_token_store

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALERTS = os.path.join(ROOT, "etc", "prometheus", "vncmux-alerts.yml")
ALERT_TESTS = os.path.join(ROOT, "etc", "prometheus", "vncmux-alerts.test.yml")
DASHBOARD = os.path.join(ROOT, "etc", "grafana", "vncmux-dashboard.json")
SECRET = "integration-admin-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


def require_tool(test: Any, command: str, package: str) -> str:
    """The path of C{command}; missing, the test fails under CI and is skipped elsewhere."""
    found = shutil.which(command)
    if found is None:
        hint = f"{command} not found: apt-get install {package}"
        if os.environ.get("CI"):
            test.fail(hint)
        raise SkipTest(hint)
    return found


async def http(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Response:
    """One HTTP/1.0 request to 127.0.0.1:C{port} on its own connection."""
    lines = [f"{method} {path} HTTP/1.0", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    raw = await raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return parse_response(raw)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


@dataclass
class Observed:
    """A proxy on real sockets with its metrics port."""

    proxy: Proxy
    metrics: Metrics
    port: int

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        answer = await http(self.port, "GET", "/metrics")
        assert answer.status == 200, answer
        return samples(answer.body.decode())


async def observed_proxy(
    test: TestCase, store: ITokenStore, admin: bool = True, **settings: object
) -> Observed:
    """The real proxy plus what build_observability returns, both on free loopback ports."""
    proxy = await listen_proxy(test, store, **settings)  # type: ignore[arg-type]
    secret_file = None
    if admin:
        secret_file = test.mktemp()
        with open(secret_file, "w") as f:
            f.write(SECRET + "\n")
    service, metrics = build_observability(
        "tcp:0:interface=127.0.0.1",
        reactor,
        proxy.supervisor,
        store,
        proxy.factory.stats,
        lambda: proxy.service.accepting,
        admin_token_file=secret_file,
        base_url="http://127.0.0.1/vnc_lite.html",
    )
    assert service is not None
    proxy.observers.add(metrics)
    service.startService()
    test.addCleanup(service.stopService)
    port = await service.listening()
    return Observed(proxy, metrics, port.getHost().port)


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


class MetricsOverHttpTests(TestCase):
    """/metrics scraped over HTTP agrees with the bytes really relayed."""

    @async_test
    async def test_bytes_and_sessions(self) -> None:
        """After real sessions (one closed, one live, one refused) the byte counters equal
        exactly what was sent each way, and the session counters add up."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        obs = await observed_proxy(self, store)

        first = await connect_client(self, obs.proxy.port)
        second = await connect_client(self, obs.proxy.port)
        await first.receive(len(GREETING))
        await second.receive(len(GREETING))
        first.send(b"\x01" * 1000)
        first.send(b"\x02" * 70000)
        second.send(b"\x03" * 12345)
        await first.receive(len(GREETING) + 71000)
        await second.receive(len(GREETING) + 12345)
        refused = await connect_client(self, obs.proxy.port, path="/websockify?token=nope")
        await refused.receive(len(GREETING))

        assert first.client is not None
        first.client.sendClose(1000)
        await first.closed
        await vnc.connections[0].lost

        found = await obs.scrape()
        sent_up = 1000 + 70000 + 12345
        self.assertEqual(found[key("vncmux_bytes_total", direction="client_to_backend")], sent_up)
        self.assertEqual(
            found[key("vncmux_bytes_total", direction="backend_to_client")],
            2 * len(GREETING) + sent_up,
        )
        self.assertEqual(found[key("vncmux_sessions_active")], 1)
        self.assertEqual(found[key("vncmux_sessions_opened_total")], 2)
        self.assertEqual(found[key("vncmux_sessions_closed_total", reason="client")], 1)
        self.assertEqual(found[key("vncmux_session_duration_seconds_count")], 1)
        self.assertEqual(found[key("vncmux_sessions_rejected_total", reason="invalid token")], 1)
        self.assertEqual(found[key("vncmux_connect_seconds_count", stage="token_lookup")], 3)
        self.assertEqual(found[key("vncmux_connect_seconds_count", stage="backend_connect")], 2)
        self.assertGreater(found[key("process_resident_memory_bytes")], 0)

        # The live session's bytes move into the closed total without a jump.
        second.send(b"\x04" * 10)
        await second.receive(len(GREETING) + 12345 + 10)
        assert second.client is not None
        second.client.sendClose(1000)
        await second.closed
        await vnc.connections[1].lost
        found = await obs.scrape()
        self.assertEqual(
            found[key("vncmux_bytes_total", direction="client_to_backend")], sent_up + 10
        )
        self.assertEqual(
            found[key("vncmux_bytes_total", direction="backend_to_client")],
            2 * len(GREETING) + sent_up + 10,
        )
        self.assertEqual(found[key("vncmux_sessions_active")], 0)
        self.assertEqual(found[key("vncmux_sessions_opened_total")], 2)

    @async_test
    async def test_promtool_check_metrics(self) -> None:
        """`promtool check metrics` accepts a real scrape taken after real traffic."""
        promtool = require_tool(self, "promtool", "prometheus")
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        obs = await observed_proxy(self, store)
        client = await connect_client(self, obs.proxy.port)
        await client.receive(len(GREETING))
        client.send(b"x" * 100)
        await client.receive(len(GREETING) + 100)
        answer = await http(obs.port, "GET", "/metrics")
        self.assertTrue(answer.headers["content-type"].startswith("text/plain; version=0.0.4"))
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=answer.body, capture_output=True, timeout=60
        )
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
        self.assertEqual(checked.stdout + checked.stderr, b"")

    @async_test
    async def test_health(self) -> None:
        """/healthz is 200; /readyz is 200 while the listener is up and 503 once it stopped."""
        obs = await observed_proxy(self, MemoryTokenStore(), admin=False)
        self.assertEqual((await http(obs.port, "GET", "/healthz")).status, 200)
        ready = await http(obs.port, "GET", "/readyz")
        self.assertEqual((ready.status, ready.json()), (200, {"ready": True}))
        await obs.proxy.service.listener.stopService()
        gone = await http(obs.port, "GET", "/readyz")
        self.assertEqual(gone.status, 503)
        self.assertEqual(gone.json()["reason"], "console listener is not listening")
        self.assertEqual((await http(obs.port, "GET", "/sessions")).status, 404)

    @async_test
    async def test_not_ready_at_session_limit(self) -> None:
        """At --max-sessions /readyz is 503 'session limit reached' (new consoles would get
        4429); one session fewer and it is 200 again."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        obs = await observed_proxy(self, store, admin=False, limits=Limits(max_sessions=1))
        client = await connect_client(self, obs.proxy.port)
        await client.receive(len(GREETING))
        full = await http(obs.port, "GET", "/readyz")
        self.assertEqual(
            (full.status, full.json()), (503, {"ready": False, "reason": "session limit reached"})
        )
        assert client.client is not None
        client.client.sendClose(1000)
        await client.closed
        await vnc.connections[0].lost
        self.assertEqual((await http(obs.port, "GET", "/readyz")).status, 200)


class AdminOverHttpTests(TestCase):
    """The admin API on the metrics port, against live sessions."""

    @async_test
    async def test_secrets_and_sessions(self) -> None:
        """Missing secret 401, wrong 403; with it, the live session is listed and DELETE
        closes it with 4002 'token revoked'."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port, instance_uuid="inst-7")
        obs = await observed_proxy(self, store)
        client = await connect_client(self, obs.proxy.port)
        await client.receive(len(GREETING))
        client.send(b"k" * 5)
        await client.receive(len(GREETING) + 5)

        self.assertEqual((await http(obs.port, "GET", "/sessions")).status, 401)
        wrong = {"Authorization": "Bearer not-the-secret"}
        self.assertEqual((await http(obs.port, "GET", "/sessions", wrong)).status, 403)
        listed = await http(obs.port, "GET", "/sessions", AUTH)
        self.assertEqual(listed.status, 200)
        [entry] = listed.json()
        self.assertEqual(entry["backend_host"], "127.0.0.1")
        self.assertEqual(entry["backend_port"], vnc_port)
        self.assertEqual(entry["instance_uuid"], "inst-7")
        self.assertEqual(entry["client_address"], "127.0.0.1")
        self.assertEqual((entry["bytes_to_backend"], entry["bytes_to_client"]), (5, 17))
        self.assertNotIn(b"good", listed.body)

        self.assertEqual(
            (await http(obs.port, "DELETE", f"/sessions/{entry['session_id']}", wrong)).status,
            403,
        )
        self.assertEqual(len(obs.proxy.supervisor.sessions), 1)
        ended = await http(obs.port, "DELETE", f"/sessions/{entry['session_id']}", AUTH)
        self.assertEqual(ended.status, 200)
        self.assertEqual(await client.closed, (4002, "token revoked"))
        found = await obs.scrape()
        self.assertEqual(found[key("vncmux_sessions_closed_total", reason="revoked")], 1)

    @async_test
    async def test_no_secret_in_any_log_event(self) -> None:
        """Issuing a token with a password, using it, refusing a wrong one, revoking it over
        the admin API: no captured log event, raw or formatted or as JSON, holds the token
        or the password, while session start and end are logged with their fields."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        # A VNC server that wants VncAuth (it answers OK without waiting for the response):
        # the security proxy uses the password, and still nothing logs it.
        vnc_auth = GREETING + b"\x01\x02" + bytes(range(16)) + b"\x00\x00\x00\x00"
        vnc, vnc_port = await listen_fake_vnc(self, greeting=vnc_auth, echo=False)
        store = MemoryTokenStore()
        obs = await observed_proxy(self, store)

        body = {"host": "127.0.0.1", "port": vnc_port, "password": "vnc-password-42", "ttl": 60}
        issued = await http(obs.port, "POST", "/tokens", AUTH, json.dumps(body).encode())
        self.assertEqual(issued.status, 201)
        token = issued.json()["token"]
        self.assertIn(f"token%3D{token}", issued.json()["access_url"])

        client = await connect_client(self, obs.proxy.port, path=f"/websockify?token={token}")
        await client.receive(len(GREETING))
        client.send(GREETING)  # the proxy offers None, and the session starts
        await client.receive(len(GREETING) + 2)
        client.send(b"\x01")
        await client.receive(len(GREETING) + 2 + 4)
        near_miss = token[:-1] + ("A" if token[-1] != "A" else "B")
        refused = await connect_client(self, obs.proxy.port, path=f"/?token={near_miss}")
        await refused.receive(len(GREETING))
        refused.send(GREETING)
        self.assertEqual(await refused.closed, (4401, "invalid token"))
        store.available = False
        down = await connect_client(self, obs.proxy.port, path=f"/?token={token}")
        await down.receive(len(GREETING))
        down.send(GREETING)
        self.assertEqual(await down.closed, (4503, "token store unavailable"))
        store.available = True
        found = await obs.scrape()  # docs/metrics.md: a 4503 refusal is a token store error
        self.assertEqual(found[key("vncmux_token_store_errors_total")], 1)
        revoked = await http(obs.port, "DELETE", f"/tokens/{token}", AUTH)
        self.assertEqual(revoked.json()["sessions_ended"], 1)
        self.assertEqual(await client.closed, (4002, "token revoked"))
        await vnc.connections[0].lost

        out = _Lines()
        as_json = JsonLineObserver(out)  # type: ignore[arg-type]
        for event in events:
            as_json(event)
            text = formatEvent(event) + repr(event)
            for secret in (token, near_miss, "vnc-password-42", SECRET):
                self.assertNotIn(secret, text)
        for secret in (token, near_miss, "vnc-password-42", SECRET):
            self.assertNotIn(secret, out.text)
        kinds = [json.loads(line).get("vncmux_event") for line in out.text.splitlines()]
        for kind in ("session_opened", "session_closed", "session_rejected",
                     "admin_token_issued", "admin_token_revoked"):  # fmt: skip
            self.assertIn(kind, kinds)
        closed = [json.loads(line) for line in out.text.splitlines() if '"session_closed"' in line]
        self.assertEqual(closed[0]["close_reason"], "token revoked")
        for field in ("session_id", "client_address", "backend", "token_id", "duration",
                      "bytes_to_backend", "bytes_to_client"):  # fmt: skip
            self.assertIn(field, closed[0])


class _Lines:
    """A text sink for JsonLineObserver."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, data: str) -> None:
        self.text += data

    def flush(self) -> None:
        pass


class ReadinessWithRedisTests(TestCase):
    """/readyz follows a real Redis going away and coming back, without a proxy restart."""

    @async_test
    async def test_redis_stops_and_restarts(self) -> None:
        """Redis stopped: 503 within the deadline (and no token store error counted: no
        console was refused); Redis back on the same port: 200 again from the same proxy."""
        server = start_redis(self)
        store = open_token_store(server.url(), reactor, reactor=reactor)
        store.startService()  # type: ignore[union-attr]
        self.addCleanup(store.stopService)  # type: ignore[union-attr]
        await store.ping()
        obs = await observed_proxy(self, store, admin=False)
        self.assertEqual((await http(obs.port, "GET", "/readyz")).status, 200)

        server.stop()
        started = reactor.seconds()
        down = await http(obs.port, "GET", "/readyz")
        elapsed = reactor.seconds() - started
        self.assertEqual(down.status, 503)
        self.assertFalse(down.json()["ready"])
        self.assertTrue(down.json()["reason"].startswith("token store"), down.json())
        self.assertLess(elapsed, 1.0 + 0.5)
        found = await obs.scrape()  # no console was refused: probes are not store errors
        self.assertEqual(found[key("vncmux_token_store_errors_total")], 0)

        server.start()
        await store.next_reconnection()  # type: ignore[union-attr]
        up = await http(obs.port, "GET", "/readyz")
        self.assertEqual((up.status, up.json()), (200, {"ready": True}))
        self.flushLoggedErrors(TokenStoreUnavailable)


class DeploymentFilesTests(SynchronousTestCase):
    """The shipped alert rules and dashboard pass promtool."""

    def test_check_rules(self) -> None:
        """`promtool check rules` accepts etc/prometheus/vncmux-alerts.yml."""
        promtool = require_tool(self, "promtool", "prometheus")
        checked = subprocess.run(
            [promtool, "check", "rules", ALERTS], capture_output=True, timeout=60
        )
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)

    def test_alert_unit_tests(self) -> None:
        """`promtool test rules`: each alert fires on the sick instance only, after its
        `for` period, with the documented annotations."""
        promtool = require_tool(self, "promtool", "prometheus")
        checked = subprocess.run(
            [promtool, "test", "rules", os.path.basename(ALERT_TESTS)],
            cwd=os.path.dirname(ALERT_TESTS),
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)

    def test_dashboard_queries_parse(self) -> None:
        """Every dashboard query is valid PromQL (checked by promtool as recording rules,
        with the dashboard variables filled in)."""
        promtool = require_tool(self, "promtool", "prometheus")
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
        lines = ["groups:", "  - name: dashboard", "    rules:"]
        for i, expr in enumerate(exprs):
            if expr.startswith("label_values("):
                expr = re.sub(r"^label_values\((.*), \w+\)$", r"\1", expr)
            expr = expr.replace("$__rate_interval", "5m").replace("$job", ".*")
            expr = expr.replace("$instance", ".*")
            lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        checked = subprocess.run([promtool, "check", "rules", path], capture_output=True)
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
        self.assertIn(f"SUCCESS: {len(exprs)} rules found".encode(), checked.stdout)


class TwistdJsonLogTests(SynchronousTestCase):
    """`twistd --logger vncmux.logformat.json_observer vncmux` logs JSON lines."""

    def test_json_lines(self) -> None:
        """Every line twistd prints is a JSON object; a refused session shows up as one
        with its fields, and the token it carried does not show up at all."""
        tokens = self.mktemp()
        with open(tokens, "w") as f:
            f.write("real-token-abc: 127.0.0.1:1\n")
        listener = loopback_listener()
        port = listener.getsockname()[1]
        argv = [
            *twistd_command(), "-n", "--pidfile=", "--logger", "vncmux.logformat.json_observer",
            "vncmux", "--listen", "systemd:domain=INET:index=0", "--tokens", f"file:{tokens}",
            "--metrics", "none",
        ]  # fmt: skip
        proc = spawn_with_listener(
            argv, listener, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        listener.close()
        self.addCleanup(stop_process, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"GET /websockify?token=wrong-token-xyz HTTP/1.1\r\n"
                b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            lines = _read_lines_until(proc, lambda line: "session_rejected" in line, 20.0)
        records = [json.loads(line) for line in lines]
        self.assertTrue(all(isinstance(r, dict) and "time" in r and "level" in r for r in records))
        [rejected] = [r for r in records if r.get("vncmux_event") == "session_rejected"]
        self.assertEqual(rejected["close_code"], 4401)
        self.assertEqual(rejected["client_address"], "127.0.0.1")
        self.assertTrue(rejected["namespace"].startswith("vncmux."))
        self.assertNotIn("wrong-token-xyz", "\n".join(lines))


def _read_lines_until(
    proc: subprocess.Popen[bytes], done: Callable[[str], bool], timeout: float
) -> list[str]:
    """Lines of C{proc}'s output up to the first one C{done} accepts (bounded wait)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffer, lines = b"", []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no matching line within {timeout}s: {lines}")
        readable, _, _ = select.select([proc.stdout], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            raise AssertionError(f"twistd exited ({proc.wait()}): {lines} {buffer!r}")
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if done(line):
                return lines
