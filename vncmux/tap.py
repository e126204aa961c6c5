"""``twistd vncmux``: the command line and the wiring of the services. No logic lives here."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from vncmux.configfile import ConfigFileError
from vncmux.events import Observers, SessionLog
from vncmux.firstrun import NOVNC_PLACES, NovncPlace, StartupHints, choose_web
from vncmux.fleet import FleetLimits, FleetSessions, fleet_for
from vncmux.hangup import ReloadOnHangup
from vncmux.novaconf import log_not_applied, read_nova_config
from vncmux.novadb import SOURCE_PREFIX
from vncmux.observability import build_observability
from vncmux.options import BY_NAME, OPTIONS, Option, read_options_file
from vncmux.relay import READ_BUDGET
from vncmux.service import ProxyService, build_console, open_store
from vncmux.settings import Settings

if TYPE_CHECKING:
    from vncmux.worker import WorkerLink

_log = Logger()


def _parameters() -> list[list[Any]]:
    """twistd's C{optParameters} from the options table."""
    return [[o.name, None, o.default, o.help, o.parse] for o in OPTIONS if o.kind == "value"]


def _repeated(option: Option) -> Callable[[Options, str], None]:
    """twistd's C{opt_NAME} method of a repeated option: parse each item and append it."""

    def add(self: Options, value: str) -> None:
        try:
            self[option.name].append(option.parse(value))
        except ValueError as e:
            raise usage.UsageError(f"--{option.name} {value}: {e}") from None

    add.__doc__ = option.help
    return add


class Options(usage.Options):
    """Options of ``twistd vncmux`` (L{vncmux.options.OPTIONS}); each may also come from
    ``--config FILE``."""

    synopsis = "[options]"
    longdesc = (
        "vncmux relays noVNC WebSocket sessions to VNC servers chosen by token. The token "
        "comes from the 'token' query parameter (or cookie) and is looked up in the token "
        "store; the client never names a host or port. Every option can also be set in an "
        "INI file given with --config (section [vncmux], option names with underscores); the "
        "command line wins over the file."
    )
    optParameters: list[list[Any]] = _parameters()
    optFlags: list[list[str | None]] = [
        [o.name, None, o.help] for o in OPTIONS if o.kind == "flag"
    ]
    opt_allowed_origin = _repeated(BY_NAME["allowed-origin"])
    opt_trusted_proxy = _repeated(BY_NAME["trusted-proxy"])
    opt_allowed_backend = _repeated(BY_NAME["allowed-backend"])

    #: Where to look for noVNC without --web (tests point it elsewhere).
    novnc_places: Sequence[NovncPlace] = NOVNC_PLACES

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self.find_web = False
        for option in OPTIONS:
            if option.kind == "repeated":
                self[option.name] = []
        #: Options given on the command line, which neither --config nor nova.conf override.
        self._given: set[str] = set()

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Note what the command line gives: the file and nova.conf fill in the rest."""
        args = list(options if options is not None else [])
        #: The arguments as given: workers parse the same ones (L{vncmux.workers}).
        self.arguments = args
        self._given = {arg[2:].split("=", 1)[0] for arg in args if arg.startswith("--")}
        super().parseOptions(args)  # type: ignore[no-untyped-call]  # python/mypy#16653

    def _apply_config_file(self, path: str) -> None:
        """The file's values for the options the command line left unset."""
        try:
            values = read_options_file(path)
        except ConfigFileError as e:
            raise usage.UsageError(str(e)) from None
        for name, value in values.items():
            if name in self._given:
                continue
            self[name] = list(value) if BY_NAME[name].kind == "repeated" else value
            self._given.add(name)

    def postOptions(self) -> None:
        if self["config"]:
            self._apply_config_file(self["config"])
        if self["nova-config"]:
            self._apply_nova_config(self["nova-config"])
        #: Neither --web nor nova.conf named a directory: build_proxy looks for noVNC.
        self.find_web = self["web"] is None
        if self["web"] in ("none", ""):
            self["web"] = None

    def _apply_nova_config(self, path: str) -> None:
        """nova.conf fills in what the command line and --config leave unset."""
        try:
            nova = read_nova_config(path)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--nova-config {path}: {e}") from None
        given = self._given
        if "tokens" not in given:
            if nova.database_connection is None:
                raise usage.UsageError(f"--nova-config {path}: [database] connection is not set")
            self["tokens"] = SOURCE_PREFIX + nova.database_connection
        if "listen" not in given:
            self["listen"] = nova.listen_endpoint()
        if "serial-listen" not in given and nova.serial_console_enabled:
            self["serial-listen"] = nova.serial_listen_endpoint()
        if "spice-listen" not in given and nova.spice_enabled:
            self["spice-listen"] = nova.spice_listen_endpoint()
        if "web" not in given and nova.web:
            self["web"] = nova.web
        if "auth-schemes" not in given:
            self["auth-schemes"] = nova.auth_schemes
        for option, value in (
            ("vencrypt-ca-certs", nova.vencrypt_ca_certs),
            ("vencrypt-client-cert", nova.vencrypt_client_cert),
            ("vencrypt-client-key", nova.vencrypt_client_key),
        ):
            if option not in given and value is not None:
                self[option] = value
        if nova.enforce_session_timeout:
            self["enforce-expiry"] = 1
        self["allowed-origin"].extend(nova.origin_patterns())
        log_not_applied(nova)

    def settings(self) -> Settings:
        """The frozen settings every session shares."""
        return Settings.from_options(self)


def makeService(config: Options) -> IService:
    """twistd's entry: tune the process (it is ours now), then build the proxy, or with
    C{--workers} above 1 the parent of its workers."""
    tune_process(config["max-sessions"])
    service = build_service(config)
    freeze_startup_objects()
    return service


def tune_process(max_sessions: int) -> None:
    """Process-wide tuning that only the proxy's own processes may do (not a test that
    builds a service): open files for every session, and the allocator's thresholds."""
    too_few_files = raise_open_files_limit(max_sessions)
    if too_few_files is not None:
        _log.warn("{message}", message=too_few_files, vncmux_event="open_files_limit")
    tune_allocator()


#: Sessions the open-files check plans for when --max-sessions is 0 (unlimited).
PLANNED_SESSIONS_UNLIMITED = 10000
#: Descriptors besides the sessions': listeners, the token store, logs, pending upgrades.
OPEN_FILES_MARGIN = 1024


def open_files_needed(max_sessions: int) -> int:
    """Descriptors a process needs to hold C{max_sessions} sessions (two sockets each)."""
    return 2 * (max_sessions or PLANNED_SESSIONS_UNLIMITED) + OPEN_FILES_MARGIN


def raise_open_files_limit(
    max_sessions: int,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> str | None:
    """
    Lift the soft RLIMIT_NOFILE to what C{max_sessions} sessions need (never above the hard
    limit, never lower than it is). A hard limit too low to get there is worth one clear
    line at start: returned here for the caller to log (C{None} when it is high enough).
    """
    needed = open_files_needed(max_sessions)
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    unlimited = hard == resource.RLIM_INFINITY
    target = needed if unlimited else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if unlimited or hard >= needed:
        return None
    sessions = f"--max-sessions {max_sessions}"
    if not max_sessions:
        sessions += f" (unlimited; planned for {PLANNED_SESSIONS_UNLIMITED} sessions)"
    return (
        f"open files: the hard limit (RLIMIT_NOFILE) is {hard}, too low for {sessions}:"
        f" that needs about {needed} descriptors (two per session); sessions past about"
        f" {max(0, (hard - OPEN_FILES_MARGIN) // 2)} will fail. Raise it with"
        f" LimitNOFILE={needed} in the systemd unit, or ulimit -n {needed} before starting."
    )


def tune_allocator() -> None:
    """
    Keep relay buffers on the heap. A read of up to C{BACKEND_READ_SIZE} allocates that much
    and shrinks it to what arrived; with glibc's adaptive thresholds a short read can send
    every later buffer to fresh mmap'd (or freshly trimmed) pages, costing page faults on
    each read and halving throughput. Fixed thresholds avoid that; no-op off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024)
    mallopt(_M_TRIM_THRESHOLD, 32 * 1024 * 1024)


def freeze_startup_objects() -> None:
    """
    Take what start-up built (modules, Twisted, autobahn, the service) out of the garbage
    collector's generations: a full collection then walks only what sessions made since,
    instead of some 200,000 long-lived objects, a pause of milliseconds in the middle of
    connection setups (p99 setup latency at 8 in flight 14.5-16 ms, frozen 12-13 ms; about
    5 % less CPU per connection).
    """
    gc.collect()
    gc.freeze()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def build_service(config: Options, reactor: Any = None) -> IService:
    """The proxy (L{build_proxy}), or with C{--workers} above 1 the parent of its workers."""
    if config["workers"] > 1:
        from vncmux.workers import WorkerParent

        try:
            return WorkerParent.from_options(config, reactor or _global_reactor())
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
    return build_proxy(config, reactor)


def _global_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def build_proxy(
    config: Options, reactor: Any = None, worker: WorkerLink | None = None
) -> ProxyService:
    """Compose the token store, the supervisor and the console listeners; in a worker of
    C{--workers}, on the parent's sockets, under its limits, and without a metrics port."""
    reactor = reactor or _global_reactor()
    web = choose_web(config["web"], config.find_web, config.novnc_places)
    settings = replace(config.settings(), web=web.path)
    if worker is not None:
        settings = replace(settings, metrics=None)
    try:
        store = open_store(settings, reactor)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    observers = Observers([SessionLog()])
    try:
        console = build_console(settings, store, reactor, observers)
    except ValueError as e:  # the VeNCrypt files
        raise usage.UsageError(f"--vencrypt-*: {e}") from None
    if worker is not None:
        console.supervisor.read_budget = READ_BUDGET // config["workers"]
    service = ProxyService(settings, console, reactor)
    if IService.providedBy(store):
        service.add(store)
    fleet = fleet_for(store, console.supervisor, reactor, settings.fleet_heartbeat)
    if fleet is not None:  # added after the store: it leaves the fleet before the store stops
        service.add(fleet)
        observers.add(fleet)
        limit = settings.limits.max_sessions_per_token
        console.supervisor.shared_limits += (FleetLimits(fleet, limit),)
    try:
        metrics_service, metrics = build_observability(
            settings.metrics,
            reactor,
            console.supervisor,
            store,
            console.factory.stats,
            lambda: service.accepting,
            admin_token_file=settings.admin_token_file,
            base_url=settings.base_url,
            backend_policy=console.backend_policy,
            sessions=None if fleet is None else FleetSessions(fleet.store, fleet),
        )
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    observers.add(metrics)
    # Until ProxyService passes it to its Listeners itself.
    listeners = list(service.listeners.values())
    for listener in listeners:
        listener.tls_min_version = settings.tls_min_version
    if metrics_service is not None:
        metrics_service.tls_min_version = settings.tls_min_version
        listeners.append(metrics_service)
        service.add(metrics_service)  # stopped after the drain: /readyz says 503 meanwhile
    service.add(ReloadOnHangup(reactor, [listener.reload for listener in listeners]))
    if worker is not None:
        worker.attach(service, metrics)
        return service
    service.add(StartupHints(service.listener, metrics_service, web, settings.tokens))
    return service
