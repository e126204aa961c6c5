"""
The options of ``twistd vncmux``, declared once.

Each L{Option} has its name (``--name`` on the command line, ``name`` with underscores in the
``[vncmux]`` section of ``--config``), its default, its help, how a string becomes its value
and where the value goes in L{vncmux.settings.Settings}. From this one table come the twistd
``Options`` (L{vncmux.tap}), the config file reader shared by ``twistd vncmux`` and
``vncmux token`` (L{read_options_file}), the settings (L{vncmux.settings.Settings.from_options})
and the defaults of C{Settings} itself; a test checks that ``etc/vncmux.ini`` documents every
option with its default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vncmux.attempts import DEFAULT_MAX_FAILED
from vncmux.backendpolicy import parse_backend_networks
from vncmux.configfile import ConfigFileError, read_config, read_flag
from vncmux.handshake import parse_networks, parse_origin_pattern
from vncmux.issuing import DEFAULT_BASE_URL, check_base_url
from vncmux.novadb import DEFAULT_RECHECK_INTERVAL
from vncmux.rfbsecurity import AUTH_SCHEMES
from vncmux.tls import DEFAULT_TLS_MIN_VERSION, TLS_VERSIONS

#: Session limits on by default: an unlimited number of consoles per token (OpenStack's
#: OSSN-0008) or per client lets one leaked URL or one client exhaust the proxy's file
#: descriptors and memory. Generous enough for shared NAT addresses and a few viewers of one
#: console; 10000 sessions is 20000 descriptors, within the systemd unit's LimitNOFILE.
DEFAULT_MAX_SESSIONS = 10000
DEFAULT_MAX_SESSIONS_PER_TOKEN = 10
DEFAULT_MAX_SESSIONS_PER_CLIENT = 100

#: A value (the default), a yes/no flag, or an option given any number of times (a list;
#: space-separated in the config file).
Kind = Literal["value", "flag", "repeated"]


def _text(value: str) -> str:
    return value


@dataclass(frozen=True, slots=True)
class Option:
    """One option of ``twistd vncmux``."""

    name: str
    default: Any
    help: str
    #: Turns one string (of the command line or the file) into the value, or raises
    #: ValueError saying what is wrong; for a repeated option, one item.
    parse: Callable[[str], Any] = _text
    kind: Kind = "value"
    #: Where the value goes in Settings (``limits.x`` for Limits); None: read at start only.
    setting: str | None = ""

    @property
    def file_name(self) -> str:
        """The option's name in the config file."""
        return self.name.replace("-", "_")

    @property
    def target(self) -> str | None:
        """The Settings attribute the value goes to (by default the file name)."""
        return self.file_name if self.setting == "" else self.setting


def _bounded(convert: Callable[[str], Any], low: float, zero_ok: bool, doc: str) -> Any:
    """A parser that refuses numbers below C{low} (and C{low} itself unless C{zero_ok});
    C{doc} is what --help says about the value."""

    def parse(value: str) -> Any:
        number = convert(value)
        if number < low or (number == low and not zero_ok):
            raise ValueError(f"{value} is not allowed here ({doc.lower().rstrip('.')})")
        return number

    parse.coerceDoc = doc  # type: ignore[attr-defined]
    return parse


_positive_float = _bounded(float, 0, False, "Seconds, greater than zero.")
_seconds = _bounded(float, 0, True, "Seconds, 0 or more.")
_count = _bounded(int, 0, True, "A whole number, 0 or more.")


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    parse.coerceDoc = f"One of: {', '.join(choices)}."  # type: ignore[attr-defined]
    return parse


def _endpoint_or_off(value: str) -> str | None:
    """An endpoint string; ``none`` (or nothing) turns the listener off."""
    return None if value in ("none", "") else value


def _base_url(value: str) -> str:
    return check_base_url(value)


_base_url.coerceDoc = "An http:// or https:// URL."  # type: ignore[attr-defined]


def _auth_schemes(value: str) -> tuple[str, ...]:
    schemes = tuple(dict.fromkeys(s.strip().lower() for s in value.split(",") if s.strip()))
    unknown = [s for s in schemes if s not in AUTH_SCHEMES]
    if unknown or not schemes:
        raise ValueError(f"{value!r}: schemes are {', '.join(AUTH_SCHEMES)}")
    return schemes


_auth_schemes.coerceDoc = "Comma-separated: none, vncauth, vencrypt."  # type: ignore[attr-defined]


def _workers(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    number = int(value)
    if number < 1:
        raise ValueError(f"{value} is not allowed here (a whole number, 1 or more, or auto)")
    return number


_workers.coerceDoc = "A whole number, 1 or more, or 'auto' (one per core)."  # type: ignore[attr-defined]


def _origin(value: str) -> str:
    parse_origin_pattern(value)
    return value


def _trusted_proxy(value: str) -> Any:
    return parse_networks([value])[0]


def _allowed_backend(value: str) -> Any:
    return parse_backend_networks([value])[0]


OPTIONS: tuple[Option, ...] = (
    Option(
        "config",
        None,
        "INI file with a [vncmux] section (see etc/vncmux.ini).",
        setting=None,
    ),
    Option(
        "workers",
        1,
        "Worker processes that share the console listeners, each relaying its own"
        " sessions; this process then only supervises them and serves --metrics and the"
        " admin API for all (docs/running.md). 1: no workers, this process relays.",
        _workers,
        setting=None,
    ),
    Option(
        "listen",
        "tcp:6080:interface=127.0.0.1",
        "Endpoint string of the noVNC console listener.",
    ),
    Option(
        "serial-listen",
        None,
        "Endpoint string of the serial console listener (nova-serialproxy's clients,"
        " tokens of console type 'serial'); off unless given or --nova-config enables"
        " [serial_console]; 'none' turns it off.",
        _endpoint_or_off,
    ),
    Option(
        "spice-listen",
        None,
        "Endpoint string of the SPICE HTML5 listener (nova-spicehtml5proxy's clients,"
        " tokens of console type 'spice-html5'; serves --web); off unless given or"
        " --nova-config enables [spice]; 'none' turns it off.",
        _endpoint_or_off,
    ),
    Option(
        "tokens",
        "file:etc/tokens",
        "Token store: file:PATH, redis://[:pw@]host:port/db, "
        "rediss://..., redis+sentinel://h1:p1,h2:p2/master (add ?format=websockify to read "
        "websockify's raw-token keys), or nova:URL with URL nova's [database] connection.",
    ),
    Option(
        "nova-config",
        None,
        "nova.conf to take the token database ([database] connection), the listeners "
        "([vnc] novncproxy_host/port unless --listen; [serial_console] serialproxy_host/"
        "port when [serial_console] enabled, unless --serial-listen; [spice] "
        "html5proxy_host/port when [spice] enabled, unless --spice-listen) and [console] "
        "allowed_origins from.",
        setting=None,
    ),
    Option(
        "nova-recheck-interval",
        DEFAULT_RECHECK_INTERVAL,
        "With nova's database: seconds between checks that live sessions' token rows "
        "still exist (a deleted instance's consoles close with 4002).",
        _positive_float,
    ),
    Option(
        "web",
        None,
        "Serve the noVNC files in this directory on the listener; 'none' serves nothing."
        " Default: ./node_modules/@novnc/novnc (npm, under vncmux's own page), else"
        " /usr/share/novnc (Debian), whichever holds noVNC.",
    ),
    Option(
        "spice-web",
        None,
        "Serve the spice-html5 files in this directory on the SPICE listener (Debian:"
        " /usr/share/spice-html5); default: --web.",
    ),
    Option(
        "web-timeout",
        60.0,
        "Seconds a plain HTTP connection (the --web files) may stay open before it is cut.",
        _positive_float,
    ),
    Option(
        "metrics",
        "tcp:9108:interface=127.0.0.1",
        "Endpoint of /metrics, /healthz, /readyz and the admin API; 'none' disables it.",
        _endpoint_or_off,
    ),
    Option(
        "connect-timeout",
        5.0,
        "Seconds to connect to a VNC server and read its greeting.",
        _positive_float,
    ),
    Option("store-timeout", 2.0, "Seconds a token lookup may take.", _positive_float),
    Option(
        "refusal-timeout",
        5.0,
        "Seconds a refused client has to answer the RFB greeting before it is dropped.",
        _positive_float,
    ),
    Option(
        "idle-timeout",
        1800.0,
        "Close a session after this many seconds without user activity (4000); 0 disables.",
        _seconds,
        setting="limits.idle_timeout",
    ),
    Option(
        "idle-activity",
        "input",
        "What counts as activity: 'input' (keyboard, pointer, clipboard from the client; on"
        " serial consoles every client byte) or 'any' (every byte either way).",
        _one_of("input", "any"),
    ),
    Option(
        "max-session",
        0.0,
        "Close a session this many seconds after it opened (4001); 0 disables.",
        _seconds,
        setting="limits.max_session",
    ),
    Option(
        "enforce-expiry",
        False,
        "Close a session when its token's expires_at passes.",
        kind="flag",
        setting="limits.enforce_expiry",
    ),
    Option(
        "max-sessions",
        DEFAULT_MAX_SESSIONS,
        "Sessions this proxy holds at most (every --workers together; 4429); 0 unlimited.",
        _count,
        setting="limits.max_sessions",
    ),
    Option(
        "max-sessions-per-token",
        DEFAULT_MAX_SESSIONS_PER_TOKEN,
        "Sessions per token unless its record sets max_sessions; 0 unlimited.",
        _count,
        setting="limits.max_sessions_per_token",
    ),
    Option(
        "max-sessions-per-client",
        DEFAULT_MAX_SESSIONS_PER_CLIENT,
        "Sessions per client address; 0 unlimited.",
        _count,
        setting="limits.max_sessions_per_client",
    ),
    Option(
        "max-failed-tokens",
        DEFAULT_MAX_FAILED,
        "Unknown tokens a client address may send per minute; past that its upgrades get"
        " 4429 for a minute without a lookup (shared through Redis); 0 unlimited.",
        _count,
    ),
    Option(
        "max-pending",
        1024,
        "Connections not yet relaying (upgrade, token lookup, dial, refusal) at most; "
        "over it new connections get HTTP 503. 0 unlimited.",
        _count,
        setting="limits.max_pending",
    ),
    Option(
        "max-pending-per-client",
        32,
        "Connections not yet relaying per client address; 0 unlimited.",
        _count,
        setting="limits.max_pending_per_client",
    ),
    Option(
        "ping-interval",
        30.0,
        "Seconds between WebSocket pings that keep load "
        "balancers from cutting idle-looking sessions; 0 disables.",
        _seconds,
        setting="limits.ping_interval",
    ),
    Option(
        "ping-timeout",
        20.0,
        "Drop a client (and its backend) that has not answered a ping for this many seconds.",
        _seconds,
        setting="limits.ping_timeout",
    ),
    Option(
        "close-timeout",
        10.0,
        "Seconds each side of an ending session has to flush and close before it is cut.",
        _positive_float,
    ),
    Option(
        "drain-timeout",
        30.0,
        "On SIGTERM, seconds live sessions may go on before they are closed with 1001.",
        _seconds,
    ),
    Option(
        "flush-interval",
        10.0,
        "Seconds between batched writes of last_activity_at to the token store.",
        _positive_float,
        setting="limits.flush_interval",
    ),
    Option(
        "fleet-heartbeat",
        10.0,
        "With a Redis token store: seconds between this instance's heartbeats in the"
        " fleet registry (its sessions and per-token counts live 3 heartbeats; 0: off).",
        _seconds,
    ),
    Option(
        "tls-min-version",
        DEFAULT_TLS_MIN_VERSION,
        "Oldest TLS version an ssl: listener accepts: 1.2 or 1.3 (ciphers: ECDHE with"
        " AES-GCM or ChaCha20; SIGHUP re-reads certKey and privateKey).",
        _one_of(*TLS_VERSIONS),
    ),
    Option(
        "auth-schemes",
        ("none",),
        "Security the RFB security proxy may negotiate with VNC servers, in any order "
        "(the server's order decides), as nova's [vnc] auth_schemes: 'none' alone relays "
        "RFB untouched unless the token carries a password (then VncAuth); 'vencrypt' "
        "adds VeNCrypt (X509None/X509Vnc with --vencrypt-ca-certs, else TLSNone/TLSVnc); "
        "'vncauth' allows VncAuth. The browser is always offered security type None.",
        _auth_schemes,
    ),
    Option(
        "vencrypt-ca-certs",
        None,
        "CA bundle (PEM) that VNC servers' VeNCrypt certificates must chain to (nova's "
        "[vnc] vencrypt_ca_certs); the certificate's name is not checked, as in nova.",
    ),
    Option(
        "vencrypt-client-cert",
        None,
        "Client certificate (PEM) shown to VNC servers over VeNCrypt (vencrypt_client_cert).",
    ),
    Option(
        "vencrypt-client-key",
        None,
        "Private key (PEM, unencrypted) of --vencrypt-client-cert (vencrypt_client_key).",
    ),
    Option(
        "admin-token-file",
        None,
        "File whose first line is the bearer secret of the "
        "admin API on the metrics endpoint; without it the admin API is off.",
    ),
    Option(
        "base-url",
        DEFAULT_BASE_URL,
        "noVNC page that access URLs issued by the admin API point at (http or https).",
        _base_url,
    ),
    Option(
        "allowed-origin",
        (),
        "Also allow this browser Origin: scheme://host[:port], the host may start with"
        " '*.' (any subdomain); '*' alone allows every Origin. Repeatable.",
        _origin,
        kind="repeated",
        setting="allowed_origins",
    ),
    Option(
        "trusted-proxy",
        (),
        "Believe X-Forwarded-For/-Proto from peers in this CIDR; repeatable.",
        _trusted_proxy,
        kind="repeated",
        setting="trusted_proxies",
    ),
    Option(
        "allowed-backend",
        (),
        "Tokens may only open VNC servers in this CIDR (names are resolved once, and the"
        " checked address is dialled); repeatable; default: anywhere. Link-local addresses"
        " (169.254.169.254, cloud metadata) only when listed explicitly.",
        _allowed_backend,
        kind="repeated",
        setting="allowed_backends",
    ),
)

BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}

#: The default of every option that has a place in Settings, by that place.
DEFAULTS: Mapping[str, Any] = {
    option.target: option.default for option in OPTIONS if option.target is not None
}


def read_options_file(path: str) -> dict[str, Any]:
    """
    The options of the ``[vncmux]`` section of C{path} by option name, each value parsed as
    on the command line (a repeated option: a tuple of its space-separated items; a flag:
    C{bool}). L{ConfigFileError} names the file and the option; only the parsers of numbers,
    addresses, Origins and URLs quote a bad value (none of them takes a password).
    """
    values: dict[str, Any] = {}
    for file_name, text in read_config(path).items():
        option = BY_NAME.get(file_name.replace("_", "-"))
        if option is None or option.name == "config":
            raise ConfigFileError(f"config file {path}: unknown option {file_name!r}")
        try:
            if option.kind == "flag":
                values[option.name] = read_flag(path, file_name, text)
            elif option.kind == "repeated":
                values[option.name] = tuple(option.parse(item) for item in text.split())
            else:
                values[option.name] = option.parse(text)
        except ValueError as e:
            if isinstance(e, ConfigFileError):
                raise
            raise ConfigFileError(f"config file {path}: {file_name}: {e}") from None
    return values


__all__ = [
    "BY_NAME",
    "DEFAULTS",
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_MAX_SESSIONS_PER_CLIENT",
    "DEFAULT_MAX_SESSIONS_PER_TOKEN",
    "OPTIONS",
    "Option",
    "read_options_file",
]
