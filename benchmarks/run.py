"""
Side-by-side benchmark of vncmux, websockify and socat on loopback.

Starts fake VNC backends (``backend.py``, one process per mode and instance), one token file
that the proxies read (and a real redis-server for the kinds with the Redis store), the proxy
kinds of ``--kinds`` (``--proxies K`` instances of each; socat: one relay per backend, which
the client reaches over raw TCP), each in its own process group on a loopback listener made
here and handed over (websockify and socat bind a port held for them, see
``ProxySet.start_binding_itself``), then
runs every scenario for every kind in rotating order (A B C, B C A, ...) for ``--rounds``
rounds. The load comes from ``client.py`` in separate processes. Proxy CPU time is read from
/proc around each run (for forked children: the parent's cutime/cstime after it reaped them,
see ``ProxyInstance.cpu``). The fleet scenario runs K instances of one Redis-backed kind.
Prints a table and writes ``benchmarks/results/latest.json``; ``plot.py`` draws it.

    .venv/bin/python benchmarks/run.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import resource
import selectors
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.processes import (
    first_answer,
    is_listening,
    loopback_listener,
    port_of,
    raise_nofile,
    spawn,
    stop_process,
    vncmux_command,
)
from tests.procfs import (
    CLOCK_TICKS,
    group_members,
    mem_available_kib,
    process_tree,
    read_stat,
    schedstat_seconds,
    smaps_rollup,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
#: vncmux with its metrics endpoint on and scraped every second: the B side of --baseline.
METRICS_ON = "vncmux-metrics"
#: The proxy every other kind's paired ratio is taken against, when it is measured.
REFERENCE = "websockify"
MiB = 2**20
MB = 10**6
GB = 10**9


@dataclass(frozen=True)
class KindSpec:
    """One proxy kind: which program, which token store, which extra options."""

    name: str
    program: str  # vncmux, websockify or socat
    store: str = "file"  # vncmux's token store: file (the shared token file) or redis
    args: tuple[str, ...] = ()


BUILTIN_KINDS = {
    "vncmux": KindSpec("vncmux", "vncmux"),
    "vncmux-redis": KindSpec("vncmux-redis", "vncmux", store="redis"),
    METRICS_ON: KindSpec(METRICS_ON, "vncmux"),
    "websockify": KindSpec("websockify", "websockify"),
    # A C byte relay without WebSocket: one socat per backend, raw TCP from the client.
    "socat": KindSpec("socat", "socat"),
}


def parse_variant(text: str, store: str) -> KindSpec:
    """``NAME=ARGS`` (``--variant``/``--redis-variant``): vncmux with ARGS, as kind NAME."""
    name, sep, argstr = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z][\w.-]*", name) or name in BUILTIN_KINDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=ARGS with a new NAME (not {', '.join(BUILTIN_KINDS)})"
        )
    return KindSpec(name, "vncmux", store, tuple(shlex.split(argstr)))


def venv_bin(name: str) -> str:
    """A console script from the project's virtualenv (else next to this interpreter)."""
    for d in (REPO / ".venv" / "bin", Path(sys.executable).parent):
        if (d / name).exists():
            return str(d / name)
    raise SystemExit(f"{name} not found; run `make` or pip install -e '.[bench]'")


def python() -> str:
    """The interpreter for the client and backend processes."""
    return venv_bin("python")


def descriptors_needed(sessions: int) -> int:
    """
    Descriptors one process needs for ``sessions`` relayed sessions: a proxy holds two per
    session (browser and VNC server sides), plus room for listeners, logs and pipes.
    """
    return 2 * sessions + 1024


def workers_of(args: Sequence[str]) -> int:
    """The worker processes a vncmux command line asks for (``--workers N|auto``; 1)."""
    workers = "1"
    for i, arg in enumerate(args):
        if arg.startswith("--workers="):
            workers = arg.split("=", 1)[1]
        elif arg == "--workers" and i + 1 < len(args):
            workers = args[i + 1]
    return os.cpu_count() or 1 if workers == "auto" else int(workers)


def relay_processes(ps: ProxySet) -> int:
    """How many processes share the sessions of one instance (forking proxies: any)."""
    if ps.spec.program != "vncmux":
        return 1 << 30  # websockify and socat fork a process per session
    return workers_of([*ps.extra, *ps.spec.args])


def nofile_advice(sessions: int, soft: int) -> str:
    """Why ``sessions`` do not fit, and what to do about it."""
    return (
        f"{sessions} sessions in one process need about {descriptors_needed(sessions)}"
        f" descriptors, but RLIMIT_NOFILE is {soft} and its hard limit could not be raised"
        f" (that needs CAP_SYS_RESOURCE): raise the hard limit (ulimit -Hn, systemd"
        f" LimitNOFILE=, limits.conf), or spread the sessions over --workers"
    )


# -- processes --------------------------------------------------------------------------
class Proc:
    """A child in a session (process group) of its own, stopped with everything it forked."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        *,
        stdin: Any = subprocess.DEVNULL,
        stdout: Any = None,
        listeners: Mapping[str, socket.socket] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._logf = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = spawn(
            argv,
            cwd=REPO,
            stdin=stdin,
            stdout=self._logf if stdout is None else stdout,
            stderr=self._logf,
            listeners=listeners,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        """True while the group leader runs."""
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop and reap the group (SIGTERM, SIGKILL after ``timeout``), then wait, as long
        again at most, until none of its processes is left: the next measurement must not
        count a child that is still exiting.
        """
        stop_process(self.popen, timeout)
        deadline = time.monotonic() + timeout
        while group_members(self.pid, zombies=True) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._logf.close()

    def log_tail(self, n: int = 15) -> str:
        """The last lines of the log, for error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Registry:
    """Every process started, so that all of them are stopped on the way out."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], log: Path, **kw: Any) -> Proc:
        """Start and remember a process (``kw``: see ``Proc``)."""
        p = Proc(name, argv, log, **kw)
        self.procs.append(p)
        return p

    def stop(self, proc: Proc) -> None:
        """Stop and forget one process."""
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every process still registered, newest first."""
        while self.procs:
            self.stop(self.procs[-1])


@dataclass
class Backend:
    """One backend.py process."""

    mode: str
    index: int
    proc: Proc
    port: int
    #: What the backend is for, when not just its mode (a blast size: ``blast-n100``).
    label: str = ""

    @property
    def token(self) -> str:
        """Its token in the shared token file."""
        return f"{self.label}-{self.index}" if self.label else f"{self.mode}{self.index}"


def start_backend(
    reg: Registry,
    logs: Path,
    mode: str,
    index: int,
    blast: int,
    extra: Sequence[str] = (),
    label: str = "",
) -> Backend:
    """
    Start one backend (``extra``: more backend.py options) on a listener made here: it
    serves from the first connection on, which waits in the backlog until then.
    """
    argv = [python(), str(HERE / "backend.py"), "--mode", mode, "--blast-bytes", str(blast)]
    argv += [*extra, "--listen-fd", "3"]
    name = f"{label or mode}{index}"
    with contextlib.closing(loopback_listener(backlog=1024)) as listener:
        proc = reg.start(f"backend-{name}", argv, logs / f"backend-{name}.log",
                         listeners={"backend": listener})  # fmt: skip
        return Backend(mode, index, proc, port_of(listener), label)


def read_line(stream: IO[bytes], timeout: float) -> str | None:
    """One line from a pipe, or None after ``timeout`` seconds or at EOF."""
    fd = stream.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            ch = os.read(fd, 1)
            if not ch:
                return None
            if ch == b"\n":
                return buf.decode(errors="replace")
            buf += ch
    return None


@dataclass
class ProxyInstance:
    """One proxy process (and, for websockify, its forked children)."""

    kind: str
    port: int
    proc: Proc
    metrics_port: int | None = None
    #: socat: the token of the one backend this relay leads to.
    target: str | None = None

    def members(self) -> list[int]:
        """The leader, every process in its group, and every descendant (a worker that
        made a group of its own still counts)."""
        return process_tree(self.proc.pid)

    def cpu(self) -> float:
        """
        CPU seconds of the whole process tree so far.

        The leader's utime+stime, plus cutime+cstime (children it has reaped: websockify
        reaps through multiprocessing.active_children() on SIGCHLD, i.e. waitpid), plus the
        CPU time of members still alive or not yet reaped. Read it only when the group is
        quiescent (see ``ProxySet.quiesce``) so that no child is reaped between reads.

        A live child's time comes from its threads' schedstat, in nanoseconds: utime+stime
        are whole clock ticks per process, and a thousand forked children that each used a
        few milliseconds would lose up to a tick each (long-lived children, such as
        vncmux's workers, lose at most one tick each either way).
        """
        total = 0.0
        for pid in self.members():
            st = read_stat(pid)
            if st is None:
                continue
            if pid == self.proc.pid:
                total += (st.cpu_ticks + st.children_ticks) / CLOCK_TICKS
            else:
                # schedstat misses threads that ended, the ticks never do: the larger
                exact = schedstat_seconds(pid)
                total += max(st.cpu_ticks / CLOCK_TICKS, exact or 0.0)
        return total

    def memory(self) -> tuple[int, int, int]:
        """(sum of Pss KiB, sum of Rss KiB, number of processes) of the tree."""
        pss = rss = n = 0
        for pid in self.members():
            p, r = smaps_rollup(pid)
            if p or r:
                pss += p
                rss += r
                n += 1
        return pss, rss, n


@dataclass
class ProxySet:
    """K instances of one proxy kind (socat: one relay per backend)."""

    spec: KindSpec
    count: int
    token_file: Path
    logs: Path
    reg: Registry
    extra: list[str] = field(default_factory=list)
    backends: list[Backend] = field(default_factory=list)
    redis_url: str | None = None
    instances: list[ProxyInstance] = field(default_factory=list)
    starts: int = 0
    #: Processes of all instances when no session is open (vncmux's workers count).
    idle_procs: int = 0

    @property
    def kind(self) -> str:
        """The kind's name, as in the tables."""
        return self.spec.name

    @property
    def raw(self) -> bool:
        """Clients speak raw TCP (no WebSocket) to this kind."""
        return self.spec.program == "socat"

    def argv(self, port: int = 0, target: int = 0) -> list[str]:
        """
        The command line of one instance: vncmux serves on the listener(s) ``start_vncmux``
        passes in, websockify and socat on ``port`` (socat relaying to ``target``, a
        backend's port).
        """
        if self.spec.program == "vncmux":
            if self.spec.store == "redis":
                assert self.redis_url is not None, "no redis-server was started"
                tokens = self.redis_url
            else:
                tokens = f"file:{self.token_file}"
            metrics = [] if self.kind == METRICS_ON else ["--metrics", "none"]
            return vncmux_command(
                [
                    "--tokens",
                    tokens,
                    *metrics,
                    # Thousands of sessions from 127.0.0.1 on a few tokens: the limits that
                    # protect a production proxy would only measure themselves here.
                    "--max-sessions=0",
                    "--max-sessions-per-token=0",
                    "--max-sessions-per-client=0",
                    "--max-pending-per-client=0",
                    *self.extra,
                    *self.spec.args,
                ],
                metrics_family=socket.AF_INET if self.kind == METRICS_ON else None,
            )
        if self.spec.program == "socat":
            return [
                "socat",
                f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
                f"TCP:127.0.0.1:{target}",
            ]
        return [
            venv_bin("websockify"),
            "--token-plugin",
            "TokenFile",
            "--token-source",
            str(self.token_file),
            *self.extra,
            f"127.0.0.1:{port}",
        ]

    def route(self, tokens: Sequence[str]) -> tuple[list[int], list[str]]:
        """(ports, tokens) for a client: every instance, or socat's relay for each token."""
        if not self.raw:
            return self.ports, list(tokens)
        by_target = {i.target: i.port for i in self.instances}
        return [by_target[t] for t in tokens], list(tokens)

    def start(self) -> None:
        """Start every instance and wait until each serves."""
        self.starts += 1
        plan: list[Backend | None] = list(self.backends) if self.raw else [None] * self.count
        for k, backend in enumerate(plan):
            if self.spec.program == "vncmux":
                self.instances.append(self.start_vncmux(k))
            else:
                self.instances.append(self.start_binding_itself(k, backend))
        self.idle_procs = self.settled_procs()

    def start_vncmux(self, k: int) -> ProxyInstance:
        """
        vncmux instance ``k`` on a listener made here (and its metrics listener), handed
        over by systemd socket activation, with the backlog of Twisted's ``tcp:`` endpoint
        (50). It is up once it answers a first HTTP request (until then the request waits
        in the backlog).
        """
        name, log = f"{self.kind}{k}", self.logs / f"{self.kind}{k}.log"
        with contextlib.ExitStack() as stack:
            listener = stack.enter_context(loopback_listener(backlog=50))
            listeners = {"listener": listener}
            metrics_port = None
            if self.kind == METRICS_ON:
                metrics = stack.enter_context(loopback_listener())
                listeners["metrics"] = metrics
                metrics_port = port_of(metrics)
            proc = self.reg.start(name, self.argv(), log, listeners=listeners)
            port = port_of(listener)
        try:
            first_answer(port, b"GET / HTTP/1.0\r\n\r\n", 30.0)
        except OSError as e:
            raise SystemExit(f"{name} did not start ({e}); log {log}:\n{proc.log_tail()}") from e
        return ProxyInstance(self.kind, port, proc, metrics_port)

    def start_binding_itself(self, k: int, backend: Backend | None) -> ProxyInstance:
        """
        Instance ``k`` of websockify, or socat's relay to ``backend``: these bind their port
        themselves. socat 1.7.4 (Debian 12) cannot take a listening socket (``ACCEPT-FD``
        came with 1.8); websockify can (``--inetd``), but then each connection costs its
        forked child about 30% more CPU time and 0.9 MiB more memory (measured back to back),
        which would change the figures. So the port is held here meanwhile by a bound, not
        listening ``SO_REUSEADDR`` socket (only a program that sets ``SO_REUSEADDR`` too, as
        both do, can bind it), and the instance is up once a connection to it is accepted,
        tried every 0.1 s for 30 s at most.
        """
        name, log = f"{self.kind}{k}", self.logs / f"{self.kind}{k}.log"
        with contextlib.closing(socket.socket()) as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("127.0.0.1", 0))
            port = port_of(holder)
            proc = self.reg.start(name, self.argv(port, backend.port if backend else 0), log)
            deadline = time.monotonic() + 30.0
            while not is_listening(port):
                if not proc.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not start; log {log}:\n{proc.log_tail()}")
                time.sleep(0.1)
        return ProxyInstance(self.kind, port, proc, None, backend.token if backend else None)

    def settled_procs(self, timeout: float = 15.0) -> int:
        """The process count once it stayed the same for 0.5 s (workers still starting)."""
        deadline = time.monotonic() + timeout
        last, since = self.nprocs(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < 0.5:
            time.sleep(0.1)
            now = self.nprocs()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def stop(self) -> None:
        """Stop every instance (process groups: websockify's children go too)."""
        for inst in self.instances:
            self.reg.stop(inst.proc)
        self.instances.clear()

    def restart(self) -> None:
        """Fresh processes, for the memory scenario."""
        self.stop()
        self.start()

    @property
    def ports(self) -> list[int]:
        """The listening ports."""
        return [i.port for i in self.instances]

    def check_alive(self) -> None:
        """Fail loudly if an instance died."""
        for inst in self.instances:
            if not inst.proc.alive():
                raise RuntimeError(f"{inst.proc.name} died:\n{inst.proc.log_tail()}")

    def cpu(self) -> float:
        """CPU seconds of every instance's tree."""
        return sum(i.cpu() for i in self.instances)

    def memory(self) -> tuple[int, int, int]:
        """Summed (Pss KiB, Rss KiB, processes) of every instance."""
        tot = [0, 0, 0]
        for inst in self.instances:
            for j, v in enumerate(inst.memory()):
                tot[j] += v
        return tot[0], tot[1], tot[2]

    def nprocs(self) -> int:
        """Processes in every instance's group, zombies included."""
        return sum(len(i.members()) for i in self.instances)

    def quiesce(self, timeout: float = 15.0, live: bool = False) -> bool:
        """
        Wait until only the processes of an idle proxy are left (websockify reaped its
        children) and CPU time stopped moving for 0.2 s; ``live``: sessions are held open,
        so only the latter.
        Bounded by ``timeout``; returns False if not reached.
        """
        deadline = time.monotonic() + timeout
        last = -1.0
        while time.monotonic() < deadline:
            if live or self.nprocs() == self.idle_procs:
                now = self.cpu()
                if now == last:
                    return True
                last = now
            time.sleep(0.1)
        return False


class Scraper(threading.Thread):
    """Fetches /metrics from every instance once a second until the run's deadline."""

    def __init__(self, ps: ProxySet, deadline: float) -> None:
        super().__init__(daemon=True)
        self.ps = ps
        self.deadline = deadline
        self.counts = {"ok": 0, "failed": 0}

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            for inst in list(self.ps.instances):
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{inst.metrics_port}/metrics", timeout=2
                    ) as answer:
                        answer.read()
                    self.counts["ok"] += 1
                except OSError:
                    self.counts["failed"] += 1
            time.sleep(1.0)


def proc_cpu(procs: Sequence[Proc]) -> float:
    """CPU seconds of some single-process children (the backends)."""
    total = 0
    for p in procs:
        st = read_stat(p.pid)
        if st is not None:
            total += st.cpu_ticks
    return total / CLOCK_TICKS


def system_busy() -> float:
    """Busy CPU seconds of the whole machine (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLOCK_TICKS


def own_and_reaped_cpu() -> float:
    """CPU seconds of this script plus its reaped children (the finished clients)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


# -- running the load client ------------------------------------------------------------
class ClientFailed(RuntimeError):
    """client.py exited with an error or timed out."""


class Skipped(Exception):
    """A run that was not attempted (e.g. it would exhaust memory)."""


def client_argv(
    scenario: str, ports: Sequence[int], tokens: Sequence[str], **opts: Any
) -> list[str]:
    """The command line of one client.py run."""
    argv = [
        python(),
        str(HERE / "client.py"),
        scenario,
        "--ports",
        ",".join(map(str, ports)),
        "--tokens",
        ",".join(tokens),
    ]
    for k, v in opts.items():
        if v is True:
            argv.append(f"--{k.replace('_', '-')}")
        elif v is not False:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def run_clients(reg: Registry, logs: Path, argvs: list[list[str]], timeout: float) -> list[dict]:
    """Run client processes in parallel; return each one's result line."""
    procs = [
        reg.start(f"client{i}", argv, logs / "client.log", stdout=subprocess.PIPE)
        for i, argv in enumerate(argvs)
    ]
    out: list[dict] = []
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                stdout, _ = p.popen.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise ClientFailed(f"{p.name} timed out after {timeout:.0f} s") from None
            lines = [json.loads(x) for x in stdout.decode().splitlines() if x.strip()]
            result = next((x for x in lines if x.get("event") == "result"), None)
            if result is None:
                err = next((x.get("error") for x in lines if x.get("event") == "error"), None)
                raise ClientFailed(f"{p.name}: {err or p.log_tail()}")
            out.append(result)
    finally:
        for p in procs:
            reg.stop(p)
    return out


# -- scenarios --------------------------------------------------------------------------
@dataclass
class Ctx:
    """What every scenario needs."""

    args: argparse.Namespace
    reg: Registry
    logs: Path
    backends: dict[str, list[Backend]]
    proxies: dict[str, ProxySet]
    pss_per_session: dict[str, float] = field(default_factory=dict)
    redis: Any = None  # tests.redis_server.RedisServer, when a kind uses the Redis store
    #: The backends' tokens in the Redis store (issued by `vncmux token add`), by file token.
    redis_tokens: dict[str, str] = field(default_factory=dict)

    def tokens(self, mode: str) -> list[str]:
        """The tokens of every backend instance of a mode."""
        return [b.token for b in self.backends[mode]]

    def route(self, ps: ProxySet, mode: str) -> tuple[list[int], list[str]]:
        """(ports, tokens) that reach the backends of ``mode`` through ``ps``."""
        tokens = self.tokens(mode)
        if ps.spec.store == "redis":
            tokens = [self.redis_tokens[t] for t in tokens]
        return ps.route(tokens)

    def issue_redis_token(self, port: int) -> str:
        """A new token for a backend in the Redis store, with the operator's command."""
        out = subprocess.run(
            [venv_bin("vncmux"), "token", "add", "--tokens", self.redis.url(),
             "--host", "127.0.0.1", "--port", str(port), "--ttl", "86400"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        return out.split("token: ", 1)[1].split()[0]

    def backend_procs(self) -> list[Proc]:
        """Every backend process."""
        return [b.proc for bs in self.backends.values() for b in bs]


Measure = dict[str, Any]


class CpuSampler(threading.Thread):
    """
    ``--verify-cpu``: an independent lower bound of a proxy tree's CPU time.

    Every 10 ms it reads utime+stime of every group member and keeps the largest value seen
    per pid (children that live shorter than a sample are missed, so this can only be
    lower than the truth). The leader's own time is read directly at the end.
    """

    def __init__(self, ps: ProxySet) -> None:
        super().__init__(daemon=True)
        self.ps = ps
        self.stop_flag = threading.Event()
        self.start_ticks: dict[int, int] = {}
        self.max_ticks: dict[int, int] = {}

    def sample(self) -> None:
        """One pass over the process groups."""
        for inst in self.ps.instances:
            for pid in inst.members():
                st = read_stat(pid)
                if st is not None:
                    self.max_ticks[pid] = max(self.max_ticks.get(pid, 0), st.cpu_ticks)

    def run(self) -> None:
        """Sample until stopped."""
        self.sample()
        self.start_ticks = dict(self.max_ticks)
        while not self.stop_flag.wait(0.01):
            self.sample()

    def finish(self) -> float:
        """Stop; CPU seconds seen (children's growth plus the leaders' growth)."""
        self.stop_flag.set()
        self.join()
        self.sample()
        ticks = sum(v - self.start_ticks.get(pid, 0) for pid, v in self.max_ticks.items())
        return ticks / CLOCK_TICKS


@contextlib.contextmanager
def cpu_window(ctx: Ctx, ps: ProxySet, live: bool = False) -> Iterator[dict[str, float]]:
    """
    Proxy and backend CPU seconds spent inside the block (proxy quiescent at both ends;
    ``live``: sessions are open at both ends, so only their CPU time must have settled).
    """
    out: dict[str, float] = {}
    q0 = ps.quiesce(live=live)
    p0, b0, t0 = ps.cpu(), proc_cpu(ctx.backend_procs()), time.monotonic()
    sampler = CpuSampler(ps) if ctx.args.verify_cpu else None
    if sampler is not None:
        sampler.start()
    others0 = system_busy() - own_and_reaped_cpu()
    yield out
    if sampler is not None:
        out["proxy_cpu_sampled"] = sampler.finish()
    q1 = ps.quiesce(live=live)
    out["proxy_cpu"] = ps.cpu() - p0
    if sampler is not None:
        # everything the machine did, minus this script, its reaped clients and the backends
        others = system_busy() - own_and_reaped_cpu() - others0
        out["proxy_cpu_residual"] = others - (proc_cpu(ctx.backend_procs()) - b0)
    out["backend_cpu"] = proc_cpu(ctx.backend_procs()) - b0
    out["window"] = time.monotonic() - t0
    out["quiescent"] = float(q0 and q1)
    ps.check_alive()


def sc_bulk(ctx: Ctx, ps: ProxySet, direction: str) -> Measure:
    """Bulk throughput: ``down`` = backend→client (blast), ``up`` = client→backend (sink)."""
    a = ctx.args
    mode = "blast" if direction == "down" else "sink"
    argv = client_argv(
        f"bulk-{direction}",
        *ctx.route(ps, mode),
        raw=ps.raw,
        bytes=a.bulk_bytes,
        streams=a.streams,
        timeout=a.client_timeout,
    )
    with cpu_window(ctx, ps) as cpu:
        (res,) = run_clients(ctx.reg, ctx.logs, [argv], a.client_timeout + 10)
    secs = res["seconds"]
    mib = res["bytes"] / MiB
    return {
        "throughput": mib / secs,
        "per_cpu": mib / cpu["proxy_cpu"] if cpu["proxy_cpu"] > 0 else None,
        "util": util(cpu, res, secs),
        **cpu_fields(cpu),
    }


def cpu_fields(cpu: dict[str, float]) -> dict[str, float]:
    """The raw CPU figures kept in the JSON of every run."""
    keys = (
        "proxy_cpu",
        "proxy_cpu_sampled",
        "proxy_cpu_residual",
        "backend_cpu",
        "window",
        "quiescent",
    )
    return {k: cpu[k] for k in keys if k in cpu}


def util(cpu: dict[str, float], res: dict[str, Any], secs: float) -> dict[str, float]:
    """CPU use of proxy, backend and client as a fraction of one core over ``secs``."""
    return {
        "proxy": cpu["proxy_cpu"] / secs,
        "backend": cpu["backend_cpu"] / secs,
        "client": res["client_cpu"] / secs,
    }


def sc_latency(ctx: Ctx, ps: ProxySet) -> Measure:
    """Sequential small round trips through the echo backend."""
    a = ctx.args
    ports, tokens = ctx.route(ps, "echo")
    argv = client_argv(
        "latency",
        ports,
        tokens[:1],
        raw=ps.raw,
        count=a.rtt_count,
        duration=a.rtt_seconds,
        streams=1,
        timeout=a.client_timeout,
    )
    with cpu_window(ctx, ps) as cpu:
        (res,) = run_clients(ctx.reg, ctx.logs, [argv], a.client_timeout + 10)
    n = res["round_trips"]
    return {
        "rtt_p50": res["rtt_us"]["p50"],
        "rtt_p99": res["rtt_us"]["p99"],
        "cpu_per_rt": cpu["proxy_cpu"] / n * 1e6 if n else None,
        "util": util(cpu, res, res["client_wall"]),
        **cpu_fields(cpu),
    }


def sc_setup(ctx: Ctx, ps: ProxySet, clients: int = 0, inflight: int = 0) -> Measure:
    """
    Connection setup rate: several client processes, each with several workers (default
    ``--setup-clients`` and ``--setup-concurrency`` in all). The latencies of every
    connection are kept, for their distribution.
    """
    a = ctx.args
    n = clients or a.setup_clients
    per = max(1, (inflight or a.setup_concurrency) // n)
    ports, tokens = ctx.route(ps, "echo")
    argvs = [
        client_argv(
            "setup",
            ports[i % len(ports) :] + ports[: i % len(ports)],
            tokens[i % len(tokens) :] + tokens[: i % len(tokens)],
            raw=ps.raw,
            count=max(1, a.setup_count // n),
            duration=a.setup_seconds,
            concurrency=per,
            timeout=a.client_timeout,
        )
        for i in range(n)
    ]
    with cpu_window(ctx, ps) as cpu:
        results = run_clients(ctx.reg, ctx.logs, argvs, a.client_timeout + 10)
    done = sum(r["completed"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    span = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    client_cpu = sum(r["client_cpu"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    return {
        "rate": done / span,
        "setup_p50": percentile(latencies, 50) if latencies else None,
        "setup_p99": percentile(latencies, 99) if latencies else None,
        "latency_quantiles_ms": quantiles(latencies, 200) if latencies else [],
        "cpu_per_conn": cpu["proxy_cpu"] / done * 1e3 if done else None,
        "completed": done,
        "errors": errors,
        "util": {
            "proxy": cpu["proxy_cpu"] / span,
            "backend": cpu["backend_cpu"] / span,
            "client": client_cpu / span,
        },
        **cpu_fields(cpu),
    }


def sc_idle(ctx: Ctx, ps: ProxySet, sessions: int) -> Measure:
    """
    Memory per idle session and sessions per process, on freshly started proxies.

    Baseline (after one warm-up session per instance) → open ``sessions`` sessions with a
    full RFB handshake → wait until the process count is stable → Pss/Rss of every proxy
    process → one round trip on every session (all must answer) → close.
    """
    a = ctx.args
    per_process = -(-sessions // relay_processes(ps))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if descriptors_needed(per_process) > soft:
        raise Skipped(nofile_advice(per_process, soft))
    estimate = ctx.pss_per_session.get(ps.kind, 0.0) * sessions
    if estimate > 0.7 * mem_available_kib():
        raise Skipped(
            f"{sessions} sessions would need about {estimate / 2**20:.1f} GiB "
            f"(from the smaller size), more than 70% of MemAvailable"
        )
    ps.restart()
    ports, tokens = ctx.route(ps, "echo")
    warm = client_argv(
        "setup",
        ports,
        tokens,
        raw=ps.raw,
        count=2 * len(ports),
        concurrency=1,
        duration=10,
        timeout=30,
    )
    run_clients(ctx.reg, ctx.logs, [warm], 40)
    ps.quiesce()
    pss0, rss0, n0 = ps.memory()
    argv = client_argv(
        "idle",
        ports,
        tokens,
        raw=ps.raw,
        sessions=sessions,
        concurrency=a.idle_concurrency,
        open_timeout=a.idle_open_timeout,
        timeout=a.idle_open_timeout + 120,
    )
    proc = ctx.reg.start(
        "client-idle", argv, ctx.logs / "client.log", stdout=subprocess.PIPE, stdin=subprocess.PIPE
    )
    assert proc.popen.stdout is not None and proc.popen.stdin is not None
    try:
        ready = wait_event(proc, "ready", a.idle_open_timeout + 10, guard_memory=True)
        opened = ready["opened"]
        # settle: children done forking, process count stable for 1 s
        stable_since, last = time.monotonic(), ps.nprocs()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and time.monotonic() - stable_since < 1.0:
            time.sleep(0.2)
            now = ps.nprocs()
            if now != last:
                stable_since, last = time.monotonic(), now
        pss1, rss1, n1 = ps.memory()
        proc.popen.stdin.write(b"check\n")
        proc.popen.stdin.flush()
        checked = wait_event(proc, "checked", 120)
        proc.popen.stdin.write(b"close\n")
        proc.popen.stdin.flush()
        wait_event(proc, "result", 60)
    finally:
        ctx.reg.stop(proc)
    ps.check_alive()
    alive = checked["alive"]
    if alive < sessions:
        print(
            f"  ! {ps.kind}: {alive} of {sessions} sessions held; client errors: {ready['errors']}",
            file=sys.stderr,
        )
    if opened:
        per = (pss1 - pss0) / opened
        ctx.pss_per_session[ps.kind] = max(per, ctx.pss_per_session.get(ps.kind, 0.0))
    return {
        "pss_per_session": (pss1 - pss0) / opened if opened else None,
        "rss_per_session": (rss1 - rss0) / opened if opened else None,
        "sessions_per_process": alive / n1 if n1 else None,
        "sessions_per_instance": alive / len(ps.instances),
        "requested": sessions,
        "opened": opened,
        "alive": alive,
        "open_rate": opened / ready["open_seconds"] if ready["open_seconds"] else None,
        "baseline_pss_kib": pss0,
        "baseline_procs": n0,
        "procs": n1,
        "errors": ready["errors"],
    }


def wait_event(proc: Proc, event: str, timeout: float, guard_memory: bool = False) -> dict:
    """Read JSON lines from a client until ``event``; abort if memory runs low."""
    assert proc.popen.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = read_line(proc.popen.stdout, 0.5)
        if line:
            try:
                msg = json.loads(line)
            except ValueError:  # not an event: say it, and read on
                print(f"  ! {proc.name} wrote {line[:200]!r}", file=sys.stderr)
                continue
            if msg.get("event") == event:
                return msg
            if msg.get("event") == "error":
                raise ClientFailed(msg.get("error", "client error"))
        elif not proc.alive():
            raise ClientFailed(f"{proc.name} exited: {proc.log_tail()}")
        if guard_memory and mem_available_kib() < 1024 * 1024:
            raise ClientFailed("less than 1 GiB of memory left: stopped opening sessions")
    raise ClientFailed(f"{proc.name}: no '{event}' within {timeout:.0f} s")


def send_line(proc: Proc, line: str) -> None:
    """A command to a client on its stdin."""
    assert proc.popen.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it ended early: its output says why
        proc.popen.stdin.write(line.encode() + b"\n")
        proc.popen.stdin.flush()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of sorted values, linear between closest ranks."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def quantiles(sorted_values: Sequence[float], steps: int) -> list[float]:
    """``steps + 1`` evenly spaced percentiles, 0 to 100: a distribution small enough to keep."""
    return [round(percentile(sorted_values, 100 * i / steps), 3) for i in range(steps + 1)]


def session_bytes(total_mib: int, sessions: int) -> int:
    """Bytes per session when ``sessions`` share ``total_mib``: whole 64 KiB chunks, >= 1."""
    chunk = 64 * 1024
    return max(chunk, total_mib * MiB // sessions // chunk * chunk)


def start_bulk_many(
    ctx: Ctx, ps: ProxySet, mode: str, sessions: int, per_session: int, seconds: float
) -> tuple[Proc, dict]:
    """A ``bulk-many`` client with its sessions open (``ready`` read), waiting for ``go``."""
    a = ctx.args
    argv = client_argv(
        "bulk-many",
        *ctx.route(ps, mode),
        raw=ps.raw,
        bytes=per_session,
        streams=sessions,
        concurrency=a.idle_concurrency,
        open_timeout=a.idle_open_timeout,
        duration=seconds,
        timeout=a.idle_open_timeout + seconds + 30,
    )
    proc = ctx.reg.start(
        f"client-bulk-many-{sessions}",
        argv,
        ctx.logs / "client.log",
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    try:
        ready = wait_event(proc, "ready", a.idle_open_timeout + 10, guard_memory=True)
    except BaseException:
        ctx.reg.stop(proc)
        raise
    return proc, ready


def sc_sessions(ctx: Ctx, ps: ProxySet, sessions: int) -> Measure:
    """
    Backend→browser throughput with ``sessions`` at once: all are opened first, then all
    start their transfer together; the time runs until the last one has every byte of
    its share of ``--sessions-total-mib`` (each session's count is checked exactly). The
    proxy CPU is read around the transfer only, not the opening.
    """
    a = ctx.args
    per = session_bytes(a.sessions_total_mib, sessions)
    proc, ready = start_bulk_many(ctx, ps, f"blast-n{sessions}", sessions, per, a.client_timeout)
    try:
        with cpu_window(ctx, ps, live=True) as cpu:
            send_line(proc, "go")
            res = wait_event(proc, "done", a.client_timeout + 10)
        send_line(proc, "close")
        wait_event(proc, "result", 60)
    finally:
        ctx.reg.stop(proc)
    if res["complete"] < res["sessions"]:
        raise ClientFailed(
            f"{res['sessions'] - res['complete']} of {res['sessions']} open sessions did not"
            f" get exactly {per} bytes: {res['errors']}"
        )
    if res["sessions"] < sessions:
        print(
            f"  ! {ps.kind}: {res['sessions']} of {sessions} sessions opened: {ready['errors']}",
            file=sys.stderr,
        )
    return {
        "throughput_mb": res["bytes"] / MB / res["seconds"],
        "cpu_per_gb": cpu["proxy_cpu"] / (res["bytes"] / GB) if res["bytes"] else None,
        "sessions_ok": res["complete"],
        "requested": sessions,
        "bytes_per_session": per,
        "open_errors": ready["errors"],
        "util": util(cpu, res, res["seconds"]),
        **cpu_fields(cpu),
    }


def sc_rtt_paced(ctx: Ctx, ps: ProxySet, bulk: bool) -> Measure:
    """
    ``--rtt-sessions`` sessions sending ``--rtt-rate`` small messages a second each, every
    one echoed; with ``bulk``, while ``--rtt-bulk-sessions`` other sessions stream
    backend→browser as fast as they can (until the round trips are done).
    """
    a = ctx.args
    background: Proc | None = None
    bg_result: dict = {}
    if bulk:
        background, _ = start_bulk_many(
            ctx, ps, "blast-bg", a.rtt_bulk_sessions, BACKGROUND_BYTES, a.rtt_paced_seconds + 60
        )
        send_line(background, "go")
    try:
        ports, tokens = ctx.route(ps, "echo")
        argv = client_argv(
            "latency",
            ports,
            tokens,
            raw=ps.raw,
            count=int(2 * a.rtt_rate * a.rtt_paced_seconds * a.rtt_sessions) + 1,
            duration=a.rtt_paced_seconds,
            streams=a.rtt_sessions,
            rate=a.rtt_rate,
            warmup=5,
            timeout=a.client_timeout,
        )
        if background is None:
            with cpu_window(ctx, ps) as cpu:
                (res,) = run_clients(ctx.reg, ctx.logs, [argv], a.client_timeout + 10)
        else:  # the proxy's CPU time is the bulk's: not a figure of the round trips
            cpu: dict[str, float] = {}
            (res,) = run_clients(ctx.reg, ctx.logs, [argv], a.client_timeout + 10)
            send_line(background, "stop")
            bg_result = wait_event(background, "done", 60)
            send_line(background, "close")
            wait_event(background, "result", 60)
    finally:
        if background is not None:
            ctx.reg.stop(background)
    n = res["round_trips"]
    out: Measure = {
        "rtt_p50": res["rtt_us"]["p50"],
        "rtt_p99": res["rtt_us"]["p99"],
        "round_trips": n,
        **cpu_fields(cpu),
    }
    if bulk:
        out["bulk_mb_s"] = bg_result["bytes"] / MB / bg_result["seconds"]
    else:
        out["cpu_per_rt"] = cpu["proxy_cpu"] / n * 1e6 if n else None
    return out


#: Bytes a background bulk session asks for: more than it can get before it is stopped.
BACKGROUND_BYTES = 64 * 2**30


# -- fleet: K instances sharing one Redis ------------------------------------------------
class RevocationWatch(threading.Thread):
    """
    Subscribes to the store's revocation channel and notes when the revocation arrives:
    the moment every proxy of the fleet can learn it, the start of each session's timer.
    """

    def __init__(self, redis_client: Any, channel: str) -> None:
        super().__init__(daemon=True)
        self.pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel)
        self.pubsub.get_message(timeout=1.0)  # the subscription's confirmation: it is active
        self.seen_at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while self.seen_at is None and time.monotonic() < deadline:
            if self.pubsub.get_message(timeout=0.5) is not None:
                self.seen_at = time.monotonic()
        self.pubsub.close()


def sc_revoke(ctx: Ctx, ps: ProxySet) -> Measure:
    """
    ``--revoke-sessions`` sessions of one fresh token, spread evenly over the instances,
    each answering a round trip; then `vncmux token revoke`; every session's close is
    timed from the moment the revocation was published.
    """
    from vncmux.tokens import REVOKE_CHANNEL

    a = ctx.args
    token = ctx.issue_redis_token(ctx.backends["echo"][0].port)
    argv = client_argv(
        "idle",
        ps.ports,
        [token],
        sessions=a.revoke_sessions,
        concurrency=a.idle_concurrency,
        open_timeout=a.idle_open_timeout,
        close_wait=REVOKE_WAIT,
        timeout=a.idle_open_timeout + 120,
    )
    proc = ctx.reg.start(
        "client-revoke",
        argv,
        ctx.logs / "client.log",
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    try:
        ready = wait_event(proc, "ready", a.idle_open_timeout + 10, guard_memory=True)
        send_line(proc, "check")
        checked = wait_event(proc, "checked", 120)
        with ctx.redis.client() as client:
            watch = RevocationWatch(client, REVOKE_CHANNEL)
            watch.start()
            t0 = time.monotonic()
            subprocess.run(
                [venv_bin("vncmux"), "token", "revoke", token, "--tokens", ctx.redis.url()],
                capture_output=True, timeout=60, check=True,
            )  # fmt: skip
            t1 = time.monotonic()
            send_line(proc, "closes")
            closes = wait_event(proc, "closes", REVOKE_WAIT + 30)
            watch.join(5)
        send_line(proc, "close")
        wait_event(proc, "result", 60)
    finally:
        ctx.reg.stop(proc)
    if watch.seen_at is None:
        raise ClientFailed("the revocation was not seen on the store's channel")
    delays = sorted((c - watch.seen_at) * 1e3 for c in closes["closed_at"])
    return {
        "revoke_sessions": checked["alive"],
        "revoke_closed_4002": closes["codes"].get("4002", 0),
        "revoke_still_open": closes["still_open"],
        "revoke_p50_ms": percentile(delays, 50) if delays else None,
        "revoke_p99_ms": percentile(delays, 99) if delays else None,
        "revoke_last_ms": delays[-1] if delays else None,
        "revoke_codes": closes["codes"],
        "revoke_cli_s": t1 - t0,
        "revoke_published_after_s": watch.seen_at - t0,
        "opened": ready["opened"],
    }


#: Seconds a revocation's sessions get to close before the rest count as still open.
REVOKE_WAIT = 10.0


def sc_fleet(ctx: Ctx, ps: ProxySet) -> Measure:
    """One fleet round on K running instances: setup rate, bulk throughput, revocation."""
    a = ctx.args
    setup = sc_setup(ctx, ps)
    ports, tokens = ctx.route(ps, "blast")
    streams = max(a.fleet_streams, len(ps.instances))
    per = session_bytes(a.bulk_mib, streams)
    argv = client_argv(
        "bulk-down", ports, tokens, bytes=per, streams=streams, timeout=a.client_timeout
    )
    with cpu_window(ctx, ps) as cpu:
        (res,) = run_clients(ctx.reg, ctx.logs, [argv], a.client_timeout + 10)
    return {
        "setup_rate": setup["rate"],
        "setup_p99": setup["setup_p99"],
        "throughput_mb": res["bytes"] / MB / res["seconds"],
        "cpu_per_gb": cpu["proxy_cpu"] / (res["bytes"] / GB),
        "instances": len(ps.instances),
        **sc_revoke(ctx, ps),
    }


def run_fleet(
    ctx: Ctx, spec: KindSpec, failures: list[str], deadline: float
) -> dict[str, dict[str, list[Measure]]]:
    """``--rounds`` rounds; in each, every fleet size K (order rotated) on fresh instances."""
    a = ctx.args
    sizes = a.fleet_sizes
    runs: dict[str, dict[str, list[Measure]]] = {f"fleet_{k}": {spec.name: []} for k in sizes}
    for r in range(a.rounds):
        for k in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]:
            if time.monotonic() > deadline:
                failures.append(f"fleet_{k}: stopped in round {r + 1} (--max-minutes)")
                return runs
            ps = ProxySet(spec, k, Path(), ctx.logs, ctx.reg, list(a.vncmux_arg),
                          redis_url=ctx.redis.url())  # fmt: skip
            try:
                ps.start()
                m = sc_fleet(ctx, ps)
            except (ClientFailed, RuntimeError, subprocess.SubprocessError) as e:
                failures.append(f"fleet_{k} round {r + 1}: {e}")
                print(f"  ! {failures[-1]}", file=sys.stderr)
                continue
            finally:
                ps.stop()
            m["round"] = r + 1
            runs[f"fleet_{k}"][spec.name].append(m)
            brief = {mm.key: fmt(m.get(mm.key)) for mm in metrics_for(f"fleet_{k}")}
            print(f"  fleet_{k} round {r + 1}: {brief}", file=sys.stderr, flush=True)
    return runs


# -- metrics table ----------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    scenario: str
    key: str
    label: str
    unit: str
    higher_is_better: bool


def scenario_plan(args: argparse.Namespace) -> list[tuple[str, Callable[[Ctx, ProxySet], Measure]]]:
    """(name, function) for every selected scenario."""
    plan: list[tuple[str, Callable[[Ctx, ProxySet], Measure]]] = []
    wanted = set(args.scenarios.split(","))
    if "bulk_down" in wanted:
        plan.append(("bulk_down", lambda c, p: sc_bulk(c, p, "down")))
    if "bulk_up" in wanted:
        plan.append(("bulk_up", lambda c, p: sc_bulk(c, p, "up")))
    if "latency" in wanted:
        plan.append(("latency", sc_latency))
    if "setup" in wanted:
        plan.append(("setup", sc_setup))
    if "setup_dist" in wanted:
        plan.append(("setup_dist", lambda c, p: sc_setup(c, p, 1, c.args.setup_inflight)))
    if "sessions" in wanted:
        for n in args.session_counts:
            plan.append((f"sessions_{n}", lambda c, p, n=n: sc_sessions(c, p, n)))
    if "rtt_paced" in wanted:
        plan.append(("rtt_paced", lambda c, p: sc_rtt_paced(c, p, bulk=False)))
    if "rtt_paced_bulk" in wanted:
        plan.append(("rtt_paced_bulk", lambda c, p: sc_rtt_paced(c, p, bulk=True)))
    if "idle" in wanted:
        for s in args.idle_sessions:
            plan.append((f"idle_{s}", lambda c, p, s=s: sc_idle(c, p, s)))
    return plan


SCENARIOS = (
    "bulk_down", "bulk_up", "latency", "setup", "setup_dist", "sessions", "rtt_paced",
    "rtt_paced_bulk", "idle", "fleet",
)  # fmt: skip
DEFAULT_SCENARIOS = "bulk_down,bulk_up,latency,setup,idle"


def metrics_for(name: str) -> list[Metric]:
    """The table rows of one scenario."""
    if name.startswith("bulk"):
        return [
            Metric(name, "throughput", "throughput", "MiB/s", True),
            Metric(name, "per_cpu", "per proxy CPU-second", "MiB/CPU-s", True),
        ]
    if name == "latency":
        return [
            Metric(name, "rtt_p50", "round trip p50", "µs", False),
            Metric(name, "rtt_p99", "round trip p99", "µs", False),
            Metric(name, "cpu_per_rt", "proxy CPU per round trip", "µs", False),
        ]
    if name in ("setup", "setup_dist"):
        return [
            Metric(name, "rate", "connections per second", "conn/s", True),
            Metric(name, "setup_p50", "setup latency p50", "ms", False),
            Metric(name, "setup_p99", "setup latency p99", "ms", False),
            Metric(name, "cpu_per_conn", "proxy CPU per connection", "ms", False),
        ]
    if name.startswith("sessions_"):
        return [
            Metric(name, "throughput_mb", "throughput, all sessions", "MB/s", True),
            Metric(name, "cpu_per_gb", "proxy CPU per GB", "core-s", False),
            Metric(name, "sessions_ok", f"sessions with every byte, of {name[9:]}", "n", True),
        ]
    if name.startswith("rtt_paced"):
        rows = [
            Metric(name, "rtt_p50", "round trip p50", "µs", False),
            Metric(name, "rtt_p99", "round trip p99", "µs", False),
        ]
        if name == "rtt_paced_bulk":
            return [*rows, Metric(name, "bulk_mb_s", "background bulk, all sessions", "MB/s", True)]
        return [*rows, Metric(name, "cpu_per_rt", "proxy CPU per round trip", "µs", False)]
    if name.startswith("fleet_"):
        return [
            Metric(name, "setup_rate", "setups per second, all instances", "conn/s", True),
            Metric(name, "setup_p99", "setup latency p99", "ms", False),
            Metric(name, "throughput_mb", "bulk throughput, all instances", "MB/s", True),
            Metric(name, "revoke_p50_ms", "revocation: to a session's close p50", "ms", False),
            Metric(name, "revoke_p99_ms", "revocation: to a session's close p99", "ms", False),
            Metric(name, "revoke_last_ms", "revocation: to the last close", "ms", False),
            Metric(name, "revoke_closed_4002", "sessions closed with 4002", "n", True),
        ]
    return [
        Metric(name, "pss_per_session", "Pss per idle session", "KiB", False),
        Metric(name, "rss_per_session", "Rss per idle session", "KiB", False),
        Metric(name, "alive", f"sessions held, of {name[5:]} asked", "n", True),
        Metric(name, "sessions_per_instance", "sessions per proxy instance", "n", True),
        Metric(name, "sessions_per_process", "sessions per OS process", "n", True),
    ]


def summarize(values: list[float]) -> dict[str, float] | None:
    """median/min/max of the non-missing values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def paired_ratio(
    by_proxy: dict[str, list[Measure]], key: str, a: str = "vncmux", b: str = "websockify"
) -> float | None:
    """Median over rounds of a/b (vncmux/websockify), each round's two runs paired."""
    w_by_round = {m["round"]: m.get(key) for m in by_proxy.get(b, [])}
    ratios = []
    for m in by_proxy.get(a, []):
        v, w = m.get(key), w_by_round.get(m["round"])
        if v is not None and w:
            ratios.append(v / w)
    return statistics.median(ratios) if ratios else None


def fmt_ratio(r: float | None) -> str:
    """A ratio: three significant digits, no exponent."""
    if r is None:
        return "-"
    return f"{r:,.0f}" if r >= 100 else f"{r:.3g}" if r >= 0.001 else f"{r:.5f}"


def fmt(v: float | None) -> str:
    """A number with about three significant digits."""
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def reference_kind(kinds: Sequence[str]) -> str:
    """The kind every paired ratio is taken against: websockify if measured, else the last."""
    return REFERENCE if REFERENCE in kinds else kinds[-1]


def build_table(
    runs: dict[str, dict[str, list[Measure]]], kinds: Sequence[str]
) -> tuple[list, str]:
    """
    Rows for the JSON and the text table: per kind median/min/max; ``ratios``: each other
    kind's paired ratio to the reference kind; ``ratio``/``a_leads``: the first kind's.
    Kinds that only some scenarios measured (the fleet's) get columns too.
    """
    measured = {k for by in runs.values() for k, ms in by.items() if ms}
    kinds = [k for k in kinds if k in measured] + sorted(measured - set(kinds)) or list(kinds)
    ref = reference_kind(kinds)
    others = [k for k in kinds if k != ref]
    rows = []
    for scenario, by_proxy in runs.items():
        for m in metrics_for(scenario):
            row: dict[str, Any] = {
                "scenario": scenario,
                "metric": m.key,
                "label": m.label,
                "unit": m.unit,
                "better": "higher" if m.higher_is_better else "lower",
                "reference": ref,
            }
            for kind in kinds:
                row[kind] = summarize([r.get(m.key) for r in by_proxy.get(kind, [])])
            row["ratios"] = {k: paired_ratio(by_proxy, m.key, k, ref) for k in others}
            a, b = kinds[0], ref
            v, w = row.get(a), row.get(b)
            row["ratio_of_medians"] = (
                v["median"] / w["median"] if a != b and v and w and w["median"] else None
            )
            ratio = row["ratios"].get(a)
            row["ratio"] = ratio
            row["a_leads"] = (
                None if ratio is None or ratio == 1 else (ratio > 1) == m.higher_is_better
            )
            rows.append(row)
    head = f"{'scenario':<15} {'metric (unit)':<44} {'better':<6} "
    head += "".join(f"{k + ' median [min-max]':>32}" for k in kinds)
    head += "".join(f" {k + '/' + ref:>18}" for k in others)
    head += f"  {kinds[0]} leads" if others and kinds[0] != ref else ""
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = ""
        for k in kinds:
            st = row[k]
            cells += (
                f"{fmt(st['median']):>12} [{fmt(st['min'])}-{fmt(st['max'])}]".rjust(32)
                if st
                else f"{'-':>32}"
            )
        cells += "".join(f" {fmt_ratio(row['ratios'][k]):>18}" for k in others)
        lead = {True: "yes", False: "NO", None: "tie" if row["ratio"] == 1 else ""}[row["a_leads"]]
        lines.append(
            f"{row['scenario']:<15} {row['label'] + ' (' + row['unit'] + ')':<44} "
            f"{row['better']:<6} {cells}  {lead}"
        )
    return rows, "\n".join(lines)


def util_table(runs: dict[str, dict[str, list[Measure]]]) -> tuple[dict, str]:
    """Median CPU use (fraction of one core) of proxy, backend and client, per scenario."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    lines = [f"{'scenario':<11} {'proxy':<11} {'proxy':>7} {'backend':>8} {'client':>7}"]
    for scenario, by_proxy in runs.items():
        for kind, measures in by_proxy.items():
            us = [m["util"] for m in measures if m.get("util")]
            if not us:
                continue
            med = {k: statistics.median(u[k] for u in us) for k in ("proxy", "backend", "client")}
            out.setdefault(scenario, {})[kind] = med
            lines.append(
                f"{scenario:<11} {kind:<11} {med['proxy']:>7.2f} {med['backend']:>8.2f} "
                f"{med['client']:>7.2f}"
            )
    return out, "\n".join(lines)


# -- main -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options; ``--quick`` picks smaller sizes."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smaller sizes: about 3 minutes for both proxies"
    )
    p.add_argument("--rounds", type=int, default=5, help="A/B rounds per scenario (>= 1)")
    p.add_argument("--proxies", type=int, default=1, help="instances of each proxy")
    p.add_argument("--backends", type=int, default=1, help="backend processes per mode")
    p.add_argument("--only", metavar="KIND", help="measure one proxy kind (see --kinds)")
    p.add_argument(
        "--baseline",
        choices=("websockify", METRICS_ON),
        default="websockify",
        help="what vncmux (A, --metrics none) is compared with (B): websockify, or vncmux "
        "with its metrics endpoint on and scraped every second",
    )
    p.add_argument(
        "--kinds",
        help="comma-separated proxy kinds, measured in rotating order in every round: "
        f"{', '.join(BUILTIN_KINDS)} and the --variant names (default: vncmux, the variants,"
        " then the --baseline); ratios are paired against websockify when it is measured",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        type=lambda t: parse_variant(t, "file"),
        metavar="NAME=ARGS",
        help="a kind NAME: vncmux with these extra options, e.g. vncmux-w2=--workers=2",
    )
    p.add_argument(
        "--redis-variant",
        action="append",
        default=[],
        type=lambda t: parse_variant(t, "redis"),
        metavar="NAME=ARGS",
        help="the same with the Redis token store (a redis-server the run starts)",
    )
    p.add_argument(
        "--scenarios",
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default {DEFAULT_SCENARIOS})",
    )
    p.add_argument(
        "--session-counts",
        type=int_list,
        help="concurrent sessions of the sessions scenario (quick 1,10,100; full 1,10,100,1000)",
    )
    p.add_argument(
        "--sessions-total-mib",
        type=int,
        help="MiB the sessions of one sessions run share (quick 512, full 1024)",
    )
    p.add_argument("--rtt-sessions", type=int, default=100, help="sessions of rtt_paced")
    p.add_argument("--rtt-rate", type=float, default=10.0, help="messages/s per rtt session")
    p.add_argument("--rtt-paced-seconds", type=float, help="rtt_paced run time (quick 5, full 10)")
    p.add_argument(
        "--rtt-bulk-sessions", type=int, default=100, help="bulk sessions in rtt_paced_bulk"
    )
    p.add_argument("--setup-inflight", type=int, default=8, help="connections in setup_dist")
    p.add_argument(
        "--fleet-sizes", type=int_list, default=[1, 2, 4], help="instances K of the fleet"
    )
    p.add_argument(
        "--fleet-kind",
        default="vncmux-redis",
        help="the kind run K times for the fleet (vncmux-redis or a --redis-variant)",
    )
    p.add_argument("--fleet-streams", type=int, default=8, help="bulk streams over the fleet")
    p.add_argument(
        "--revoke-sessions", type=int, default=1000, help="sessions of the revoked token"
    )
    p.add_argument("--bulk-mib", type=int, help="MiB per bulk stream (quick 512, full 2048)")
    p.add_argument("--streams", type=int, default=1, help="parallel bulk streams")
    p.add_argument("--rtt-count", type=int, help="round trips per latency run")
    p.add_argument("--rtt-seconds", type=float, help="time limit per latency run")
    p.add_argument("--setup-count", type=int, help="connections per setup run (all clients)")
    p.add_argument("--setup-seconds", type=float, help="time limit per setup run")
    p.add_argument("--setup-clients", type=int, default=2, help="client processes for setup")
    p.add_argument("--setup-concurrency", type=int, default=16, help="workers, all clients")
    p.add_argument(
        "--idle-sessions",
        type=int_list,
        help="session counts for the memory scenario (quick 100,1000; full 100,1000,3000)",
    )
    p.add_argument("--idle-concurrency", type=int, default=32, help="sessions being opened at once")
    p.add_argument(
        "--idle-open-timeout", type=float, default=120.0, help="seconds to open all sessions"
    )
    p.add_argument(
        "--client-timeout", type=float, default=120.0, help="hard limit per client run, seconds"
    )
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop starting new rounds")
    p.add_argument("--vncmux-arg", action="append", default=[], help="extra vncmux option")
    p.add_argument("--websockify-arg", action="append", default=[], help="extra websockify option")
    p.add_argument(
        "--backend-arg",
        action="append",
        default=[],
        help="extra backend.py option, e.g. --vencrypt (VeNCrypt TLSNone: needs --only vncmux"
        " with --vncmux-arg=--auth-schemes=vencrypt; websockify speaks no VeNCrypt)",
    )
    p.add_argument(
        "--verify-cpu",
        action="store_true",
        help="also sample every proxy process every 10 ms and report both CPU figures",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    a = p.parse_args(argv)
    q = a.quick
    a.bulk_mib = a.bulk_mib or (512 if q else 2048)
    a.bulk_bytes = a.bulk_mib * MiB
    a.rtt_count = a.rtt_count or (5000 if q else 20000)
    a.rtt_seconds = a.rtt_seconds or (4.0 if q else 10.0)
    a.setup_count = a.setup_count or (1500 if q else 5000)
    a.setup_seconds = a.setup_seconds or (4.0 if q else 10.0)
    a.idle_sessions = a.idle_sessions or ([100, 1000] if q else [100, 1000, 3000])
    a.session_counts = a.session_counts or ([1, 10, 100] if q else [1, 10, 100, 1000])
    a.sessions_total_mib = a.sessions_total_mib or (512 if q else 1024)
    a.rtt_paced_seconds = a.rtt_paced_seconds or (5.0 if q else 10.0)
    if a.rounds < 1 or a.proxies < 1 or a.backends < 1:
        p.error("--rounds, --proxies and --backends must be at least 1")
    unknown = set(a.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    a.specs = dict(BUILTIN_KINDS) | {v.name: v for v in a.variant + a.redis_variant}
    a.kinds = select_kinds(a, p)
    if (
        "fleet" in a.scenarios.split(",")
        and a.specs.get(a.fleet_kind, KindSpec("", "")).store != "redis"
    ):
        p.error(
            "--fleet-kind must name a kind with the Redis store (vncmux-redis, --redis-variant)"
        )
    return a


def int_list(text: str) -> list[int]:
    """``1,10,100`` as a list of positive integers."""
    values = [int(x) for x in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def select_kinds(a: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[str, ...]:
    """The kinds measured, from --kinds, --only, the variants and --baseline."""
    if a.kinds:
        kinds = tuple(a.kinds.split(","))
    elif a.only:
        kinds = (a.only,)
    else:
        kinds = ("vncmux", *(v.name for v in a.variant + a.redis_variant), a.baseline)
    unknown = [k for k in kinds if k not in a.specs]
    if unknown or len(set(kinds)) != len(kinds):
        p.error(f"kinds {', '.join(kinds)}: each once, from {', '.join(a.specs)}")
    return kinds


def environment(args: argparse.Namespace, kinds: Sequence[str]) -> dict[str, Any]:
    """What the figures were measured on."""
    from importlib import metadata

    versions = {}
    for pkg in ("vncmux", "websockify", "numpy", "Twisted", "autobahn", "wsaccel"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "command": " ".join([".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]]),
        "proxies_measured": list(kinds),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "git_head": commit,
        "loadavg_at_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "specs", "variant", "redis_variant")
        },
        "kind_specs": {
            name: dataclasses.asdict(spec)
            for name, spec in args.specs.items()
            if name in kinds or name == args.fleet_kind
        },
    }


def start_redis_server() -> Any:
    """A real redis-server on a free loopback port, as the integration tests start one."""
    from tests.redis_server import INSTALL_HINT, RedisServer, find_redis_server

    binary = find_redis_server()
    if binary is None:
        raise SystemExit(INSTALL_HINT)
    server = RedisServer(binary)
    server.start()
    return server


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    args = parse_args(argv)
    kinds: tuple[str, ...] = args.kinds
    wanted = set(args.scenarios.split(","))
    if not (REPO / "vncmux" / "tap.py").exists():
        print("vncmux/tap.py not found: measuring websockify and socat only", file=sys.stderr)
        kinds = tuple(k for k in kinds if args.specs[k].program != "vncmux") or ("websockify",)
        wanted.discard("fleet")
    largest = max(
        [*(args.idle_sessions if "idle" in wanted else []),
         *(args.session_counts if "sessions" in wanted else []),
         *([args.revoke_sessions] if "fleet" in wanted else []), 1]
    )  # fmt: skip
    soft = raise_nofile(descriptors_needed(largest))
    if soft < descriptors_needed(largest):
        print(f"! RLIMIT_NOFILE: {nofile_advice(largest, soft)}; the sizes that do not fit"
              " in one proxy process (or worker) are skipped", file=sys.stderr)  # fmt: skip
    use_redis = "fleet" in wanted or any(args.specs[k].store == "redis" for k in kinds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    deadline = time.monotonic() + args.max_minutes * 60
    reg = Registry()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    runs: dict[str, dict[str, list[Measure]]] = {}
    failures: list[str] = []
    skipped: list[str] = []
    env = environment(args, kinds)
    redis = None
    try:
        modes = {"echo": ("echo", args.bulk_bytes), "sink": ("sink", args.bulk_bytes),
                 "blast": ("blast", args.bulk_bytes)}  # fmt: skip
        if "sessions" in wanted:
            for n in args.session_counts:
                modes[f"blast-n{n}"] = ("blast", session_bytes(args.sessions_total_mib, n))
        if "rtt_paced_bulk" in wanted:
            modes["blast-bg"] = ("blast", BACKGROUND_BYTES)
        backends = {
            label: [
                start_backend(reg, logs, mode, i, size, args.backend_arg, label)
                for i in range(args.backends)
            ]
            for label, (mode, size) in modes.items()
        }
        with tempfile.NamedTemporaryFile(
            "w", dir=RESULTS, prefix="tokens-", suffix=".txt", delete=False
        ) as tf:
            for bs in backends.values():
                for b in bs:
                    tf.write(f"{b.token}: 127.0.0.1:{b.port}\n")
        token_file = Path(tf.name)
        ctx = Ctx(args, reg, logs, backends, {})
        if use_redis:
            redis = start_redis_server()
            ctx.redis = redis
            for bs in backends.values():
                for b in bs:
                    ctx.redis_tokens[b.token] = ctx.issue_redis_token(b.port)
        all_backends = [b for bs in backends.values() for b in bs]
        proxies = {
            k: ProxySet(
                args.specs[k],
                args.proxies,
                token_file,
                logs,
                reg,
                extra=args.websockify_arg if k == "websockify" else args.vncmux_arg,
                backends=all_backends,
                redis_url=redis.url() if redis is not None else None,
            )
            for k in kinds
        }
        ctx.proxies = proxies
        plan = scenario_plan(args)
        for ps in proxies.values() if plan else ():
            ps.start()
        if METRICS_ON in proxies:
            scraper = Scraper(proxies[METRICS_ON], deadline)
            scraper.start()
            env["scrapes"] = scraper.counts
        for name, fn in plan:
            runs[name] = {k: [] for k in kinds}
            for r in range(args.rounds):
                if time.monotonic() > deadline:
                    failures.append(f"{name}: stopped after {r} rounds (--max-minutes)")
                    break
                # rotating order: A B C, B C A, C A B, ... (A B, B A for two kinds)
                order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
                for kind in order:
                    try:
                        m = fn(ctx, proxies[kind])
                    except Skipped as e:
                        skipped.append(f"{name} round {r + 1} {kind}: {e}")
                        print(f"  - {skipped[-1]}", file=sys.stderr)
                        continue
                    except (ClientFailed, RuntimeError) as e:
                        failures.append(f"{name} round {r + 1} {kind}: {e}")
                        print(f"  ! {failures[-1]}", file=sys.stderr)
                        if not all(i.proc.alive() for i in proxies[kind].instances):
                            proxies[kind].restart()
                        continue
                    m["round"] = r + 1
                    runs[name][kind].append(m)
                    brief = {mm.key: fmt(m.get(mm.key)) for mm in metrics_for(name)}
                    print(f"  {name} round {r + 1} {kind}: {brief}", file=sys.stderr, flush=True)
        if "fleet" in wanted:
            for ps in proxies.values():  # the fleet has the cores to itself
                ps.stop()
            runs.update(run_fleet(ctx, args.specs[args.fleet_kind], failures, deadline))
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        reg.stop_all()
        if redis is not None:
            redis.cleanup()
        for tf_path in RESULTS.glob("tokens-*.txt"):
            tf_path.unlink()
    rows, table = build_table(runs, kinds)
    utils, util_text = util_table(runs)
    print(table)
    print("\nCPU use, fraction of one core (median over rounds):")
    print(util_text)
    if skipped:
        print("\nskipped:\n  " + "\n  ".join(skipped))
    if failures:
        print("\nfailures:\n  " + "\n  ".join(failures))
    doc = {
        "environment": env,
        "table": rows,
        "cpu_use": utils,
        "runs": runs,
        "failures": failures,
        "skipped": skipped,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
