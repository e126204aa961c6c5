"""
Where a token leads: ``host:port`` targets, as token files, Redis records, the CLI and the
admin API write them. One parser, so all of them accept and refuse the same hosts.
"""

from __future__ import annotations

import ipaddress


class BadTarget(ValueError):
    """A token's target is not a usable ``host:port``."""


def parse_target(text: str) -> tuple[str, int]:
    """
    Parse ``host:port``, ``[v6addr]:port`` or a bare IPv6 address followed by ``:port``.

    The port is taken after the last colon, so an unbracketed IPv6 address still parses
    (websockify's TokenFile splits the same way). This is the one place that takes brackets
    off: only a balanced pair around an IPv6 address, so ``[h``, ``h]`` and ``[[h]]`` are
    refused rather than half-stripped.
    """
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise BadTarget(f"target {text!r} is not host:port")
    if host.startswith("[") != host.endswith("]"):
        raise BadTarget(f"target {text!r} has an unbalanced IPv6 bracket")
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadTarget(f"target {text!r} has an invalid IPv6 address") from None
    elif ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadTarget(f"target {text!r} is not host:port") from None
    if not host or "[" in host or "]" in host or any(c.isspace() for c in host):
        raise BadTarget(f"target {text!r} has an invalid host")
    return host, parse_port(port_text, text)


def parse_port(port_text: str | int, context: str = "") -> int:
    """A TCP port from text or int, 1 to 65535."""
    try:
        port = int(port_text)
    except (TypeError, ValueError):
        raise BadTarget(f"port {port_text!r} of {context or 'target'} is not a number") from None
    if not 0 < port < 65536:
        raise BadTarget(f"port {port} of {context or 'target'} is out of range")
    return port


def check_target(host: str, port: int | str) -> tuple[str, int]:
    """
    A target given as separate host and port (CLI, admin API, a Redis record): a host name
    or address, IPv6 with or without one balanced pair of brackets. Returns them normalized
    (no brackets); L{BadTarget} says what is wrong. Brackets are left to L{parse_target}, so
    both accept and refuse the same hosts.
    """
    if not host or any(c.isspace() for c in host):
        raise BadTarget("host must be a host name or address")
    checked_port = parse_port(port, "port")
    if host.startswith("[") or host.endswith("]"):
        return parse_target(f"{host}:{checked_port}")
    return parse_target(format_target(host, checked_port))


def check_instance(instance_uuid: str) -> str:
    """An instance UUID as given by an operator: no whitespace (it names a Redis set)."""
    if any(c.isspace() for c in instance_uuid):
        raise BadTarget("instance_uuid must not contain spaces")
    return instance_uuid


def format_target(host: str, port: int) -> str:
    """The inverse of L{parse_target}: brackets around IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
