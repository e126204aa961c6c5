"""
Reading nova's own configuration file (``--nova-config /etc/nova/nova.conf``), so that vncmux
can stand in for nova-novncproxy with the settings the cell already has.

oslo.config files are INI files, but not Python's flavour: ``%`` is a plain character (no
interpolation), ``[DEFAULT]`` is a section like the others, a repeated option keeps its last
value, and an option may still be spelled by its deprecated group or name.
"""

from __future__ import annotations

import configparser
import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from twisted.logger import Logger

_log = Logger()

#: nova-novncproxy's defaults (nova/conf/vnc.py).
DEFAULT_NOVNCPROXY_HOST = "0.0.0.0"
DEFAULT_NOVNCPROXY_PORT = 6080


@dataclass(frozen=True, slots=True)
class NovaConfig:
    """The options of nova.conf that concern a console proxy, with nova's defaults."""

    path: str
    #: ``[database] connection``: holds the database password, so kept out of C{repr}.
    database_connection: str | None = field(default=None, repr=False)
    allowed_origins: tuple[str, ...] = ()
    novncproxy_host: str = DEFAULT_NOVNCPROXY_HOST
    novncproxy_port: int = DEFAULT_NOVNCPROXY_PORT
    novncproxy_base_url: str | None = None
    web: str | None = None
    enforce_session_timeout: bool = False
    #: ``[vnc] auth_schemes`` and ``vencrypt_*``: the RFB security proxy's settings.
    auth_schemes: tuple[str, ...] = ("none",)
    vencrypt_client_key: str | None = None
    vencrypt_client_cert: str | None = None
    vencrypt_ca_certs: str | None = None
    spice_enabled: bool = False
    html5proxy_host: str = "0.0.0.0"
    html5proxy_port: int = 6082
    serial_console_enabled: bool = False
    serialproxy_host: str = "0.0.0.0"
    serialproxy_port: int = 6083
    ssl_only: bool = False
    cert: str | None = None
    key: str | None = None
    ssl_minimum_version: str | None = None
    ssl_ciphers: str | None = None
    record: str | None = None

    def listen_endpoint(self) -> str:
        """``[vnc] novncproxy_host/port`` as a Twisted endpoint string."""
        return _tcp_endpoint(self.novncproxy_host, self.novncproxy_port)

    def spice_listen_endpoint(self) -> str:
        """``[spice] html5proxy_host/port`` as a Twisted endpoint string."""
        return _tcp_endpoint(self.html5proxy_host, self.html5proxy_port)

    def serial_listen_endpoint(self) -> str:
        """``[serial_console] serialproxy_host/port`` as a Twisted endpoint string."""
        return _tcp_endpoint(self.serialproxy_host, self.serialproxy_port)

    def origin_patterns(self) -> list[str]:
        """
        ``[console] allowed_origins`` as ``--allowed-origin`` patterns. Nova lists host names
        and accepts them with any port, with the scheme of the token's access URL: here the
        scheme of ``[vnc] novncproxy_base_url`` when this file sets it, else http and https.
        """
        scheme = urlsplit(self.novncproxy_base_url or "").scheme.lower()
        schemes = (scheme,) if scheme in ("http", "https") else ("http", "https")
        patterns = []
        for hostname in self.allowed_origins:
            if "*" in hostname:
                continue  # nova compares names literally: no browser Origin can match it
            in_url = f"[{hostname}]" if ":" in hostname else hostname
            patterns += [f"{scheme}://{in_url.lower()}:*" for scheme in schemes]
        return patterns

    def not_applied(self) -> list[str]:
        """The options set in the file that vncmux does not honour yet, with what happens."""
        notes = []
        if self.ssl_only or self.cert or self.key:
            notes.append(
                "[DEFAULT] ssl_only/cert/key: give vncmux an ssl: endpoint with --listen"
                " (e.g. ssl:6080:privateKey=KEY:certKey=CERT)"
            )
        if self.ssl_minimum_version or self.ssl_ciphers:
            notes.append(
                "[console] ssl_minimum_version/ssl_ciphers: not applied; TLS settings belong"
                " to the ssl: endpoint given with --listen"
            )
        if self.record:
            notes.append("[DEFAULT] record: vncmux records no session traffic")
        return notes


def read_nova_config(path: str) -> NovaConfig:
    """Read nova.conf; C{OSError} if unreadable, C{ValueError} if malformed."""
    parser = configparser.ConfigParser(
        interpolation=None,
        strict=False,
        default_section="\x00 no default section",  # [DEFAULT] is a plain section in oslo
    )
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except configparser.Error as e:
        raise ValueError(str(e).splitlines()[0]) from None
    conf = _Options(parser)
    return NovaConfig(
        path=path,
        database_connection=conf.text("database", "connection") or None,
        allowed_origins=conf.items(
            "console", "allowed_origins", ("DEFAULT", "console_allowed_origins")
        ),
        novncproxy_host=conf.text("vnc", "novncproxy_host", ("DEFAULT", "novncproxy_host"))
        or DEFAULT_NOVNCPROXY_HOST,
        novncproxy_port=conf.port(
            "vnc", "novncproxy_port", DEFAULT_NOVNCPROXY_PORT, ("DEFAULT", "novncproxy_port")
        ),
        novncproxy_base_url=conf.text(
            "vnc", "novncproxy_base_url", ("DEFAULT", "novncproxy_base_url")
        )
        or None,
        web=conf.text("DEFAULT", "web") or None,
        enforce_session_timeout=conf.flag("consoleauth", "enforce_session_timeout"),
        auth_schemes=conf.items("vnc", "auth_schemes") or ("none",),
        vencrypt_client_key=conf.text("vnc", "vencrypt_client_key") or None,
        vencrypt_client_cert=conf.text("vnc", "vencrypt_client_cert") or None,
        vencrypt_ca_certs=conf.text("vnc", "vencrypt_ca_certs") or None,
        spice_enabled=conf.flag("spice", "enabled"),
        html5proxy_host=conf.text("spice", "html5proxy_host") or "0.0.0.0",
        html5proxy_port=conf.port("spice", "html5proxy_port", 6082),
        serial_console_enabled=conf.flag("serial_console", "enabled"),
        serialproxy_host=conf.text("serial_console", "serialproxy_host") or "0.0.0.0",
        serialproxy_port=conf.port("serial_console", "serialproxy_port", 6083),
        ssl_only=conf.flag("DEFAULT", "ssl_only"),
        cert=conf.text("DEFAULT", "cert") or None,
        key=conf.text("DEFAULT", "key") or None,
        ssl_minimum_version=conf.text("console", "ssl_minimum_version") or None,
        ssl_ciphers=conf.text("console", "ssl_ciphers") or None,
        record=conf.text("DEFAULT", "record") or None,
    )


def log_not_applied(config: NovaConfig) -> None:
    """Tell the operator, once at start, which of nova's console options have no effect."""
    for note in config.not_applied():
        _log.warn("{path}: {note}", path=config.path, note=note)


class _Options:
    """oslo.config's lookups over a parsed file: the current spelling first, then the old."""

    def __init__(self, parser: configparser.ConfigParser) -> None:
        self._parser = parser

    def text(self, section: str, name: str, *deprecated: tuple[str, str]) -> str:
        for group, option in ((section, name), *deprecated):
            if self._parser.has_option(group, option):
                return _unquote(self._parser.get(group, option).strip())
        return ""

    def items(self, section: str, name: str, *deprecated: tuple[str, str]) -> tuple[str, ...]:
        """A ListOpt: comma-separated, blanks dropped."""
        value = self.text(section, name, *deprecated)
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def flag(self, section: str, name: str) -> bool:
        value = self.text(section, name).lower()
        if value in ("", "0", "false", "no", "off"):
            return False
        if value in ("1", "true", "yes", "on"):
            return True
        raise ValueError(f"[{section}] {name} = {value!r} is not a boolean")

    def port(self, section: str, name: str, default: int, *deprecated: tuple[str, str]) -> int:
        value = self.text(section, name, *deprecated)
        if not value:
            return default
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ValueError(f"[{section}] {name} = {value!r} is not a port number")
        return int(value)


def _unquote(value: str) -> str:
    """oslo.config strips one pair of matching quotes around a value."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _tcp_endpoint(host: str, port: int) -> str:
    """A listening endpoint string; IPv6 addresses need ``tcp6`` and escaped colons."""
    try:
        family = "tcp6" if ipaddress.ip_address(host).version == 6 else "tcp"
    except ValueError:
        family = "tcp"  # a host name: Twisted resolves it when binding
    escaped = host.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
    return f"{family}:{port}:interface={escaped}"


__all__ = ["NovaConfig", "log_not_applied", "read_nova_config"]
