"""A real ``twistd vncmux --workers 2`` on loopback: one service to the operator."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.processes import (
    SYSTEMD_LISTEN_ENDPOINT,
    loopback_listener,
    port_of,
    trampoline_argv,
    twistd_command,
)
from tests.redis_server import session_redis
from tests.support import (
    GREETING,
    ClientState,
    Response,
    async_test,
    connect_client,
    listen_fake_vnc,
    parse_response,
    raw_request,
)
from vncmux.workers import listener_sockets

SECRET = "workers-admin-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


class ParentLog(ProcessProtocol):
    """The parent's output, line by line, and a Deferred for each line a test waits for."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        #: Fires once the parent ended; C{reason} says how (ProcessDone: status 0).
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._partial = b""
        self._waiting: list[tuple[re.Pattern[str], int, Deferred[re.Match[str]]]] = []

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self.lines.append(line.decode("utf-8", "replace"))
        self._wake()

    def wait_for(self, pattern: str, count: int = 1) -> Deferred[re.Match[str]]:
        """Fire with the C{count}th match of C{pattern} in the log, once it is there."""
        found: Deferred[re.Match[str]] = Deferred()
        self._waiting.append((re.compile(pattern), count, found))
        self._wake()
        return found

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for pattern, count, found in waiting:
            matches = [m for m in map(pattern.search, self.lines) if m]
            if len(matches) >= count:
                found.callback(matches[count - 1])
            elif self.reason is not None:
                log = "\n".join(self.lines[-30:])
                found.errback(AssertionError(f"vncmux ended without {pattern.pattern}:\n{log}"))
            else:
                self._waiting.append((pattern, count, found))

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self._wake()
        self.ended.callback(None)


class Workers:
    """A running ``twistd -n vncmux --workers N`` and its ports."""

    def __init__(self, log: ParentLog, process: Any, port: int, metrics_port: int) -> None:
        self.log = log
        self.process = process
        self.port = port
        self.metrics_port = metrics_port

    async def http(self, method: str, path: str, auth: bool = True) -> Response:
        lines = [f"{method} {path} HTTP/1.0", f"Host: 127.0.0.1:{self.metrics_port}"]
        if auth:
            lines += [f"{k}: {v}" for k, v in AUTH.items()]
        raw = await raw_request(self.metrics_port, ("\r\n".join(lines) + "\r\n\r\n").encode())
        return parse_response(raw)

    async def http_json(self, method: str, path: str, body: object) -> Any:
        """An admin request with a JSON body; its JSON answer (2xx expected)."""
        data = json.dumps(body).encode()
        lines = [
            f"{method} {path} HTTP/1.0",
            f"Host: 127.0.0.1:{self.metrics_port}",
            *(f"{k}: {v}" for k, v in AUTH.items()),
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        raw = await raw_request(self.metrics_port, head + data)
        answer = parse_response(raw)
        assert 200 <= answer.status < 300, answer
        return answer.json()

    async def sessions(self) -> list[dict[str, Any]]:
        answer = await self.http("GET", "/sessions")
        assert answer.status == 200, answer
        return answer.json()  # type: ignore[no-any-return]

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        answer = await self.http("GET", "/metrics", auth=False)
        assert answer.status == 200, answer
        found = {}
        for family in text_string_to_metric_families(answer.body.decode()):
            for s in family.samples:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return found

    def worker_pids(self) -> dict[int, int]:
        """The pid of each worker index, as the parent last logged them."""
        pids = {}
        for line in self.log.lines:
            m = re.search(r"worker (\d+) \(pid (\d+)\) is listening", line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))
        return pids


async def start_workers(
    test: TestCase,
    vnc_port: int,
    *args: str,
    count: int = 2,
    listener: socket.socket | None = None,
    prefix: Sequence[str] = (),
) -> Workers:
    """The parent with C{count} workers on free loopback ports (or on C{listener}, passed
    as systemd does), a token file that knows C{good} (the fake VNC server) and the admin
    API; stopped and reaped on cleanup. C{prefix} runs before twistd (e.g. prlimit)."""
    directory = tempfile.mkdtemp(prefix="vncmux-workers-")
    test.addCleanup(shutil.rmtree, directory)
    tokens = os.path.join(directory, "tokens")
    with open(tokens, "w") as f:
        f.write(f"good: 127.0.0.1:{vnc_port}\n")
    secret = os.path.join(directory, "admin")
    with open(secret, "w") as f:
        f.write(SECRET + "\n")
    argv = [
        *twistd_command(), "-n", "--pidfile=", "vncmux", "--workers", str(count),
        "--listen", "tcp:0:interface=127.0.0.1" if listener is None else SYSTEMD_LISTEN_ENDPOINT,
        "--metrics", "tcp:0:interface=127.0.0.1",
        "--tokens", f"file:{tokens}", "--web", "none", "--admin-token-file", secret,
        "--idle-timeout", "0", "--ping-interval", "0", *args,
    ]  # fmt: skip
    log = ParentLog()
    child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
    if listener is not None:
        child_fds[3] = listener.fileno()
    argv = trampoline_argv([*prefix, *argv], () if listener is None else (3,))
    process = reactor.spawnProcess(log, argv[0], argv, env=dict(os.environ), childFDs=child_fds)

    async def stop() -> None:
        if not log.ended.called:
            process.signalProcess("TERM")
        await log.ended
        print("\n".join(log.lines), file=sys.stderr)  # shown when the test failed

    test.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    listening = await log.wait_for(r"console listener novnc on 127\.0\.0\.1:(\d+)")
    metrics = await log.wait_for(r"metrics of every worker: http://127\.0\.0\.1:(\d+)/")
    await log.wait_for(r"worker \d+ \(pid \d+\) is listening", count)
    return Workers(log, process, int(listening.group(1)), int(metrics.group(1)))


async def relaying(
    test: TestCase, port: int, path: str = "/websockify?token=good"
) -> ClientState:
    """A session that relays: the fake VNC server greets and echoes."""
    client = await connect_client(test, port, path)
    await client.receive(len(GREETING))
    client.send(b"ping")
    await client.receive(len(GREETING) + 4)
    return client


async def refusal(test: TestCase, port: int) -> tuple[int | None, str | None]:
    """How a connection is closed that the proxy refuses after its RFB greeting."""
    client = await connect_client(test, port)
    await client.receive(len(GREETING))
    client.send(GREETING)
    return await client.closed


def closed_count(clients: list[ClientState], count: int) -> Deferred[list[tuple[Any, Any]]]:
    """Fire with the close codes once C{count} of C{clients} have closed."""
    done: Deferred[list[tuple[Any, Any]]] = Deferred()
    codes: list[tuple[Any, Any]] = []

    def one(code: tuple[Any, Any]) -> tuple[Any, Any]:
        codes.append(code)
        if len(codes) == count:
            done.callback(codes)
        return code

    for client in clients:
        client.closed.addCallback(one)
    return done


async def sessions_on_both(test: TestCase, workers: Workers) -> list[ClientState]:
    """Open sessions until both workers hold one (the kernel spreads by hashing the
    connection, so a few suffice); at most 20."""
    clients = []
    for _ in range(20):
        clients.append(await relaying(test, workers.port))
        listed = await workers.sessions()
        if {s["worker"] for s in listed} == {0, 1}:
            return clients
    test.fail("20 sessions all landed on one worker")
    raise AssertionError  # for the type checker


async def one_on_each_of_two(test: TestCase, workers: Workers) -> list[ClientState]:
    """Under --max-sessions 2: one session on each worker (a second on the same worker is
    closed again and another tried, at most 20 times)."""
    clients: list[ClientState] = []
    for _ in range(20):
        client = await relaying(test, workers.port)
        listed = await workers.sessions()
        if len({s["worker"] for s in listed}) == 2:
            return [*clients, client]
        if len(listed) == 2:  # both on one worker: let the newer go and try again
            client.client.sendClose()  # type: ignore[union-attr]
            await client.closed
        else:
            clients.append(client)
    test.fail("20 sessions all landed on one worker")
    raise AssertionError  # for the type checker


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


class OneServiceTests(TestCase):
    """Sessions on two workers are listed, counted, ended and limited as by one process."""

    timeout = 60

    @async_test
    async def test_admin_and_metrics_see_every_worker(self) -> None:
        """The admin listing names both workers; one /metrics sums both workers' sessions
        and bytes; DELETE ends a session on either worker with 4002."""
        vnc, vnc_port = await listen_fake_vnc(self)
        workers = await start_workers(self, vnc_port)
        clients = await sessions_on_both(self, workers)
        listed = await workers.sessions()
        self.assertEqual(len(listed), len(clients))
        found = await workers.scrape()
        self.assertEqual(found[key("vncmux_sessions_active")], len(clients))
        self.assertEqual(found[key("vncmux_bytes_total", direction="client_to_backend")],
                         4 * len(clients))  # fmt: skip
        self.assertEqual(found[key("vncmux_workers")], 2)
        self.assertEqual(found[key("vncmux_worker_restarts_total")], 0)
        pids = workers.worker_pids()
        for index in (0, 1):
            self.assertIn(key("process_open_fds", worker=str(index)), found)
        self.assertEqual(sorted(pids), [0, 1])

        by_worker = {s["worker"]: s for s in listed}
        one = await workers.http("GET", f"/sessions/{by_worker[1]['session_id']}")
        self.assertEqual(one.json()["worker"], 1)
        closing = closed_count(clients, 2)
        for index in (0, 1):
            ended = await workers.http("DELETE", f"/sessions/{by_worker[index]['session_id']}")
            self.assertEqual(ended.status, 200, ended)
        self.assertEqual(await closing, [(4002, "token revoked")] * 2)
        missing = await workers.http("DELETE", f"/sessions/{by_worker[0]['session_id']}")
        self.assertEqual(missing.status, 404)

    @async_test
    async def test_token_revoked_on_every_worker(self) -> None:
        """DELETE /tokens/<token> on the parent ends the token's sessions on both workers
        with 4002, counts them all, and takes the token out of the store."""
        vnc, vnc_port = await listen_fake_vnc(self)
        workers = await start_workers(self, vnc_port)
        clients = await sessions_on_both(self, workers)
        revoked = await workers.http("DELETE", "/tokens/good")
        self.assertEqual(revoked.status, 200, revoked)
        self.assertEqual(revoked.json()["sessions_ended"], len(clients))
        closed = await gatherResults([c.closed for c in clients])
        self.assertEqual(set(closed), {(4002, "token revoked")})
        self.assertEqual(await workers.sessions(), [])

    @async_test
    async def test_max_sessions_holds_across_workers(self) -> None:
        """--max-sessions 2: with one session on each worker (each alone would allow a
        second), a third connection is refused with 4429 wherever it lands; a place given
        back lets the next one in."""
        vnc, vnc_port = await listen_fake_vnc(self)
        workers = await start_workers(self, vnc_port, "--max-sessions", "2")
        clients = await one_on_each_of_two(self, workers)
        for _ in range(4):  # wherever they land, as both workers are below their own limit
            self.assertEqual(await refusal(self, workers.port), (4429, "too many sessions"))
        clients[0].client.sendClose()  # type: ignore[union-attr]
        await clients[0].closed
        await relaying(self, workers.port)


def registered(sessions: int) -> Callable[[Any], bool]:
    """Whether the fleet registry holds C{sessions} sessions: each worker writes its own at
    most every 50 ms, and the parent lists what is written."""

    def holds(client: Any) -> bool:
        keys = client.keys("vncmux:fleet:sessions:*")
        return sum(client.hlen(k) for k in keys) == sessions

    return holds


class FleetWorkersTests(TestCase):
    """With a Redis token store every worker is an instance of the fleet, and the parent's
    admin API is the fleet's view."""

    timeout = 60

    @async_test
    async def test_parent_lists_and_ends_through_the_fleet(self) -> None:
        """A token issued on the parent opens sessions on both workers; the parent lists
        each with its instance (one per worker process) and ends one on either worker."""
        vnc, vnc_port = await listen_fake_vnc(self)
        redis = session_redis(self)
        workers = await start_workers(
            self, vnc_port, "--tokens", redis.url(), "--fleet-heartbeat", "0.5"
        )
        issued = await workers.http_json(
            "POST", "/tokens", {"host": "127.0.0.1", "port": vnc_port}
        )
        path = f"/websockify?token={issued['token']}"
        clients = []
        instances: set[str] = set()
        for _ in range(20):
            clients.append(await relaying(self, workers.port, path))
            self.assertTrue(redis.wait_for(registered(len(clients)), "vncmux:fleet:*"))
            listed = await workers.sessions()
            instances = {s["instance"] for s in listed}
            if len(instances) == 2:
                break
        self.assertEqual(len(instances), 2, "20 sessions all landed on one worker")
        self.assertEqual(len(listed), len(clients))
        pids = {str(pid) for pid in workers.worker_pids().values()}
        self.assertEqual({instance.split(":")[1] for instance in instances}, pids)
        one = listed[0]
        closing = closed_count(clients, 1)
        ended = await workers.http("DELETE", f"/sessions/{one['session_id']}")
        self.assertEqual(ended.status, 200, ended)
        self.assertEqual(await closing, [(4002, "token revoked")])


class RestartTests(TestCase):
    """A worker killed with SIGKILL is restarted; nothing it held stays counted."""

    timeout = 60

    @async_test
    async def test_kill_9(self) -> None:
        """kill -9 of a worker: its session is cut, a restart line names it, /readyz says
        503 until it listens again, the restart metric is 1, its place was given back
        (under --max-sessions 2 exactly one new session gets in, then /readyz says the limit
        is reached and the next session gets 4429), and the port keeps answering: a session
        opened before the restart is served."""
        vnc, vnc_port = await listen_fake_vnc(self)
        workers = await start_workers(self, vnc_port, "--max-sessions", "2")
        self.assertEqual((await workers.http("GET", "/readyz", auth=False)).status, 200)
        clients = await one_on_each_of_two(self, workers)
        victim = {s["worker"]: s for s in await workers.sessions()}[0]
        losing = closed_count(clients, 1)
        os.kill(workers.worker_pids()[0], signal.SIGKILL)
        [(code, _)] = await losing
        self.assertEqual(code, 1006)  # the worker died: no close handshake
        await workers.log.wait_for(
            r"worker 0 \(pid \d+\) was killed by signal SIGKILL; 1 session places given"
            r" back; restart 1 in 1s"
        )
        not_ready = await workers.http("GET", "/readyz", auth=False)
        self.assertEqual(not_ready.status, 503)  # restarted 1 s after the line above
        self.assertEqual(not_ready.json()["reason"], "console listener is not listening")
        await relaying(self, workers.port)  # on worker 1, or waits in worker 0's backlog
        await workers.log.wait_for(r"worker 0 \(pid \d+\) is listening", 2)
        full = await workers.http("GET", "/readyz", auth=False)  # 2 of 2, on two workers
        self.assertEqual((full.status, full.json()["reason"]), (503, "session limit reached"))
        found = await workers.scrape()
        self.assertEqual(found[key("vncmux_worker_restarts_total")], 1)
        self.assertEqual(found[key("vncmux_workers")], 2)
        ids = {s["session_id"] for s in await workers.sessions()}
        self.assertNotIn(victim["session_id"], ids)
        self.assertEqual(len(ids), 2)
        self.assertEqual(await refusal(self, workers.port), (4429, "too many sessions"))


class DrainTests(TestCase):
    """SIGTERM to the parent drains every worker, then the parent ends as twistd does."""

    timeout = 60

    @async_test
    async def test_sigterm_drains_every_worker(self) -> None:
        """SIGTERM to the parent and both workers at once (systemd's way): sessions on both
        workers close with 1001 after the drain timeout; every worker drains once and exits
        with status 0, no error logged; then the parent ends itself with the SIGTERM it
        stopped on (twistd's way, -15: a clean stop to systemd; -9: it had to be killed)."""
        vnc, vnc_port = await listen_fake_vnc(self)
        workers = await start_workers(self, vnc_port, "--drain-timeout", "0.5")
        clients = await sessions_on_both(self, workers)
        # As systemd stops a unit: SIGTERM to every process of it at once.
        workers.process.signalProcess("TERM")
        for pid in workers.worker_pids().values():
            os.kill(pid, signal.SIGTERM)
        closed = await gatherResults([c.closed for c in clients])
        self.assertEqual(set(closed), {(1001, "going away")})
        await workers.log.ended
        assert workers.log.reason is not None
        ended = workers.log.reason.value
        self.assertIsInstance(ended, ProcessTerminated)
        self.assertEqual(ended.signal, signal.SIGTERM)
        for index in (0, 1):
            exited = rf"worker {index} \(pid \d+\) exited with status 0"
            self.assertTrue(any(re.search(exited, line) for line in workers.log.lines))
        self.assertTrue(workers.log.lines[-1].endswith("Server Shut Down."))
        self.assertEqual(sum(line.endswith("] draining") for line in workers.log.lines), 2)
        bad = ("Unhandled", "Traceback", "#error", "#critical")
        self.assertEqual([line for line in workers.log.lines if any(b in line for b in bad)], [])


class AcceptSpreadTests(TestCase):
    """SO_REUSEPORT spreads new connections evenly over the workers; one shared socket
    (a systemd socket without ReusePort=yes) serves every connection, spread as it comes."""

    timeout = 120
    CONNECTIONS = 400
    BATCH = int(os.environ.get("SPREAD_BATCH", "40"))
    LIMITS = (
        "--max-sessions-per-token", "0", "--max-sessions-per-client", "0",
        "--max-pending-per-client", "0",
    )  # fmt: skip

    async def spread(self, workers: Workers) -> Counter[int]:
        """Open CONNECTIONS sessions, 40 at a time; how many each worker holds."""
        for _ in range(self.CONNECTIONS // self.BATCH):
            batch = [connect_client(self, workers.port) for _ in range(self.BATCH)]
            opened = await gatherResults([Deferred.fromCoroutine(b) for b in batch])
            await gatherResults([c.receive(len(GREETING)) for c in opened])
        spread = Counter(s["worker"] for s in await workers.sessions())
        self.assertEqual(sum(spread.values()), self.CONNECTIONS)
        return spread

    @async_test
    async def test_400_sessions_over_2_workers(self) -> None:
        """400 sessions: each worker holds between 35% and 65% of them (a fair coin stays
        within that 400 times with probability 1 - 2e-9)."""
        vnc, vnc_port = await listen_fake_vnc(self)
        workers = await start_workers(self, vnc_port, *self.LIMITS)
        spread = await self.spread(workers)
        print(f"accept spread, SO_REUSEPORT: {sorted(spread.items())}", file=sys.stderr)
        for index in (0, 1):
            self.assertGreater(spread[index], 0.35 * self.CONNECTIONS, spread)
            self.assertLess(spread[index], 0.65 * self.CONNECTIONS, spread)

    @async_test
    async def test_shared_systemd_socket(self) -> None:
        """A systemd socket without SO_REUSEPORT is shared by both workers (the log says
        so) and every session is served; the spread is reported, not held to a share."""
        vnc, vnc_port = await listen_fake_vnc(self)
        listener = loopback_listener(backlog=512)
        self.addCleanup(listener.close)
        workers = await start_workers(self, vnc_port, *self.LIMITS, listener=listener)
        self.assertEqual(workers.port, port_of(listener))
        listener.close()
        self.assertTrue(any("one shared socket" in line for line in workers.log.lines))
        spread = await self.spread(workers)
        print(f"accept spread, one shared socket: {sorted(spread.items())}", file=sys.stderr)


class OpenFilesTests(TestCase):
    """A hard RLIMIT_NOFILE too low for --max-sessions is said once, at start."""

    timeout = 60

    @async_test
    async def test_low_hard_limit(self) -> None:
        """Under a hard limit of 8192, --max-sessions 5000 (about 11,024 descriptors): one
        line names the numbers and LimitNOFILE=/ulimit -n (not repeated by the workers), the
        parent and every worker run with the soft limit raised from 1024 to the hard limit,
        and sessions are served."""
        if not shutil.which("prlimit"):
            raise AssertionError("prlimit (util-linux) is needed to set the limits")
        vnc, vnc_port = await listen_fake_vnc(self)
        workers = await start_workers(
            self, vnc_port, "--max-sessions", "5000", prefix=["prlimit", "--nofile=1024:8192"]
        )
        said = [line for line in workers.log.lines if "open_files_limit" in line
                or "RLIMIT_NOFILE" in line]  # fmt: skip
        self.assertEqual(len(said), 1, said)
        for part in ("8192", "--max-sessions 5000", "LimitNOFILE=11024", "ulimit -n 11024"):
            self.assertIn(part, said[0])
        for pid in [workers.process.pid, *workers.worker_pids().values()]:
            with open(f"/proc/{pid}/limits") as f:
                line = next(x for x in f if x.startswith("Max open files"))
            self.assertEqual(line.split()[3:5], ["8192", "8192"], (pid, line))
        await relaying(self, workers.port)


class ListenerSocketTests(TestCase):
    """The parent's sockets for tcp: listeners, before any worker runs."""

    def test_one_port_one_socket_per_worker(self) -> None:
        """tcp:0 for three workers: the first socket picks the port, all three listen on
        it with SO_REUSEPORT, each a socket of its own."""
        shared = listener_sockets("novnc", "tcp:0:interface=127.0.0.1", 3)
        self.addCleanup(shared.close)
        self.assertEqual(len({s.fileno() for s in shared.sockets}), 3)
        self.assertEqual(len({port_of(s) for s in shared.sockets}), 1)
        for sock in shared.sockets:
            self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
        self.assertIs(shared.for_worker(4), shared.sockets[1])


class SystemdReusePortTests(TestCase):
    """A systemd socket with ReusePort=yes gets SO_REUSEPORT siblings, one per worker."""

    timeout = 60

    @async_test
    async def test_siblings_of_the_inherited_socket(self) -> None:
        """The parent adds a sibling to the inherited SO_REUSEPORT socket (the log says
        SO_REUSEPORT, not one shared socket) and sessions reach both workers."""
        vnc, vnc_port = await listen_fake_vnc(self)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        workers = await start_workers(self, vnc_port, listener=listener)
        listener.close()
        self.assertTrue(any("2 workers, SO_REUSEPORT" in line for line in workers.log.lines))
        await sessions_on_both(self, workers)


class SeveralListenersTests(TestCase):
    """Every console listener gets its sockets: each worker serves the serial port too."""

    timeout = 60

    @async_test
    async def test_serial_listener(self) -> None:
        """With --serial-listen, both ports get SO_REUSEPORT sockets, workers listen on both
        (they say so only then), and the serial port answers HTTP."""
        vnc, vnc_port = await listen_fake_vnc(self)
        workers = await start_workers(
            self, vnc_port, "--serial-listen", "tcp:0:interface=127.0.0.1"
        )
        serial = await workers.log.wait_for(
            r"console listener serial on 127\.0\.0\.1:(\d+): 2 workers, SO_REUSEPORT"
        )
        serial_port = int(serial.group(1))
        self.assertNotEqual(serial_port, workers.port)
        answer = parse_response(
            await raw_request(serial_port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        )
        self.assertGreaterEqual(answer.status, 200)
        await relaying(self, workers.port)
