"""The proxy's settings, parsed once from the command line and shared by every session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vncmux.handshake import IPNetwork

DEFAULT_LISTEN = "tcp:6080:interface=127.0.0.1"
DEFAULT_TOKENS = "file:etc/tokens"
DEFAULT_METRICS = "tcp:9108:interface=127.0.0.1"
#: ``--max-failed-tokens``: failed lookups per client address and minute.
DEFAULT_MAX_FAILED = 20
#: ``--nova-recheck-interval``: seconds between re-checks of live sessions' nova tokens.
DEFAULT_RECHECK_INTERVAL = 10.0
#: ``--tls-min-version`` of ``ssl:`` listeners.
DEFAULT_TLS_MIN_VERSION = "1.2"


@dataclass(frozen=True, slots=True)
class Limits:
    """Session limits and timeouts; 0 turns each one off."""

    idle_timeout: float = 1800.0
    max_session: float = 0.0
    enforce_expiry: bool = False
    max_sessions: int = 0
    max_sessions_per_token: int = 0
    max_sessions_per_client: int = 0
    max_pending: int = 1024
    max_pending_per_client: int = 32
    ping_interval: float = 30.0
    ping_timeout: float = 20.0
    sweep_interval: float = 1.0
    flush_interval: float = 10.0



@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a session needs to know about the proxy's configuration."""

    #: The noVNC listener (console type ``novnc``).
    listen: str = DEFAULT_LISTEN
    #: ``--serial-listen``: the serial console listener (console type ``serial``); None: off.
    serial_listen: str | None = None
    #: ``--spice-listen``: the SPICE HTML5 listener (console type ``spice-html5``); None: off.
    spice_listen: str | None = None
    tokens: str = DEFAULT_TOKENS
    web: str | None = None
    #: ``--spice-web``: the SPICE listener's pages (spice-html5); None: C{web}.
    spice_web: str | None = None
    #: ``--web-timeout``: seconds a plain HTTP connection (the ``--web`` files) may stay open.
    web_timeout: float = 60.0
    metrics: str | None = DEFAULT_METRICS
    connect_timeout: float = 5.0
    store_timeout: float = 2.0
    #: With nova's database as the token store: seconds between re-checks of live sessions.
    nova_recheck_interval: float = DEFAULT_RECHECK_INTERVAL
    refusal_timeout: float = 5.0
    close_timeout: float = 10.0
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: ``--allowed-backend``: empty means anywhere (link-local addresses still refused).
    allowed_backends: tuple[IPNetwork, ...] = ()
    #: ``--max-failed-tokens``: failed token lookups per client address and minute before
    #: a cooldown (0: no limit).
    max_failed_tokens: int = DEFAULT_MAX_FAILED
    #: ``--tls-min-version`` of ``ssl:`` listeners.
    tls_min_version: str = DEFAULT_TLS_MIN_VERSION
    #: ``--auth-schemes``: what the RFB security proxy may negotiate with VNC servers.
    auth_schemes: tuple[str, ...] = ("none",)
    #: nova's ``vencrypt_*``: CA bundle, client certificate and key for VeNCrypt's TLS.
    vencrypt_ca_certs: str | None = None
    vencrypt_client_cert: str | None = None
    vencrypt_client_key: str | None = None
    idle_activity: str = "input"
    drain_timeout: float = 30.0
    limits: Limits = Limits()

    @property
    def listeners(self) -> tuple[tuple[str, str], ...]:
        """``(console_type, endpoint)`` of every console listener, the noVNC one first."""
        listeners = [("novnc", self.listen)]
        if self.serial_listen is not None:
            listeners.append(("serial", self.serial_listen))
        if self.spice_listen is not None:
            listeners.append(("spice-html5", self.spice_listen))
        return tuple(listeners)

    def web_root(self, console_type: str) -> str | None:
        """The directory a listener of C{console_type} serves (when its type serves pages):
        nova's two web proxies serve different pages, noVNC's and spice-html5's."""
        if console_type == "spice-html5" and self.spice_web is not None:
            return self.spice_web
        return self.web

    @property
    def handshake_timeout(self) -> float:
        """autobahn's bound on the whole upgrade: lookup plus dial plus slack."""
        return self.store_timeout + self.connect_timeout + 3.0
