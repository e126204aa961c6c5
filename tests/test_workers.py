"""The parent of ``--workers`` in memory: its counting, its merging, its AMP commands, its
restarts and its stop, with no process and no socket (iosim pumps the AMP bytes)."""

from __future__ import annotations

import json
import resource
import signal
import socket
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, eventAsJSON
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.webtesting import open_session
from vncmux.events import Observers
from vncmux.interfaces import ISessionDirectory, ISharedLimits
from vncmux.metrics import Metrics, new_registry
from vncmux.refusals import CLIENT_CLOSED, TOO_MANY_SESSIONS, Refused
from vncmux.relay import READ_BUDGET, RelayStats, read_size_for
from vncmux.settings import Settings
from vncmux.supervisor import Limits, PlaceCounter, Supervisor
from vncmux.tap import Options, build_proxy, build_service, raise_open_files_limit
from vncmux.tokens import TokenRecord, hash_token
from vncmux.worker import WorkerLink
from vncmux.workers import (
    FIRST_RESTART_DELAY,
    MAX_RESTART_DELAY,
    STABLE_AFTER,
    ParentControl,
    SharedPlaces,
    WorkerParent,
    WorkerSessions,
    families_json,
    merge_families,
)


def record(token: str = "t1", max_sessions: int | None = None) -> TokenRecord:
    return TokenRecord(hash_token(token), "10.0.0.5", 5901, max_sessions=max_sessions)


class FakeProcess:
    """What spawnProcess returns: a pid, and the signals the parent sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ProcessReactor(MemoryReactorClock):
    """A memory reactor that records spawned processes instead of starting them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any], FakeProcess]] = []

    def spawnProcess(  # type: ignore[override]
        self, protocol: Any, executable: str, args: list[str], env: Any = None, **kw: Any
    ) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append((protocol, args, kw["childFDs"], process))
        return process


def make_parent(
    count: int = 2, limits: Limits | None = None, **settings: Any
) -> tuple[WorkerParent, ProcessReactor, list[dict[str, Any]]]:
    reactor = ProcessReactor()
    events: list[dict[str, Any]] = []
    config = Settings(limits=limits or Limits(max_sessions=2), **settings)
    parent = WorkerParent(
        config, ["--listen", "tcp:0"], count, [], reactor, log_observer=events.append
    )
    return parent, reactor, events


def link_worker(parent: WorkerParent, index: int) -> tuple[WorkerLink, ParentControl, IOPump]:
    """Worker C{index}'s control channel to C{parent}, over an in-memory pump."""
    worker = parent.workers[index]
    control, link, pump = connectedServerAndClient(
        lambda: WorkerLink(index, {}), lambda: ParentControl(worker)
    )
    worker.control = control
    return link, control, pump


@implementer(ISessionDirectory)
class FixedSessions:
    """A worker's sessions as the parent sees them, without a relay."""

    def __init__(self, sessions: list[dict[str, Any]]) -> None:
        self.sessions = sessions
        self.ended: list[str] = []
        self.revocations: list[str] = []

    def list_sessions(self) -> Deferred[list[dict[str, Any]]]:
        return succeed(self.sessions)

    def get_session(self, session_id: str) -> Deferred[dict[str, Any] | None]:
        found = [s for s in self.sessions if s["session_id"] == session_id]
        return succeed(found[0] if found else None)

    def end_session(self, session_id: str) -> Deferred[bool]:
        self.ended.append(session_id)
        return succeed(any(s["session_id"] == session_id for s in self.sessions))

    def revoked(self, message: str) -> Deferred[int]:
        self.revocations.append(message)
        return succeed(len(self.sessions))


class SharedPlacesTests(SynchronousTestCase):
    """The parent counts every worker's sessions with the supervisor's own counter."""

    def test_limits_count_every_worker(self) -> None:
        """--max-sessions 2 holds for two workers together; a dead worker's places return."""
        places = SharedPlaces(PlaceCounter(Limits(max_sessions=2), "workers'"))
        places.claim(0, "h1", "id1", None, "c1")
        places.claim(1, "h2", "id2", None, "c2")
        refused = self.assertRaises(Refused, places.claim, 1, "h3", "id3", None, "c3")
        self.assertIs(refused.refusal, TOO_MANY_SESSIONS)
        self.assertIn("workers'", refused.detail)
        self.assertEqual(places.worker_gone(0), 1)
        self.assertEqual(places.reserved, 1)
        places.claim(1, "h3", "id3", None, "c3")

    def test_token_and_client_limits(self) -> None:
        """Per token (the record's max_sessions first) and per client, across workers."""
        places = SharedPlaces(
            PlaceCounter(Limits(max_sessions_per_token=3, max_sessions_per_client=2), "w")
        )
        places.claim(0, "h1", "id1", 1, "c1")
        self.assertIn(
            "id1", self.assertRaises(Refused, places.claim, 1, "h1", "id1", 1, "c2").detail
        )
        places.claim(1, "h2", "id2", None, "c1")
        self.assertIn(
            "c1", self.assertRaises(Refused, places.claim, 0, "h3", "i", None, "c1").detail
        )

    def test_give_back_once(self) -> None:
        """A place given back twice, or one unknown, changes nothing more."""
        places = SharedPlaces(PlaceCounter(Limits(), "w"))
        place = places.claim(0, "h1", "id1", None, "c1")
        places.give_back(place)
        places.give_back(place)
        places.give_back(12345)
        self.assertEqual(places.reserved, 0)


class ControlChannelTests(SynchronousTestCase):
    """Worker and parent over AMP: places, the admin questions and the metric samples."""

    def test_link_is_a_shared_limit(self) -> None:
        """The worker's end of the channel is what the supervisor asks for a place."""
        self.assertTrue(verifyObject(ISharedLimits, WorkerLink(0, {})))

    def test_supervisors_share_the_parents_limit(self) -> None:
        """Two workers' supervisors under --max-sessions 2 each, the parent's 2 for both:
        the third session is refused with the parent's reason; a release gives back there."""
        parent, _, _ = make_parent(limits=Limits(max_sessions=2))
        supervisors = []
        pumps = []
        for index in (0, 1):
            link, _, pump = link_worker(parent, index)
            pumps.append(pump)
            supervisors.append(
                Supervisor(
                    MemoryReactorClock(),
                    Observers([]),
                    Limits(max_sessions=2),
                    shared_limits=[link],
                )
            )
        first = supervisors[0].take_place(record("a"), "c")
        second = supervisors[1].take_place(record("b"), "c")
        for pump in pumps:
            pump.flush()
        reservation = self.successResultOf(first)
        self.successResultOf(second)
        third = supervisors[0].take_place(record("c"), "c")
        pumps[0].flush()
        refused = self.failureResultOf(third, Refused).value
        self.assertIs(refused.refusal, TOO_MANY_SESSIONS)
        self.assertIn("workers'", refused.detail)
        self.assertEqual((parent.places.reserved, supervisors[0].reserved), (2, 1))
        reservation.release()
        pumps[0].flush()
        self.assertEqual(parent.places.reserved, 1)

    def test_lost_parent_refuses(self) -> None:
        """Once the channel is gone, a worker refuses new sessions instead of waiting."""
        parent, _, _ = make_parent()
        link, control, pump = link_worker(parent, 0)
        gone: list[bool] = []
        link.parent_gone = lambda: gone.append(True)
        control.transport.loseConnection()
        pump.flush()
        self.assertEqual(gone, [True])
        self.failureResultOf(link.claim(record(), "c"), Refused)

    def test_admin_fans_out_to_every_worker(self) -> None:
        """Listing (longer than one AMP value), one session, ending and revoking reach every
        worker; each session says which worker holds it."""
        parent, _, _ = make_parent()
        directories = []
        pumps = []
        for index in (0, 1):
            link, _, pump = link_worker(parent, index)
            sessions = [
                {
                    "session_id": f"w{index}-{n}",
                    "started_at": float(n * 2 + index),
                    "pad": "x" * 120,
                }
                for n in range(400)
            ]
            directory = FixedSessions(sessions)
            link.serve(directory, Metrics({}, RelayStats()))
            directories.append(directory)
            pumps.append(pump)
        self.assertGreater(len(json.dumps(directories[0].sessions)), 65535)
        directory = WorkerSessions(parent)

        def answer(d: Deferred[Any]) -> Any:
            for pump in pumps:
                pump.flush()
            return self.successResultOf(d)

        listed = answer(directory.list_sessions())
        self.assertEqual(len(listed), 800)
        self.assertEqual([s["started_at"] for s in listed], sorted(s["started_at"] for s in listed))
        self.assertEqual({s["session_id"][:2]: s["worker"] for s in listed}, {"w0": 0, "w1": 1})
        self.assertEqual(answer(directory.get_session("w1-7"))["worker"], 1)
        self.assertIsNone(answer(directory.get_session("nope")))
        self.assertTrue(answer(directory.end_session("w0-3")))
        self.assertEqual([d.ended for d in directories], [["w0-3"], ["w0-3"]])
        self.assertEqual(answer(directory.revoked("hash")), 800)
        self.assertEqual([d.revocations for d in directories], [["hash"], ["hash"]])

    def test_scrape_sums_workers(self) -> None:
        """The parent's scrape: each worker's counters, gauges and histograms summed,
        process metrics by worker, plus the worker count and the restarts."""
        parent, _, _ = make_parent()
        clock = MemoryReactorClock()
        worker_metrics = []
        pumps = []
        for index in (0, 1):
            supervisor = Supervisor(clock, Observers([]))
            stats = RelayStats()
            metrics = Metrics(supervisor.sessions, stats)
            for n in range(index + 1):
                session, _, _ = open_session(supervisor, stats, session_id=f"s{index}{n}")
                session.bytes_to_client += 10 * (index + 1)
            metrics.session_rejected("x", "c", TOO_MANY_SESSIONS, "full", None)
            metrics.durations.observe(5.0 * (index + 1))
            metrics.closed[CLIENT_CLOSED.label] += index
            link, _, pump = link_worker(parent, index)
            link.serve(FixedSessions([]), metrics)
            worker_metrics.append(metrics)
            pumps.append(pump)
        collecting = parent.collect()
        for pump in pumps:
            pump.flush()
        merged = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in self.successResultOf(collecting)
            for s in family.samples
        }
        expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for metrics in worker_metrics:
            for family in new_registry(metrics, process=False).collect():
                for s in family.samples:
                    k = (s.name, tuple(sorted(s.labels.items())))
                    expected[k] = expected.get(k, 0.0) + s.value
        for k, value in expected.items():
            self.assertEqual(merged[k], value, k)
        self.assertEqual(merged[("vncmux_sessions_active", ())], 3)
        self.assertEqual(merged[("vncmux_workers", ())], 2)
        self.assertEqual(merged[("vncmux_worker_restarts_total", ())], 0)
        for worker in ("0", "1", "parent"):
            self.assertIn(("process_open_fds", (("worker", worker),)), merged)

    def test_merge_keeps_types(self) -> None:
        """Merged families keep their type and help; a histogram's buckets add up."""
        metrics = Metrics({}, RelayStats())
        metrics.durations.observe(3.0)
        families = families_json(new_registry(metrics, process=False).collect())
        merged = {f.name: f for f in merge_families({"0": families, "1": families})}
        duration = merged["vncmux_session_duration_seconds"]
        self.assertEqual(duration.type, "histogram")
        count = [s.value for s in duration.samples if s.name.endswith("_count")]
        self.assertEqual(count, [2.0])


class RestartTests(SynchronousTestCase):
    """A worker that ends while the parent runs is restarted, later each time it repeats."""

    def test_start(self) -> None:
        """Each worker runs `python -m vncmux.worker INDEX -- OPTIONS` with its control
        channel on descriptor 3."""
        parent, reactor, _ = make_parent()
        parent.startService()
        self.assertEqual(len(reactor.spawned), 2)
        for index, (_, args, child_fds, _) in enumerate(reactor.spawned):
            self.assertEqual(args[1:4], ["-m", "vncmux.worker", str(index)])
            self.assertEqual(args[args.index("--") + 1 :], ["--listen", "tcp:0"])
            self.assertIn(3, child_fds)

    def test_killed_worker_restarts_with_backoff(self) -> None:
        """SIGKILL: its places are given back, a log line names index, pid, signal and
        restart count, the restart metric counts it, the delay doubles up to the maximum,
        and a worker that ran long enough is restarted after the first delay again."""
        parent, reactor, events = make_parent()
        parent.startService()
        parent.places.claim(0, "h", "id", None, "c")
        parent.places.claim(1, "h2", "id2", None, "c")
        protocol, _, _, process = reactor.spawned[0]
        protocol.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        self.assertEqual(parent.places.reserved, 1)
        [line] = [e for e in events if e.get("vncmux_event") == "worker_restart"]
        self.assertEqual(
            (line["index"], line["pid"], line["restarts"], line["delay"], line["freed"]),
            (0, process.pid, 1, FIRST_RESTART_DELAY, 1),
        )
        self.assertIn("SIGKILL", line["how"])
        self.assertEqual(parent.restarts_total, 1)
        delays = [FIRST_RESTART_DELAY]
        for _ in range(7):
            reactor.advance(delays[-1])
            protocol = reactor.spawned[-1][0]
            protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
            delays.append(parent.workers[0].restart_delay)
        self.assertEqual(delays, [min(2.0**n, MAX_RESTART_DELAY) for n in range(8)])
        reactor.advance(delays[-1])
        reactor.advance(STABLE_AFTER)
        reactor.spawned[-1][0].processEnded(Failure(ProcessDone(0)))
        self.assertEqual(parent.workers[0].restart_delay, FIRST_RESTART_DELAY)
        self.assertEqual(parent.restarts_total, 9)

    def test_stop_drains_every_worker(self) -> None:
        """Stopping sends SIGTERM to each worker, restarts nothing, and finishes once all
        have ended; a worker still running after the drain bound is killed."""
        parent, reactor, events = make_parent(drain_timeout=3.0, close_timeout=1.0)
        parent.startService()
        stopping = parent.stopService()
        self.assertEqual([p.signals for *_, p in reactor.spawned], [["TERM"], ["TERM"]])
        reactor.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.assertNoResult(stopping)
        reactor.advance(3.0 + 1.0 + 5.0)
        self.assertEqual(reactor.spawned[1][3].signals, ["TERM", "KILL"])
        reactor.spawned[1][0].processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        self.successResultOf(stopping)
        self.assertEqual(len(reactor.spawned), 2)
        self.assertEqual(parent.restarts_total, 0)
        self.assertFalse(parent.all_listening())

    def test_worker_log_lines(self) -> None:
        """A worker's JSON event is republished tagged with its index; other output (say, a
        traceback before logging started) is logged as text, stderr as a warning."""
        parent, reactor, events = make_parent()
        parent.startService()
        protocol = reactor.spawned[1][0]
        event = {"log_format": "hello {who}", "who": "you", "log_level": LogLevel.info,
                 "log_namespace": "vncmux.x", "log_time": 1.0}  # fmt: skip
        protocol.childDataReceived(1, b"\x1e" + eventAsJSON(event).encode() + b"\n")
        protocol.childDataReceived(2, b"Traceback (most")
        protocol.childDataReceived(2, b" recent call last):\n")
        republished = [e for e in events if e.get("who") == "you"]
        self.assertEqual(len(republished), 1)
        self.assertEqual(republished[0]["vncmux_worker"], 1)
        self.assertIn("worker 1", republished[0]["log_system"])


class ReadBudgetTests(SynchronousTestCase):
    """The workers share the read budget of a reactor pass, as they share the cores."""

    def test_each_worker_takes_its_share(self) -> None:
        """A worker of --workers 2 reads half the budget per pass; a single process all."""
        tokens = self.mktemp()
        with open(tokens, "w") as f:
            f.write("demo: 127.0.0.1:5900\n")
        args = ["--tokens", f"file:{tokens}", "--listen", "tcp:0", "--metrics", "none"]
        options = Options()
        options.parseOptions([*args, "--workers", "2"])
        link = WorkerLink(0, {"novnc": (99, socket.AF_INET)})  # adopted only at start
        worker = build_proxy(options, MemoryReactorClock(), link)
        self.assertEqual(worker.console.supervisor.read_budget, READ_BUDGET // 2)
        options = Options()
        options.parseOptions(args)
        single = build_proxy(options, MemoryReactorClock())
        self.assertEqual(single.console.supervisor.read_budget, READ_BUDGET)
        self.assertEqual(read_size_for(16, READ_BUDGET // 2), read_size_for(32))


class OpenFilesTests(SynchronousTestCase):
    """The soft RLIMIT_NOFILE is raised to what --max-sessions needs; a low hard limit is said."""

    def limits(self, soft: int, hard: int, max_sessions: int) -> tuple[list[Any], str | None]:
        set_to: list[Any] = []
        message = raise_open_files_limit(
            max_sessions, lambda _: (soft, hard), lambda _, v: set_to.append(v)
        )
        return set_to, message

    def test_raised_to_need(self) -> None:
        """Two descriptors per session plus a margin, below a high hard limit: no message."""
        set_to, message = self.limits(1024, 1 << 20, 5000)
        self.assertEqual(set_to, [(2 * 5000 + 1024, 1 << 20)])
        self.assertIsNone(message)

    def test_never_lowered(self) -> None:
        """A soft limit already higher is left alone."""
        self.assertEqual(self.limits(1 << 19, 1 << 20, 10), ([], None))

    def test_hard_limit_too_low(self) -> None:
        """Soft goes up to the hard limit, and the message names the numbers and both ways
        to raise it; --max-sessions 0 plans for 10,000 sessions."""
        set_to, message = self.limits(1024, 4096, 0)
        self.assertEqual(set_to, [(4096, 4096)])
        assert message is not None
        for part in ("4096", "--max-sessions 0", "21024", "LimitNOFILE=21024", "ulimit -n 21024"):
            self.assertIn(part, message)

    def test_unlimited(self) -> None:
        """An unlimited hard limit: the soft limit goes to the need, nothing is said."""
        set_to, message = self.limits(1024, resource.RLIM_INFINITY, 100)
        self.assertEqual((set_to, message), ([(1224, resource.RLIM_INFINITY)], None))


class OptionTests(SynchronousTestCase):
    """--workers takes a count or auto."""

    def test_workers(self) -> None:
        """auto is the number of cores; 0 is refused; default 1."""
        import os

        for given, expected in (([], 1), (["--workers", "3"], 3),
                                (["--workers", "auto"], os.cpu_count() or 1)):  # fmt: skip
            options = Options()
            options.parseOptions(given)
            self.assertEqual(options["workers"], expected)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--workers", "0"])


class ListenerKindTests(SynchronousTestCase):
    """Which console listeners --workers can share, and a clear refusal for the others."""

    def test_unix_listener_refused_at_start(self) -> None:
        """unix: cannot be given to several workers: makeService says so, naming what can."""

        options = Options()
        options.parseOptions(
            ["--workers", "2", "--listen", "unix:/tmp/vncmux.sock", "--web", "none"]
        )
        error = self.assertRaises(usage.UsageError, build_service, options, MemoryReactorClock())
        self.assertIn("tcp:, tcp6:, ssl: or systemd:", str(error))
        self.assertIn("unix:/tmp/vncmux.sock", str(error))

    def test_worker_files_checked_at_start(self) -> None:
        """Files a worker would only read at its start (TLS, VeNCrypt) stop the parent's
        start instead, with the same words as a single process."""

        for args, expected in (
            (["--listen", "ssl:0:privateKey=/nonexistent/key.pem"], "/nonexistent/key.pem"),
            (["--vencrypt-client-cert", "/nonexistent/cert.pem"], "--vencrypt-*"),
            (["--tokens", "bogus:x"], "--tokens"),
        ):
            options = Options()
            options.parseOptions(["--workers", "2", "--web", "none", *args])
            reactor = MemoryReactorClock()
            error = self.assertRaises(usage.UsageError, build_service, options, reactor)
            self.assertIn(expected, str(error))


class SpawnFailureTests(SynchronousTestCase):
    """A worker that cannot even be started is tried again later, like one that died."""

    def test_spawn_fails(self) -> None:
        """spawnProcess raising OSError (no more processes): logged as a restart, retried
        after the delay."""
        parent, reactor, events = make_parent(count=1)
        real_spawn = reactor.spawnProcess

        def failing(*args: Any, **kwargs: Any) -> Any:
            reactor.spawnProcess = real_spawn  # type: ignore[method-assign]
            raise OSError(11, "Resource temporarily unavailable")

        reactor.spawnProcess = failing  # type: ignore[method-assign]
        parent.startService()
        [line] = [e for e in events if e.get("vncmux_event") == "worker_restart"]
        self.assertIn("could not be started", line["how"])
        self.assertEqual(reactor.spawned, [])
        reactor.advance(FIRST_RESTART_DELAY)
        self.assertEqual(len(reactor.spawned), 1)
