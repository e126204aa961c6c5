"""Pure checks on a WebSocket upgrade request: token, subprotocol, Origin, client address.

Nothing here does I/O; the WebSocket protocol feeds it autobahn's parsed request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
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
    right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy.
    """
    if not is_trusted(peer, trusted):
        return peer
    forwarded = headers.get("x-forwarded-for", "")
    for entry in reversed([part.strip() for part in forwarded.split(",") if part.strip()]):
        if not is_trusted(entry, trusted):
            try:
                return str(ipaddress.ip_address(entry))
            except ValueError:
                return peer
    return peer


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
    Whether a browser Origin may open a console: the same host (and scheme) as the request,
    or one of the ``--allowed-origin`` patterns (``https://*.example.com`` style).
    A missing Origin is allowed: only browsers send it, and non-browser clients hold the token.
    """
    if origin is None or origin == "":
        return True
    origin = origin.strip().lower()
    for pattern in allowed:
        if fnmatchcase(origin, pattern.strip().lower()):
            return True
    if host is None or origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme != scheme:
        return False
    return _same_host(parts.netloc, host.strip().lower(), scheme)


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _same_host(origin_netloc: str, host_header: str, scheme: str) -> bool:
    def split(netloc: str) -> tuple[str, str]:
        if netloc.startswith("["):
            end = netloc.find("]")
            name, rest = netloc[: end + 1], netloc[end + 1 :]
            port = rest[1:] if rest.startswith(":") else ""
        else:
            name, _, port = netloc.partition(":")
        return name, port or _DEFAULT_PORTS.get(scheme, "")

    return split(origin_netloc) == split(host_header)
