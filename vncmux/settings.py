"""
The proxy's settings: parsed once, frozen, shared by every session.

The defaults are the options' (L{vncmux.options.OPTIONS}), so a C{Settings()} built in a
test or by a program that embeds vncmux is the proxy that ``twistd vncmux`` runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vncmux.options import BY_NAME, DEFAULTS

if TYPE_CHECKING:
    from vncmux.handshake import IPNetwork

DEFAULT_LISTEN: str = BY_NAME["listen"].default
DEFAULT_TOKENS: str = BY_NAME["tokens"].default
DEFAULT_METRICS: str = BY_NAME["metrics"].default


@dataclass(frozen=True, slots=True)
class Limits:
    """Session limits and timeouts; 0 turns each one off."""

    idle_timeout: float = DEFAULTS["limits.idle_timeout"]
    max_session: float = DEFAULTS["limits.max_session"]
    enforce_expiry: bool = DEFAULTS["limits.enforce_expiry"]
    max_sessions: int = DEFAULTS["limits.max_sessions"]
    max_sessions_per_token: int = DEFAULTS["limits.max_sessions_per_token"]
    max_sessions_per_client: int = DEFAULTS["limits.max_sessions_per_client"]
    max_pending: int = DEFAULTS["limits.max_pending"]
    max_pending_per_client: int = DEFAULTS["limits.max_pending_per_client"]
    ping_interval: float = DEFAULTS["limits.ping_interval"]
    ping_timeout: float = DEFAULTS["limits.ping_timeout"]
    flush_interval: float = DEFAULTS["limits.flush_interval"]
    #: Not an option: how often the supervisor looks at every session.
    sweep_interval: float = 1.0



@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a session needs to know about the proxy's configuration."""

    #: The noVNC listener (console type ``novnc``).
    listen: str = DEFAULTS["listen"]
    #: ``--serial-listen``: the serial console listener (console type ``serial``); None: off.
    serial_listen: str | None = DEFAULTS["serial_listen"]
    #: ``--spice-listen``: the SPICE HTML5 listener (console type ``spice-html5``); None: off.
    spice_listen: str | None = DEFAULTS["spice_listen"]
    tokens: str = DEFAULTS["tokens"]
    #: The noVNC files served on the listener (after the search for noVNC); None: none.
    web: str | None = DEFAULTS["web"]
    #: ``--spice-web``: the SPICE listener's pages (spice-html5); None: C{web}.
    spice_web: str | None = DEFAULTS["spice_web"]
    #: ``--web-timeout``: seconds a plain HTTP connection (the ``--web`` files) may stay open.
    web_timeout: float = DEFAULTS["web_timeout"]
    metrics: str | None = DEFAULTS["metrics"]
    connect_timeout: float = DEFAULTS["connect_timeout"]
    store_timeout: float = DEFAULTS["store_timeout"]
    #: With nova's database as the token store: seconds between re-checks of live sessions.
    nova_recheck_interval: float = DEFAULTS["nova_recheck_interval"]
    refusal_timeout: float = DEFAULTS["refusal_timeout"]
    close_timeout: float = DEFAULTS["close_timeout"]
    allowed_origins: tuple[str, ...] = DEFAULTS["allowed_origins"]
    trusted_proxies: tuple[IPNetwork, ...] = DEFAULTS["trusted_proxies"]
    #: ``--allowed-backend``: empty means anywhere (link-local addresses still refused).
    allowed_backends: tuple[IPNetwork, ...] = DEFAULTS["allowed_backends"]
    #: ``--max-failed-tokens``: failed token lookups per client address and minute before
    #: a cooldown (0: no limit).
    max_failed_tokens: int = DEFAULTS["max_failed_tokens"]
    #: ``--tls-min-version`` of ``ssl:`` listeners.
    tls_min_version: str = DEFAULTS["tls_min_version"]
    #: ``--auth-schemes``: what the RFB security proxy may negotiate with VNC servers.
    auth_schemes: tuple[str, ...] = DEFAULTS["auth_schemes"]
    #: nova's ``vencrypt_*``: CA bundle, client certificate and key for VeNCrypt's TLS.
    vencrypt_ca_certs: str | None = DEFAULTS["vencrypt_ca_certs"]
    vencrypt_client_cert: str | None = DEFAULTS["vencrypt_client_cert"]
    vencrypt_client_key: str | None = DEFAULTS["vencrypt_client_key"]
    idle_activity: str = DEFAULTS["idle_activity"]
    drain_timeout: float = DEFAULTS["drain_timeout"]
    #: ``--fleet-heartbeat``: with Redis, seconds between the fleet registry's heartbeats.
    fleet_heartbeat: float = DEFAULTS["fleet_heartbeat"]
    #: ``--admin-token-file``: the admin API's secret; None: the admin API is off.
    admin_token_file: str | None = DEFAULTS["admin_token_file"]
    #: ``--base-url``: the noVNC page that ``POST /tokens`` builds access URLs on.
    base_url: str = DEFAULTS["base_url"]
    limits: Limits = Limits()

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> Settings:
        """The settings of option values by option name (twistd's Options, say); each
        option's value goes where the table says, the rest keep their defaults."""
        fields: dict[str, Any] = {}
        limits: dict[str, Any] = {}
        for name, option in BY_NAME.items():
            target = option.target
            if target is None or name not in values:
                continue
            value = values[name]
            if option.kind == "repeated":
                value = tuple(value)
            elif option.kind == "flag":
                value = bool(value)
            if target.startswith("limits."):
                limits[target.removeprefix("limits.")] = value
            else:
                fields[target] = value
        return cls(**fields, limits=replace(Limits(), **limits))

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
