"""``--workers N``: one ``twistd vncmux`` that runs N worker processes and stays one service.

The parent makes the console listeners' sockets (N ``SO_REUSEPORT`` sockets on one address
for ``tcp:``/``ssl:``, so the kernel spreads new connections over the workers; see
docs/architecture.md, "Workers") and starts each worker with its own socket. It never
carries session bytes. It keeps its copies of the sockets, so connections that arrive while
a worker restarts wait in that socket's backlog. Each worker is today's single process on an
adopted socket (L{vncmux.worker}), connected to the parent by AMP over a socket pair:

- workers ask the parent for a place under C{--max-sessions}, per client and per token
  (L{Claim}, L{GiveBack}); the parent counts them for all (L{SharedPlaces}) and gives back
  every place of a worker that died;
- the parent serves the one metrics port: C{/metrics} asks every worker for its samples
  (L{Collect}) and sums them (L{merge_families}); the admin API reaches every worker's
  sessions (L{WorkerSessions}); C{/readyz} is ready when every worker listens (L{Listening});
- SIGTERM: no more restarts, every worker drains as a single process does, the parent exits
  once all have; a worker that dies otherwise is restarted, with a growing delay.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import ProcessProtocol, connectionDone
from twisted.logger import ILogObserver, Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from vncmux.admin import admin_resources, read_admin_secret
from vncmux.backendpolicy import BackendPolicy
from vncmux.firstrun import http_url
from vncmux.fleet import FleetSessions
from vncmux.hangup import ReloadOnHangup
from vncmux.health import Liveness, Readiness, within
from vncmux.interfaces import ISessionDirectory, ITokenStore
from vncmux.observability import HTTP_TIMEOUT, QuietSite, Root
from vncmux.refusals import Refused
from vncmux.service import Listener, open_store
from vncmux.settings import Limits
from vncmux.supervisor import PlaceCounter
from vncmux.tls import endpoint_arguments, load_vencrypt_tls, tls_listener
from vncmux.tokens import RedisTokenStore

if TYPE_CHECKING:
    from vncmux.settings import Settings
    from vncmux.tap import Options

#: A worker's AMP control channel, as the worker sees it.
CONTROL_FD = 3
#: Seconds a worker has to answer the parent at a scrape or an admin request.
WORKER_ANSWER_TIMEOUT = 2.0
#: Restart delays of a worker that keeps dying: the first, and the most.
FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
#: A worker that ran this long before it died is restarted after the first delay again.
STABLE_AFTER = 60.0
#: Seconds the parent waits for its workers beyond their drain and close timeouts.
STOP_MARGIN = 5.0

# -- the control channel ----------------------------------------------------------------


class LongJSON(amp.Argument):
    """
    A JSON value of any size: AMP values stop at 64 KiB, so a long one is cut into
    C{name}, C{name.1}, C{name.2}... (a worker's session list, its metric samples).
    """

    CHUNK = amp.MAX_VALUE_LENGTH

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        encoded = json.dumps(objects.pop(name.decode("ascii"))).encode("utf-8")
        chunks = [encoded[i : i + self.CHUNK] for i in range(0, len(encoded), self.CHUNK)]
        for number, chunk in enumerate(chunks or [b""]):
            strings[name if number == 0 else name + b".%d" % number] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        parts = [strings.pop(name)]
        number = 1
        while (key := name + b".%d" % number) in strings:
            parts.append(strings.pop(key))
            number += 1
        objects[name.decode("ascii")] = json.loads(b"".join(parts))


class PlaceRefused(Exception):
    """The parent's answer to a L{Claim} over a limit; its argument is the operator's detail."""


class Claim(amp.Command):
    """Worker to parent: count one more session (L{SharedPlaces.claim})."""

    arguments = [
        (b"token_hash", amp.Unicode()),
        (b"token_id", amp.Unicode()),
        (b"record_limit", amp.Integer(optional=True)),
        (b"client", amp.Unicode()),
    ]
    response = [(b"place", amp.Integer())]
    errors = {PlaceRefused: b"TOO_MANY_SESSIONS"}


class GiveBack(amp.Command):
    """Worker to parent: a session's place is free again."""

    arguments = [(b"place", amp.Integer())]
    requiresAnswer = False


class Listening(amp.Command):
    """Worker to parent: every console listener of the worker accepts now."""


class Collect(amp.Command):
    """Parent to worker: the worker's metric families (L{families_json})."""

    response = [(b"families", LongJSON())]


class ListSessions(amp.Command):
    """Parent to worker: its live sessions (L{ISessionDirectory.list_sessions})."""

    response = [(b"sessions", LongJSON())]


class GetSession(amp.Command):
    """Parent to worker: one session, or null."""

    arguments = [(b"session_id", amp.Unicode())]
    response = [(b"session", LongJSON())]


class EndSession(amp.Command):
    """Parent to worker: end one session with 4002; whether it was live there."""

    arguments = [(b"session_id", amp.Unicode())]
    response = [(b"ended", amp.Boolean())]


class Revoke(amp.Command):
    """Parent to worker: end the sessions of a revoked token hash or ``instance:<uuid>``."""

    arguments = [(b"message", amp.Unicode())]
    response = [(b"ended", amp.Integer())]


def families_json(families: Iterable[Metric]) -> list[dict[str, Any]]:
    """Metric families as JSON: name, type, help and C{[name, labels, value]} samples."""
    return [
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
        for family in families
    ]


def merge_families(by_worker: Mapping[str, list[dict[str, Any]]]) -> list[Metric]:
    """
    One set of families from every worker's (L{families_json}): samples with the same name
    and labels are summed (counters, gauges, histogram buckets, sums and counts), except
    the process metrics (``process_*``), which keep one series per worker with a
    C{worker} label.
    """
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, families in by_worker.items():
        for family in families:
            name = family["name"]
            if name not in merged:
                merged[name] = Metric(name, family["help"], family["type"])
                sums[name] = {}
            per_worker = name.startswith("process_")
            for sample_name, labels, value in family["samples"]:
                if per_worker:
                    labels = {**labels, "worker": worker}
                key = (sample_name, tuple(labels.items()))
                sums[name][key] = sums[name].get(key, 0.0) + value
    for name, metric in merged.items():
        for (sample_name, labels), value in sums[name].items():
            metric.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


# -- the parent's side ----------------------------------------------------------------


class SharedPlaces:
    """
    The parent's count of every worker's sessions against the limits (the same
    L{PlaceCounter} as one process's), and which worker holds which place, so that the
    places of a worker that died are given back.
    """

    def __init__(self, counter: PlaceCounter) -> None:
        self.counter = counter
        self._held: dict[int, tuple[int, str, str]] = {}
        self._next_place = 0

    @property
    def limits(self) -> Limits:
        """The limits counted against (C{/readyz} reads C{max_sessions})."""
        return self.counter.limits

    @property
    def reserved(self) -> int:
        """Sessions counted for every worker (C{/readyz} compares it with the limit)."""
        return self.counter.reserved

    def claim(
        self, worker: int, token_hash: str, token_id: str, record_limit: int | None, client: str
    ) -> int:
        """Count one session of C{worker}; its place number, or L{Refused}."""
        self.counter.take(token_hash, token_id, record_limit, client)
        self._next_place += 1
        self._held[self._next_place] = (worker, token_hash, client)
        return self._next_place

    def give_back(self, place: int) -> None:
        """Uncount one place (an unknown or already given back one is ignored)."""
        held = self._held.pop(place, None)
        if held is not None:
            self.counter.give_back(held[1], held[2])

    def worker_gone(self, worker: int) -> int:
        """Give back every place C{worker} held; how many."""
        places = [place for place, held in self._held.items() if held[0] == worker]
        for place in places:
            self.give_back(place)
        return len(places)


class TypedAMP(amp.AMP):
    """An AMP end whose calls mypy can follow (C{callRemote} is not annotated)."""

    def call(self, command: type[amp.Command], **arguments: Any) -> Deferred[dict[str, Any]]:
        answer: Deferred[dict[str, Any]] = self.callRemote(command, **arguments)  # type: ignore[no-untyped-call]  # python/mypy#16651
        return answer


class ParentControl(TypedAMP):
    """The parent's end of one worker's control channel."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self.worker = worker

    @Claim.responder
    def claim(
        self, token_hash: str, token_id: str, record_limit: int | None, client: str
    ) -> dict[str, int]:
        try:
            place = self.worker.parent.places.claim(
                self.worker.index, token_hash, token_id, record_limit, client
            )
        except Refused as e:
            raise PlaceRefused(e.detail) from None
        return {"place": place}

    @GiveBack.responder
    def give_back(self, place: int) -> dict[str, Any]:
        self.worker.parent.places.give_back(place)
        return {}

    @Listening.responder
    def listening(self) -> dict[str, Any]:
        self.worker.listening = True
        self.worker.parent.worker_listening(self.worker)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # python/mypy#16653
        self.worker.listening = False
        if self.worker.control is self:
            self.worker.control = None


class WorkerProcess(ProcessProtocol):
    """One worker process: its log lines into the parent's log, its end to the parent."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self.worker.parent.worker_line(self.worker, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self.worker.parent.worker_line(self.worker, fd, rest)
        self.worker.parent.worker_ended(self.worker, reason)


@dataclass(eq=False)
class Worker:
    """What the parent knows of worker C{index}, across its restarts."""

    parent: WorkerParent
    index: int
    process: Any = None
    pid: int | None = None
    started_at: float = 0.0
    control: ParentControl | None = None
    listening: bool = False
    restarts: int = 0
    restart_delay: float = 0.0
    restart_call: IDelayedCall | None = None
    ended: Deferred[None] | None = None


@dataclass(frozen=True)
class SharedSocket:
    """A console listener's sockets: one per worker, or one that every worker shares."""

    console_type: str
    sockets: tuple[socket.socket, ...]
    #: Why the workers share one socket where they could have had one each.
    note: str = ""

    @property
    def how(self) -> str:
        """How the workers share the port, for the log."""
        if len(self.sockets) > 1:
            return "SO_REUSEPORT"
        return "one shared socket" + (f" ({self.note})" if self.note else "")

    def for_worker(self, index: int) -> socket.socket:
        return self.sockets[index % len(self.sockets)]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def listener_sockets(console_type: str, description: str, count: int) -> SharedSocket:
    """
    The listening sockets of one console listener for C{count} workers.

    ``tcp:``, ``tcp6:`` and ``ssl:`` (TLS is the workers' business): C{count} sockets with
    C{SO_REUSEPORT} on the same address; with port 0 the first picks the port. ``systemd:``:
    the inherited socket; when the socket unit set C{ReusePort=yes}, C{count - 1} more on
    its address, else every worker shares the one socket. Anything else: C{ValueError}.
    """
    kind, positional, named = endpoint_arguments(description)
    if kind == "systemd":
        return _systemd_sockets(console_type, description, count)
    if kind not in ("tcp", "tcp6", "ssl"):
        raise ValueError(
            f"--workers above 1 needs tcp:, tcp6:, ssl: or systemd: console listeners, not"
            f" {description!r} (the workers share a listening socket; run a single process)"
        )
    port = int(named.get("port") or (positional[0] if positional else "0"))
    interface = named.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    backlog = int(named.get("backlog", "50"))
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ValueError(f"cannot listen on {description}: {e}") from None
    return SharedSocket(console_type, tuple(sockets))


def _systemd_sockets(console_type: str, description: str, count: int) -> SharedSocket:
    """
    The socket systemd passed (Twisted's own parser found it, and took the variables that
    announced it out of the environment), and its SO_REUSEPORT siblings when the socket
    unit set ReusePort=yes. Linux lets only the user that made a SO_REUSEPORT socket add
    siblings to it: systemd made it as root, so a service with another User= shares it.
    """
    try:
        endpoint = serverFromString(None, description)
    except (IndexError, KeyError) as e:
        raise ValueError(f"{description}: no such socket was passed by systemd ({e})") from None
    fd = os.dup(endpoint.fileno)  # Twisted's copy stays for a worker of --workers 1
    inherited = socket.socket(endpoint.addressFamily, socket.SOCK_STREAM, fileno=fd)
    if not inherited.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        return SharedSocket(console_type, (inherited,))
    siblings: list[socket.socket] = []
    try:
        for _ in range(count - 1):
            sock = socket.socket(inherited.family, socket.SOCK_STREAM)
            siblings.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(inherited.getsockname())
            sock.listen(socket.SOMAXCONN)
    except OSError as e:
        for sock in siblings:
            sock.close()
        note = f"SO_REUSEPORT siblings refused ({e.strerror}: the socket is another user's)"
        return SharedSocket(console_type, (inherited,), note)
    return SharedSocket(console_type, (inherited, *siblings))


class WorkerParent(MultiService):
    """
    The ``twistd vncmux`` process of C{--workers N}: starts, restarts and stops the workers,
    counts their sessions against the limits and serves the metrics port for all of them.
    """

    def __init__(
        self,
        settings: Settings,
        arguments: list[str],
        count: int,
        sockets: list[SharedSocket],
        reactor: Any,
        *,
        log_observer: ILogObserver = globalLogPublisher,
        executable: str = sys.executable,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self.settings = settings
        self.arguments = arguments
        self.reactor = reactor
        self.sockets = sockets
        self.places = SharedPlaces(PlaceCounter(settings.limits, "workers' (all together)"))
        self.workers = [Worker(self, index) for index in range(count)]
        self.restarts_total = 0
        self.stopping = False
        self._log_observer = log_observer
        self._log = Logger(observer=log_observer)
        self._executable = executable
        self._process_metrics = ProcessCollector(registry=None)
        self.metrics_listener: Listener | None = None

    @classmethod
    def from_options(cls, config: Options, reactor: Any) -> WorkerParent:
        """
        The parent for C{config}: its sockets, and its metrics port when it has one. What a
        worker would only find at its start (token store URL, TLS and VeNCrypt files, the
        admin secret) is checked here first, so that a mistake stops the start, as it does
        without workers, instead of making every worker exit and restart.
        """
        settings = config.settings()
        store = _checked_store(settings, reactor)
        secret_file = config["admin-token-file"]
        secret = read_admin_secret(secret_file) if secret_file else None
        count = config["workers"]
        sockets: list[SharedSocket] = []
        try:
            for console_type, description in settings.listeners:
                sockets.append(listener_sockets(console_type, description, count))
        except ValueError:
            for made in sockets:
                made.close()
            raise
        parent = cls(settings, config.arguments, count, sockets, reactor)
        if settings.metrics is not None:
            parent.build_metrics_port(store, secret, config["base-url"])
        hangup = ReloadOnHangup(reactor, [parent.reload_workers])
        hangup.setServiceParent(parent)  # type: ignore[no-untyped-call]  # python/mypy#16651
        return parent

    def build_metrics_port(self, store: ITokenStore, secret: bytes | None, base_url: str) -> None:
        """The one metrics port (with the admin API when there is a C{secret}), with the
        parent's own handle on the token store (for /readyz and for issuing tokens)."""
        settings = self.settings
        assert settings.metrics is not None
        if IService.providedBy(store):
            IService(store).setServiceParent(self)
        root = Root()  # type: ignore[no-untyped-call]  # python/mypy#16651
        root.putChild(b"metrics", MergedMetricsPage(self))
        root.putChild(b"healthz", Liveness())  # type: ignore[no-untyped-call]  # python/mypy#16651
        root.putChild(b"readyz", Readiness(store, self.reactor, self.all_listening, self.places))
        if secret:
            policy = BackendPolicy.for_reactor(
                self.reactor, settings.allowed_backends, settings.connect_timeout
            )
            pages = admin_resources(
                secret, self.directory(store), store, self.reactor, base_url, backend_policy=policy
            )
            for name, page in pages.items():
                root.putChild(name, page)
        site = QuietSite(root, timeout=HTTP_TIMEOUT, reactor=self.reactor)  # type: ignore[no-untyped-call]  # python/mypy#16651
        self.metrics_listener = Listener(settings.metrics, site, self.reactor)
        self.metrics_listener.tls_min_version = settings.tls_min_version
        self.metrics_listener.setServiceParent(self)  # type: ignore[no-untyped-call]  # python/mypy#16651

    def directory(self, store: ITokenStore) -> ISessionDirectory:
        """The admin API's sessions: with the fleet view on (a Redis store), every instance's,
        these workers' included (each is an instance of its own); else every worker's."""
        if isinstance(store, RedisTokenStore) and self.settings.fleet_heartbeat:
            return FleetSessions(store)
        return WorkerSessions(self)

    # -- workers ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        for shared in self.sockets:
            port = shared.sockets[0].getsockname()
            self._log.info(
                "console listener {console_type} on {address}: {count} workers, {how}",
                console_type=shared.console_type,
                address=_address(port),
                count=len(self.workers),
                how=shared.how,
                vncmux_event="workers_listening",
                port=port[1],
            )
        if self.metrics_listener is not None:
            listener = self.metrics_listener
            listener.listening().addCallback(self._tell_metrics, listener.tls is not None)
        for worker in self.workers:
            self.start_worker(worker)

    def _tell_metrics(self, port: IListeningPort, secure: bool) -> None:
        self._log.info(
            "metrics of every worker: {url}metrics",
            url=http_url(port, secure),
            vncmux_event="metrics_listening",
        )

    def worker_argv(self, worker: Worker) -> tuple[list[str], dict[int, Any]]:
        """The worker's command line and descriptors: control channel, then its sockets."""
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        argv = [self._executable, "-m", "vncmux.worker", str(worker.index)]
        fd = CONTROL_FD + 1
        for shared in self.sockets:
            sock = shared.for_worker(worker.index)
            child_fds[fd] = sock.fileno()
            argv.append(f"{shared.console_type}={fd}:{int(sock.family)}")
            fd += 1
        return [*argv, "--", *self.arguments], child_fds

    def start_worker(self, worker: Worker) -> None:
        """Spawn worker C{worker.index} with its end of a fresh control channel."""
        worker.restart_call = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv, child_fds = self.worker_argv(worker)
        child_fds[CONTROL_FD] = theirs.fileno()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        worker.started_at = self.reactor.seconds()
        try:
            worker.process = self.reactor.spawnProcess(
                WorkerProcess(worker), self._executable, argv, env=env, childFDs=child_fds
            )
        except OSError as e:  # out of processes or memory: try again later
            ours.close()
            self._restart_later(worker, None, f"could not be started ({e})", 0)
            return
        finally:
            theirs.close()
        worker.pid = worker.process.pid
        worker.ended = Deferred()
        worker.control = ParentControl(worker)
        ours.setblocking(False)
        self.reactor.adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, OneProtocol(worker.control)
        )
        ours.close()

    def worker_listening(self, worker: Worker) -> None:
        self._log.info(
            "worker {index} (pid {pid}) is listening",
            index=worker.index,
            pid=worker.pid,
            vncmux_event="worker_listening",
        )

    def all_listening(self) -> bool:
        """Whether every worker accepts connections (C{/readyz})."""
        return not self.stopping and all(w.listening for w in self.workers)

    def worker_ended(self, worker: Worker, reason: Failure) -> None:
        """Give back its places; restart it unless the parent is stopping."""
        pid, worker.process, worker.listening = worker.pid, None, False
        freed = self.places.worker_gone(worker.index)
        ended, worker.ended = worker.ended, None
        if ended is not None:
            ended.callback(None)
        how = _exit_description(reason)
        if self.stopping:
            self._log.info(
                "worker {index} (pid {pid}) {how}", index=worker.index, pid=pid, how=how,
                vncmux_event="worker_stopped",
            )  # fmt: skip
            return
        self._restart_later(worker, pid, how, freed)

    def _restart_later(self, worker: Worker, pid: int | None, how: str, freed: int) -> None:
        """Log why worker C{worker.index} ended and start it again after a delay that
        doubles while it keeps ending soon after its start."""
        lived = self.reactor.seconds() - worker.started_at
        if lived >= STABLE_AFTER or not worker.restart_delay:
            worker.restart_delay = FIRST_RESTART_DELAY
        else:
            worker.restart_delay = min(worker.restart_delay * 2, MAX_RESTART_DELAY)
        worker.restarts += 1
        self.restarts_total += 1
        self._log.error(
            "worker {index} (pid {pid}) {how}; {freed} session places given back; restart"
            " {restarts} in {delay:g}s",
            index=worker.index,
            pid=pid,
            how=how,
            freed=freed,
            restarts=worker.restarts,
            delay=worker.restart_delay,
            vncmux_event="worker_restart",
        )
        worker.restart_call = self.reactor.callLater(
            worker.restart_delay, self.start_worker, worker
        )

    def worker_line(self, worker: Worker, fd: int, line: bytes) -> None:
        """A line a worker wrote: a JSON log event, republished tagged with the worker, or
        plain text (a traceback before its logging started), logged as such."""
        text = line.lstrip(b"\x1e").decode("utf-8", "replace").rstrip()
        if not text:
            return
        try:
            event = eventFromJSON(text)
        except ValueError:
            event = None
        if not isinstance(event, dict) or "log_level" not in event:
            level = LogLevel.warn if fd == 2 else LogLevel.info
            self._log.emit(
                level, "worker {index}: {line}", index=worker.index, line=text,
                vncmux_worker=worker.index,
            )  # fmt: skip
            return
        level = event.get("log_level")
        event["vncmux_worker"] = worker.index
        event["log_system"] = (
            f"{event.get('log_namespace', '-')}#{getattr(level, 'name', 'info')}"
            f" worker {worker.index}"
        )
        self._log_observer(event)

    def reload_workers(self) -> None:
        """SIGHUP (systemctl reload) reaches the parent: every worker re-reads too."""
        for worker in self.workers:
            if worker.process is not None:
                worker.process.signalProcess("HUP")

    # -- stopping -----------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """No more restarts; every worker drains (SIGTERM, as a single process does), then
        the rest (metrics port, token store) stops. Bounded: a worker still running after
        its drain and close timeouts (and a margin) is killed."""
        self.stopping = True
        for worker in self.workers:
            if worker.restart_call is not None and worker.restart_call.active():
                worker.restart_call.cancel()
        for shared in self.sockets:
            shared.close()
        waiting = [w.ended for w in self.workers if w.ended is not None]
        for worker in self.workers:
            if worker.process is not None:
                worker.process.signalProcess("TERM")
        bound = self.settings.drain_timeout + self.settings.close_timeout + STOP_MARGIN
        timer = self.reactor.callLater(bound, self._kill_remaining)
        all_ended = DeferredList(waiting)

        def stop_the_rest(_: object) -> Deferred[None]:
            if timer.active():
                timer.cancel()
            stopped: Deferred[None] = super(WorkerParent, self).stopService()  # type: ignore[no-untyped-call]  # python/mypy#16653
            return stopped

        return all_ended.addCallback(stop_the_rest)

    def _kill_remaining(self) -> None:
        for worker in self.workers:
            if worker.process is not None:
                self._log.warn(
                    "worker {index} (pid {pid}) did not stop in time: killed",
                    index=worker.index,
                    pid=worker.pid,
                )
                worker.process.signalProcess("KILL")

    # -- asking every worker --------------------------------------------------------------------

    def ask_all(self, command: type[amp.Command], **arguments: Any) -> Deferred[list[Any]]:
        """C{(worker, answer)} of every connected worker that answered in time."""
        asked = [(w, w.control) for w in self.workers if w.control is not None]
        answers = [
            within(control.call(command, **arguments), WORKER_ANSWER_TIMEOUT, self.reactor)
            for _, control in asked
        ]

        def answered(results: list[tuple[bool, Any]]) -> list[tuple[Worker, Any]]:
            found = []
            for (worker, _), (ok, answer) in zip(asked, results, strict=True):
                if ok:
                    found.append((worker, answer))
                else:
                    self._log.warn(
                        "worker {index} did not answer {command}: {error}",
                        index=worker.index,
                        command=command.__name__,
                        error=answer.getErrorMessage(),
                    )
            return found

        return DeferredList(answers, consumeErrors=True).addCallback(answered)

    def collect(self) -> Deferred[list[Metric]]:
        """Every worker's families summed, the parent's process metrics, and its own."""

        def merge(answers: list[tuple[Worker, dict[str, Any]]]) -> list[Metric]:
            by_worker = {str(worker.index): answer["families"] for worker, answer in answers}
            by_worker["parent"] = families_json(self._process_metrics.collect())
            families = merge_families(by_worker)
            live = Metric("vncmux_workers", "Worker processes connected now.", "gauge")
            live.add_sample("vncmux_workers", {}, float(len(answers)))
            restarts = Metric(
                "vncmux_worker_restarts",
                "Worker processes restarted after they ended unexpectedly.",
                "counter",
            )
            restarts.add_sample("vncmux_worker_restarts_total", {}, float(self.restarts_total))
            return [*families, live, restarts]

        return self.ask_all(Collect).addCallback(merge)


class OneProtocol:
    """A factory for C{adoptStreamConnection} that hands out one protocol instance."""

    def __init__(self, protocol: amp.AMP) -> None:
        self._protocol = protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: object) -> amp.AMP:
        return self._protocol


class _Families:
    """A collector that yields families collected beforehand (for the text encoders)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class MergedMetricsPage(Resource):
    """``GET /metrics`` of the parent: asks every worker, answers with the sums."""

    isLeaf = True

    def __init__(self, parent: WorkerParent) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self._parent = parent

    def render_GET(self, request: Request) -> int:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def write(families: list[Metric]) -> None:
            if gone:
                return
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Families(families))
            request.setHeader(b"content-type", content_type.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
            request.write(encoder(registry))
            request.finish()

        self._parent.collect().addCallback(write)
        return NOT_DONE_YET


@implementer(ISessionDirectory)
class WorkerSessions:
    """Every worker's sessions for the admin API; each session says which C{worker} has it."""

    def __init__(self, parent: WorkerParent) -> None:
        self._parent = parent

    def list_sessions(self) -> Deferred[list[dict[str, Any]]]:
        def combine(answers: list[tuple[Worker, dict[str, Any]]]) -> list[dict[str, Any]]:
            sessions = [
                {**session, "worker": worker.index}
                for worker, answer in answers
                for session in answer["sessions"]
            ]
            return sorted(sessions, key=lambda s: s["started_at"])

        return self._parent.ask_all(ListSessions).addCallback(combine)

    def get_session(self, session_id: str) -> Deferred[dict[str, Any] | None]:
        def first(answers: list[tuple[Worker, dict[str, Any]]]) -> dict[str, Any] | None:
            for worker, answer in answers:
                if answer["session"] is not None:
                    return {**answer["session"], "worker": worker.index}
            return None

        asking = self._parent.ask_all(GetSession, session_id=session_id)
        return asking.addCallback(first)

    def end_session(self, session_id: str) -> Deferred[bool]:
        asking = self._parent.ask_all(EndSession, session_id=session_id)
        return asking.addCallback(lambda answers: any(a["ended"] for _, a in answers))

    def revoked(self, message: str) -> Deferred[int]:
        asking = self._parent.ask_all(Revoke, message=message)
        return asking.addCallback(lambda answers: sum(a["ended"] for _, a in answers))


def _checked_store(settings: Settings, reactor: Any) -> ITokenStore:
    """The token store of C{settings}, once the files a worker needs were found usable:
    C{ValueError} says what is wrong, in the words of a single process's start."""
    try:
        load_vencrypt_tls(
            settings.vencrypt_ca_certs, settings.vencrypt_client_cert, settings.vencrypt_client_key
        )
    except ValueError as e:
        raise ValueError(f"--vencrypt-*: {e}") from None
    for _, description in settings.listeners:
        tls_listener(reactor, description, settings.tls_min_version)
    return open_store(settings, reactor)


def _address(address: tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _exit_description(reason: Failure) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        return f"was killed by signal {signal.Signals(signal_number).name}"
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    return f"exited with status {getattr(value, 'exitCode', '?')}"


__all__ = [
    "Claim",
    "Collect",
    "EndSession",
    "GetSession",
    "GiveBack",
    "ListSessions",
    "Listening",
    "LongJSON",
    "ParentControl",
    "PlaceRefused",
    "Revoke",
    "SharedPlaces",
    "TypedAMP",
    "WorkerParent",
    "WorkerSessions",
    "families_json",
    "listener_sockets",
    "merge_families",
    "OneProtocol",
]
