"""Pure checks on a WebSocket upgrade request: token, subprotocol, Origin, client address.

Nothing here does I/O; the WebSocket protocol feeds it autobahn's parsed request.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsupportedSubprotocol(ValueError):
    """The client offered subprotocols, none of them ``binary``."""


def choose_subprotocol(offered: Sequence[str]) -> str | None:
    """``binary`` when offered, no subprotocol when none is offered (noVNC 1.x)."""
    if not offered:
        return None
    if "binary" in offered:
        return "binary"
    raise UnsupportedSubprotocol(", ".join(offered))


def find_token(params: Mapping[str, Sequence[str]], headers: Mapping[str, str]) -> str | None:
    """The ``token`` query parameter, else the ``token`` cookie (nova's and noVNC's convention)."""
    values = params.get("token")
    if values and values[0]:
        return values[0]
    cookie_header = headers.get("cookie")
    if not cookie_header:
        return None
    try:
        cookies = SimpleCookie(cookie_header)
    except CookieError:
        return None
    morsel = cookies.get("token")
    return morsel.value if morsel is not None and morsel.value else None


def parse_networks(specs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (or single addresses) for ``--trusted-proxy``; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(spec.strip(), strict=False) for spec in specs)


def is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    """Whether a peer address falls inside one of the trusted proxy networks."""
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_address(peer: str, headers: Mapping[str, str], trusted: Sequence[IPNetwork]) -> str:
    """
    The address to log and limit by: the peer, or, when the peer is a trusted proxy, the
    right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy. Entries may
    carry a port (``192.0.2.1:5000``, ``[2001:db8::1]:5000``, as some proxies write them);
    the port is dropped. An entry that is no address at all yields the peer.
    """
    if not is_trusted(peer, trusted):
        return peer
    forwarded = headers.get("x-forwarded-for", "")
    for entry in reversed([part.strip() for part in forwarded.split(",") if part.strip()]):
        address = forwarded_address(entry)
        if address is None:
            return peer
        if not is_trusted(address, trusted):
            return address
    return peer


def forwarded_address(entry: str) -> str | None:
    """
    The IP address of one ``X-Forwarded-For`` entry, in its normal spelling: ``ip``,
    ``ipv4:port``, ``[ipv6]`` or ``[ipv6]:port``; C{None} when it is none of these.
    """
    host = entry
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not _is_port(rest[1:] if rest[0] == ":" else "")):
            return None
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    if entry.count(":") == 1:  # an IPv4 address with a port; bare IPv6 has several
        host, _, port = entry.partition(":")
        if not _is_port(port):
            return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


def request_scheme(secure: bool, peer_trusted: bool, headers: Mapping[str, str]) -> str:
    """``https`` or ``http`` as the browser saw it (X-Forwarded-Proto only from a trusted peer)."""
    if peer_trusted:
        proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            return proto
    return "https" if secure else "http"


def origin_allowed(
    origin: str | None, host: str | None, scheme: str, allowed: Sequence[str]
) -> bool:
    """
    Whether a browser Origin may open a console: the same scheme, host and port as the
    request, or one of the ``--allowed-origin`` patterns (L{parse_origin_pattern}). Origins
    are compared as parsed (scheme, host, port) tuples, never as strings, so
    ``http://console.example.org.evil.com`` is not ``http://console.example.org``.
    A missing Origin is allowed: only browsers send it, and non-browser clients hold the token.
    """
    if origin is None or origin == "":
        return True
    parsed = parse_origin(origin)
    if parsed is None:  # "null" (sandboxed pages, file:) or garbage
        return False
    for text in allowed:
        try:
            pattern = parse_origin_pattern(text)
        except ValueError:
            continue  # refused when the options were parsed
        if pattern.matches(parsed):
            return True
    if host is None:
        return False
    own = parse_origin(f"{scheme}://{host}")
    return own is not None and parsed == own


DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")


@dataclass(frozen=True, slots=True)
class Origin:
    """A browser origin as a tuple: lower-case scheme and host (IPv6 without brackets), port."""

    scheme: str
    host: str
    port: int


def parse_origin(text: str) -> Origin | None:
    """
    ``scheme://host[:port]`` (http or https) as an L{Origin}, the scheme's default port when
    none is given; C{None} for anything else (``null``, a path, credentials, a bad port).
    """
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or parts.path or parts.query or parts.fragment:
        return None
    if "@" in parts.netloc or not parts.hostname or not _valid_host(parts.hostname):
        return None
    return Origin(scheme, parts.hostname, DEFAULT_PORTS[scheme] if port is None else port)


def _valid_host(host: str) -> bool:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return all(_LABEL.fullmatch(label) for label in host.split("."))


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """
    One ``--allowed-origin``: an exact origin, or with C{subdomains} any host that ends in
    ``.<host>`` (``https://*.example.com``: one or more labels in front of ``example.com``,
    never ``example.com`` itself, never ``evilexample.com``). The scheme always matches
    exactly, the port too unless C{any_port} (``https://example.com:*``, nova's
    ``allowed_origins`` semantics); C{any_origin} (the pattern ``*``) turns the check off.
    """

    scheme: str
    host: str
    port: int
    subdomains: bool = False
    any_origin: bool = False
    any_port: bool = False

    def matches(self, origin: Origin) -> bool:
        """Whether C{origin} is one this pattern allows."""
        if self.any_origin:
            return True
        if origin.scheme != self.scheme or not (self.any_port or origin.port == self.port):
            return False
        if self.subdomains:
            return origin.host.endswith("." + self.host)
        return origin.host == self.host


@functools.lru_cache(maxsize=256)
def parse_origin_pattern(text: str) -> OriginPattern:
    """
    Parse ``--allowed-origin``: ``scheme://host[:port]`` (http or https; the scheme's default
    port when none is given; ``:*`` for any port), where the host may start with ``*.`` as a
    whole label, or ``*`` alone for any origin. C{ValueError} says what is wrong; no other
    wildcard is taken.
    """
    text = text.strip()
    if text == "*":
        return OriginPattern("*", "*", 0, any_origin=True)
    any_port = text.endswith(":*")
    if any_port:
        text = text[:-2]
    scheme, sep, rest = text.partition("://")
    subdomains = rest.startswith("*.")
    if subdomains:
        rest = rest[2:]
    if not sep or "*" in rest:
        raise ValueError(
            f"{text!r} is not scheme://host[:port]; a '*' may only be the whole first label"
            " (https://*.example.com) or the whole pattern"
        )
    origin = parse_origin(f"{scheme}://{rest}")
    if origin is None:
        raise ValueError(f"{text!r} is not http(s)://host[:port] (no path, no credentials)")
    if subdomains and ":" in origin.host:
        raise ValueError(f"{text!r}: '*.' goes in front of a host name, not an address")
    return OriginPattern(
        origin.scheme, origin.host, origin.port, subdomains=subdomains, any_port=any_port
    )
