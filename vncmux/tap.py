"""``twistd vncmux``: the command line and the wiring of the services. No logic lives here."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from vncmux.attempts import DEFAULT_MAX_FAILED
from vncmux.backendpolicy import parse_backend_networks
from vncmux.cli import DEFAULT_BASE_URL, check_base_url
from vncmux.configfile import ConfigFileError, read_config, read_flag
from vncmux.events import Observers, SessionLog
from vncmux.firstrun import NOVNC_PLACES, NovncPlace, StartupHints, choose_web
from vncmux.handshake import parse_networks, parse_origin_pattern
from vncmux.hangup import ReloadOnHangup
from vncmux.novaconf import log_not_applied, read_nova_config
from vncmux.novadb import DEFAULT_RECHECK_INTERVAL, SOURCE_PREFIX
from vncmux.observability import build_observability
from vncmux.redisstore import open_token_store
from vncmux.rfbsecurity import AUTH_SCHEMES
from vncmux.service import ProxyService, build_console
from vncmux.settings import DEFAULT_LISTEN, DEFAULT_METRICS, DEFAULT_TOKENS, Settings
from vncmux.supervisor import Limits
from vncmux.tls import DEFAULT_TLS_MIN_VERSION, TLS_VERSIONS

if TYPE_CHECKING:
    from vncmux.worker import WorkerLink


_log = Logger()


def _bounded(convert: Callable[[str], Any], low: float, zero_ok: bool, doc: str) -> Any:
    """An option coercer that refuses numbers below C{low} (and C{low} itself unless
    C{zero_ok}); C{doc} is what --help says about the value."""

    def coerce(value: str) -> Any:
        number = convert(value)
        if number < low or (number == low and not zero_ok):
            raise ValueError(f"{value} is not allowed here ({doc.lower().rstrip('.')})")
        return number

    coerce.coerceDoc = doc  # type: ignore[attr-defined]
    return coerce


_positive_float = _bounded(float, 0, False, "Seconds, greater than zero.")
_seconds = _bounded(float, 0, True, "Seconds, 0 or more.")
_count = _bounded(int, 0, True, "A whole number, 0 or more.")


def _base_url(value: str) -> str:
    return check_base_url(value)


_base_url.coerceDoc = "An http:// or https:// URL."  # type: ignore[attr-defined]


def _workers(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    number = int(value)
    if number < 1:
        raise ValueError(f"{value} is not allowed here (a whole number, 1 or more, or auto)")
    return number


_workers.coerceDoc = "A whole number, 1 or more, or 'auto' (one per core)."  # type: ignore[attr-defined]


def _tls_version(value: str) -> str:
    if value not in TLS_VERSIONS:
        raise ValueError(f"{value!r} is not one of {', '.join(TLS_VERSIONS)}")
    return value


def _auth_schemes(value: str) -> tuple[str, ...]:
    schemes = tuple(dict.fromkeys(s.strip().lower() for s in value.split(",") if s.strip()))
    unknown = [s for s in schemes if s not in AUTH_SCHEMES]
    if unknown or not schemes:
        raise ValueError(f"{value!r}: schemes are {', '.join(AUTH_SCHEMES)}")
    return schemes


_auth_schemes.coerceDoc = "Comma-separated: none, vncauth, vencrypt."  # type: ignore[attr-defined]


def _activity(value: str) -> str:
    if value not in ("input", "any"):
        raise ValueError(f"{value!r} is neither 'input' nor 'any'")
    return value


#: Session limits on by default: an unlimited number of consoles per token (OpenStack's
#: OSSN-0008) or per client lets one leaked URL or one client exhaust the proxy's file
#: descriptors and memory. Generous enough for shared NAT addresses and a few viewers of one
#: console; 10000 sessions is 20000 descriptors, within the systemd unit's LimitNOFILE.
DEFAULT_MAX_SESSIONS = 10000
DEFAULT_MAX_SESSIONS_PER_TOKEN = 10
DEFAULT_MAX_SESSIONS_PER_CLIENT = 100

#: Options given any number of times (space-separated in the config file).
REPEATABLE = ("allowed-origin", "trusted-proxy", "allowed-backend")


class Options(usage.Options):
    """Options of ``twistd vncmux``; each may also come from ``--config FILE``."""

    synopsis = "[options]"
    longdesc = (
        "vncmux relays noVNC WebSocket sessions to VNC servers chosen by token. The token "
        "comes from the 'token' query parameter (or cookie) and is looked up in the token "
        "store; the client never names a host or port. Every option can also be set in an "
        "INI file given with --config (section [vncmux], option names without dashes); the "
        "command line wins over the file."
    )
    optParameters: list[list[Any]] = [
        ["config", None, None, "INI file with a [vncmux] section (see etc/vncmux.ini)."],
        [
            "workers",
            None,
            1,
            "Worker processes that share the console listeners, each relaying its own"
            " sessions; this process then only supervises them and serves --metrics and the"
            " admin API for all (docs/running.md). 1: no workers, this process relays.",
            _workers,
        ],
        ["listen", None, DEFAULT_LISTEN, "Endpoint string of the noVNC console listener."],
        [
            "serial-listen",
            None,
            None,
            "Endpoint string of the serial console listener (nova-serialproxy's clients,"
            " tokens of console type 'serial'); off unless given or --nova-config enables"
            " [serial_console]; 'none' turns it off.",
        ],
        [
            "spice-listen",
            None,
            None,
            "Endpoint string of the SPICE HTML5 listener (nova-spicehtml5proxy's clients,"
            " tokens of console type 'spice-html5'; serves --web); off unless given or"
            " --nova-config enables [spice]; 'none' turns it off.",
        ],
        [
            "tokens",
            None,
            DEFAULT_TOKENS,
            "Token store: file:PATH, redis://[:pw@]host:port/db, "
            "rediss://..., redis+sentinel://h1:p1,h2:p2/master (add ?format=websockify to read "
            "websockify's raw-token keys), or nova:URL with URL nova's [database] connection.",
        ],
        [
            "nova-config",
            None,
            None,
            "nova.conf to take the token database ([database] connection), the listeners "
            "([vnc] novncproxy_host/port unless --listen; [serial_console] serialproxy_host/"
            "port when [serial_console] enabled, unless --serial-listen; [spice] "
            "html5proxy_host/port when [spice] enabled, unless --spice-listen) and [console] "
            "allowed_origins from.",
        ],
        [
            "nova-recheck-interval",
            None,
            DEFAULT_RECHECK_INTERVAL,
            "With nova's database: seconds between checks that live sessions' token rows "
            "still exist (a deleted instance's consoles close with 4002).",
            _positive_float,
        ],
        [
            "web",
            None,
            None,
            "Serve the noVNC files in this directory on the listener; 'none' serves nothing."
            " Default: ./node_modules/@novnc/novnc (npm, under vncmux's own page), else"
            " /usr/share/novnc (Debian), whichever holds noVNC.",
        ],
        [
            "spice-web",
            None,
            None,
            "Serve the spice-html5 files in this directory on the SPICE listener (Debian:"
            " /usr/share/spice-html5); default: --web.",
        ],
        [
            "web-timeout",
            None,
            60.0,
            "Seconds a plain HTTP connection (the --web files) may stay open before it is cut.",
            _positive_float,
        ],
        [
            "metrics",
            None,
            DEFAULT_METRICS,
            "Endpoint of /metrics, /healthz, /readyz and the admin API; 'none' disables it.",
        ],
        [
            "connect-timeout",
            None,
            5.0,
            "Seconds to connect to a VNC server and read its greeting.",
            _positive_float,
        ],
        ["store-timeout", None, 2.0, "Seconds a token lookup may take.", _positive_float],
        [
            "refusal-timeout",
            None,
            5.0,
            "Seconds a refused client has to answer the RFB greeting before it is dropped.",
            _positive_float,
        ],
        [
            "idle-timeout",
            None,
            1800.0,
            "Close a session after this many seconds without user activity (4000); 0 disables.",
            _seconds,
        ],
        [
            "idle-activity",
            None,
            "input",
            "What counts as activity: 'input' (keyboard, pointer, "
            "clipboard from the client; on serial consoles every client byte) or 'any' "
            "(every byte either way).",
            _activity,
        ],
        [
            "max-session",
            None,
            0.0,
            "Close a session this many seconds after it opened (4001); 0 disables.",
            _seconds,
        ],
        [
            "max-sessions",
            None,
            DEFAULT_MAX_SESSIONS,
            "Sessions this proxy holds at most (every --workers together; 4429); 0 unlimited.",
            _count,
        ],
        [
            "max-sessions-per-token",
            None,
            DEFAULT_MAX_SESSIONS_PER_TOKEN,
            "Sessions per token unless its record sets max_sessions; 0 unlimited.",
            _count,
        ],
        [
            "max-sessions-per-client",
            None,
            DEFAULT_MAX_SESSIONS_PER_CLIENT,
            "Sessions per client address; 0 unlimited.",
            _count,
        ],
        [
            "max-failed-tokens",
            None,
            DEFAULT_MAX_FAILED,
            "Unknown tokens a client address may send per minute; past that its upgrades get"
            " 4429 for a minute without a lookup (shared through Redis); 0 unlimited.",
            _count,
        ],
        [
            "max-pending",
            None,
            1024,
            "Connections not yet relaying (upgrade, token lookup, dial, refusal) at most; "
            "over it new connections get HTTP 503. 0 unlimited.",
            _count,
        ],
        [
            "max-pending-per-client",
            None,
            32,
            "Connections not yet relaying per client address; 0 unlimited.",
            _count,
        ],
        [
            "ping-interval",
            None,
            30.0,
            "Seconds between WebSocket pings that keep load "
            "balancers from cutting idle-looking sessions; 0 disables.",
            _seconds,
        ],
        [
            "ping-timeout",
            None,
            20.0,
            "Drop a client (and its backend) that has not answered a ping for this many seconds.",
            _seconds,
        ],
        [
            "close-timeout",
            None,
            10.0,
            "Seconds each side of an ending session has to flush and close before it is cut.",
            _positive_float,
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "On SIGTERM, seconds live sessions may go on before they are closed with 1001.",
            _seconds,
        ],
        [
            "flush-interval",
            None,
            10.0,
            "Seconds between batched writes of last_activity_at to the token store.",
            _positive_float,
        ],
        [
            "tls-min-version",
            None,
            DEFAULT_TLS_MIN_VERSION,
            "Oldest TLS version an ssl: listener accepts: 1.2 or 1.3 (ciphers: ECDHE with"
            " AES-GCM or ChaCha20; SIGHUP re-reads certKey and privateKey).",
            _tls_version,
        ],
        [
            "auth-schemes",
            None,
            ("none",),
            "Security the RFB security proxy may negotiate with VNC servers, in any order "
            "(the server's order decides), as nova's [vnc] auth_schemes: 'none' alone relays "
            "RFB untouched unless the token carries a password (then VncAuth); 'vencrypt' "
            "adds VeNCrypt (X509None/X509Vnc with --vencrypt-ca-certs, else TLSNone/TLSVnc); "
            "'vncauth' allows VncAuth. The browser is always offered security type None.",
            _auth_schemes,
        ],
        [
            "vencrypt-ca-certs",
            None,
            None,
            "CA bundle (PEM) that VNC servers' VeNCrypt certificates must chain to (nova's "
            "[vnc] vencrypt_ca_certs); the certificate's name is not checked, as in nova.",
        ],
        [
            "vencrypt-client-cert",
            None,
            None,
            "Client certificate (PEM) shown to VNC servers over VeNCrypt (vencrypt_client_cert).",
        ],
        [
            "vencrypt-client-key",
            None,
            None,
            "Private key (PEM, unencrypted) of --vencrypt-client-cert (vencrypt_client_key).",
        ],
        [
            "admin-token-file",
            None,
            None,
            "File whose first line is the bearer secret of the "
            "admin API on the metrics endpoint; without it the admin API is off.",
        ],
        [
            "base-url",
            None,
            DEFAULT_BASE_URL,
            "noVNC page that access URLs issued by the admin API point at (http or https).",
            _base_url,
        ],
    ]
    optFlags: list[list[str | None]] = [
        ["enforce-expiry", None, "Close a session when its token's expires_at passes."],
    ]

    #: Where to look for noVNC without --web (tests point it elsewhere).
    novnc_places: Sequence[NovncPlace] = NOVNC_PLACES

    def __init__(self) -> None:
        super().__init__()
        self.find_web = False
        self["allowed-origin"] = []
        self["trusted-proxy"] = []
        self["allowed-backend"] = []
        #: Options given on the command line or in --config, which nova.conf does not override.
        self._given: set[str] = set()

    def opt_allowed_origin(self, origin: str) -> None:
        """Also allow this browser Origin: scheme://host[:port], the host may start with
        '*.' (any subdomain); '*' alone allows every Origin. Repeatable."""
        try:
            parse_origin_pattern(origin)
        except ValueError as e:
            raise usage.UsageError(f"--allowed-origin {e}") from None
        self["allowed-origin"].append(origin)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """Believe X-Forwarded-For/-Proto from peers in this CIDR; repeatable."""
        try:
            parse_networks([cidr])
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxy {cidr}: {e}") from None
        self["trusted-proxy"].append(cidr)

    def opt_allowed_backend(self, cidr: str) -> None:
        """Tokens may only open VNC servers in this CIDR (names are resolved once, and
        the checked address is dialled); repeatable; default: anywhere. Link-local
        addresses (169.254.169.254, cloud metadata) only when listed explicitly."""
        try:
            parse_backend_networks([cidr])
        except ValueError as e:
            raise usage.UsageError(f"--allowed-backend {e}") from None
        self["allowed-backend"].append(cidr)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Read ``--config`` first, so that the command line overrides the file."""
        args = list(options if options is not None else [])
        #: The arguments as given: workers parse the same ones (L{vncmux.workers}).
        self.arguments = args
        combined = self._config_file_args(args) + args
        self._given = {arg.split("=", 1)[0] for arg in combined if arg.startswith("--")}
        super().parseOptions(combined)

    def _config_file_args(self, args: list[str]) -> list[str]:
        path = _find_config(args)
        if path is None:
            return []
        try:
            section = read_config(path)
        except ConfigFileError as e:
            raise usage.UsageError(str(e)) from None
        given = {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}
        flags = {flag[0] for flag in getattr(self, "optFlags", [])}
        known = {p[0] for p in self.optParameters} | set(REPEATABLE) | flags
        file_args: list[str] = []
        for name, value in section.items():
            option = name.replace("_", "-")
            if option not in known or option == "config":
                raise usage.UsageError(f"config file {path}: unknown option {name!r}")
            if f"--{option}" in given:
                continue
            if option in flags:
                try:
                    on = read_flag(path, name, value)
                except ConfigFileError as e:
                    raise usage.UsageError(str(e)) from None
                if on:
                    file_args.append(f"--{option}")
                continue
            for item in value.split() if option in REPEATABLE else [value]:
                file_args.append(f"--{option}={item}")
        return file_args

    def postOptions(self) -> None:
        if self["metrics"] in ("none", ""):
            self["metrics"] = None
        if self["nova-config"]:
            self._apply_nova_config(self["nova-config"])
        for option in ("serial-listen", "spice-listen"):
            if self[option] in ("none", ""):
                self[option] = None
        #: Neither --web nor nova.conf named a directory: makeService looks for noVNC.
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
        if "--tokens" not in given:
            if nova.database_connection is None:
                raise usage.UsageError(f"--nova-config {path}: [database] connection is not set")
            self["tokens"] = SOURCE_PREFIX + nova.database_connection
        if "--listen" not in given:
            self["listen"] = nova.listen_endpoint()
        if "--serial-listen" not in given and nova.serial_console_enabled:
            self["serial-listen"] = nova.serial_listen_endpoint()
        if "--spice-listen" not in given and nova.spice_enabled:
            self["spice-listen"] = nova.spice_listen_endpoint()
        if "--web" not in given and nova.web:
            self["web"] = nova.web
        if "--auth-schemes" not in given:
            self["auth-schemes"] = nova.auth_schemes
        for option, value in (
            ("vencrypt-ca-certs", nova.vencrypt_ca_certs),
            ("vencrypt-client-cert", nova.vencrypt_client_cert),
            ("vencrypt-client-key", nova.vencrypt_client_key),
        ):
            if f"--{option}" not in given and value is not None:
                self[option] = value
        if nova.enforce_session_timeout:
            self["enforce-expiry"] = 1
        self["allowed-origin"].extend(nova.origin_patterns())
        log_not_applied(nova)

    def settings(self) -> Settings:
        """The frozen settings every session shares."""
        return Settings(
            listen=self["listen"],
            serial_listen=self["serial-listen"],
            spice_listen=self["spice-listen"],
            tokens=self["tokens"],
            web=self["web"],
            spice_web=self["spice-web"],
            web_timeout=self["web-timeout"],
            metrics=self["metrics"],
            connect_timeout=self["connect-timeout"],
            store_timeout=self["store-timeout"],
            nova_recheck_interval=self["nova-recheck-interval"],
            refusal_timeout=self["refusal-timeout"],
            allowed_origins=tuple(self["allowed-origin"]),
            trusted_proxies=parse_networks(self["trusted-proxy"]),
            allowed_backends=parse_backend_networks(self["allowed-backend"]),
            max_failed_tokens=self["max-failed-tokens"],
            tls_min_version=self["tls-min-version"],
            idle_activity=self["idle-activity"],
            auth_schemes=tuple(self["auth-schemes"]),
            vencrypt_ca_certs=self["vencrypt-ca-certs"],
            vencrypt_client_cert=self["vencrypt-client-cert"],
            vencrypt_client_key=self["vencrypt-client-key"],
            drain_timeout=self["drain-timeout"],
            close_timeout=self["close-timeout"],
            limits=Limits(
                idle_timeout=self["idle-timeout"],
                max_session=self["max-session"],
                enforce_expiry=bool(self["enforce-expiry"]),
                max_sessions=self["max-sessions"],
                max_sessions_per_token=self["max-sessions-per-token"],
                max_sessions_per_client=self["max-sessions-per-client"],
                max_pending=self["max-pending"],
                max_pending_per_client=self["max-pending-per-client"],
                flush_interval=self["flush-interval"],
                ping_interval=self["ping-interval"],
                ping_timeout=self["ping-timeout"],
            ),
        )


def _find_config(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


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


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def makeService(config: Options, reactor: Any = None) -> IService:
    """The proxy, or with C{--workers} above 1 the parent of its workers."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    too_few_files = raise_open_files_limit(config["max-sessions"])
    if too_few_files is not None:
        _log.warn("{message}", message=too_few_files, vncmux_event="open_files_limit")
    if config["workers"] > 1:
        from vncmux.workers import WorkerParent

        try:
            return WorkerParent.from_options(config, reactor)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
    return build_proxy(config, reactor)


def build_proxy(config: Options, reactor: Any, worker: WorkerLink | None = None) -> ProxyService:
    """Compose the token store, the supervisor and the console listeners; in a worker of
    C{--workers}, on the parent's sockets, under its limits, and without a metrics port."""
    tune_allocator()
    web = choose_web(config["web"], config.find_web, config.novnc_places)
    settings = replace(config.settings(), web=web.path)
    if worker is not None:
        settings = replace(settings, metrics=None)
    try:
        store = open_token_store(
            settings.tokens,
            reactor,
            reply_timeout=settings.store_timeout,
            reactor=reactor,
            nova_recheck_interval=settings.nova_recheck_interval,
        )
    except ValueError as e:
        raise usage.UsageError(f"--tokens: {e}") from None
    observers = Observers([SessionLog()])
    try:
        console = build_console(settings, store, reactor, observers)
    except ValueError as e:  # the VeNCrypt files
        raise usage.UsageError(f"--vencrypt-*: {e}") from None
    service = ProxyService(settings, console, reactor)
    if IService.providedBy(store):
        service.add(store)
    try:
        metrics_service, metrics = build_observability(
            settings.metrics,
            reactor,
            console.supervisor,
            store,
            console.factory.stats,
            lambda: service.accepting,
            admin_token_file=config["admin-token-file"],
            base_url=config["base-url"],
            backend_policy=console.backend_policy,
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
