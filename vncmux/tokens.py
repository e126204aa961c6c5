"""Token records, target parsing and the in-memory token store.

A token is a bearer secret: it is hashed (SHA-256) as soon as it arrives and only the hash,
or its first 12 hex digits (the ``token_id``) in logs, is kept.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, replace

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from vncmux.interfaces import ITokenAdmin, ITokenStore

TOKEN_ID_LENGTH = 12


class TokenStoreUnavailable(Exception):
    """The token store did not answer (down, too slow, or answered garbage)."""


class BadTarget(ValueError):
    """A token's target is not a usable ``host:port``."""


def hash_token(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored and named."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_target(text: str) -> tuple[str, int]:
    """
    Parse ``host:port``, ``[v6addr]:port`` or a bare IPv6 address followed by ``:port``.

    The port is taken after the last colon, so an unbracketed IPv6 address still parses
    (websockify's TokenFile splits the same way).
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
    if not host or any(c.isspace() for c in host):
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


def format_target(host: str, port: int) -> str:
    """The inverse of L{parse_target}: brackets around IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """
    What a token opens, with the field names of nova's consoleauth record.

    Times are unix seconds; ``expires_at`` of C{None} means the token does not expire.
    """

    token_hash: str
    host: str
    port: int
    instance_uuid: str = ""
    console_type: str = "novnc"
    internal_access_path: str = ""
    access_url: str = ""
    issued_at: float | None = None
    expires_at: float | None = None
    last_activity_at: float | None = None
    max_sessions: int | None = None
    single_use: bool = False
    password: str | None = None

    @property
    def token_id(self) -> str:
        """The short, non-secret name of the token in logs, metrics and the admin API."""
        return self.token_hash[:TOKEN_ID_LENGTH]

    @property
    def target(self) -> str:
        """``host:port`` for logs and the admin API."""
        return format_target(self.host, self.port)

    def expired(self, now: float) -> bool:
        """Whether the token's ``expires_at`` has passed at C{now}."""
        return self.expires_at is not None and now >= self.expires_at

    def to_fields(self) -> dict[str, str]:
        """The Redis HASH fields of DESIGN.md section 4 (unset optional fields left out)."""
        fields = {
            "host": self.host,
            "port": str(self.port),
            "instance_uuid": self.instance_uuid,
            "console_type": self.console_type,
            "internal_access_path": self.internal_access_path,
            "access_url": self.access_url,
        }
        for name in ("issued_at", "expires_at", "last_activity_at", "max_sessions"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = _number_text(value)
        if self.single_use:
            fields["single_use"] = "1"
        if self.password is not None:
            fields["password"] = self.password
        return fields

    @classmethod
    def from_fields(cls, token_hash: str, fields: dict[str, str]) -> TokenRecord:
        """Build a record from Redis HASH fields (or a nova-shaped JSON object)."""
        try:
            host = str(fields["host"])
        except KeyError:
            raise BadTarget("token record has no host") from None
        if "port" in fields and fields["port"] not in (None, ""):
            port = parse_port(fields["port"], "token record")
        else:
            host, port = parse_target(host)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(
            token_hash=token_hash,
            host=host,
            port=port,
            instance_uuid=str(fields.get("instance_uuid") or ""),
            console_type=str(fields.get("console_type") or "novnc"),
            internal_access_path=str(fields.get("internal_access_path") or ""),
            access_url=str(fields.get("access_url") or ""),
            issued_at=_optional_float(fields.get("issued_at")),
            expires_at=_optional_float(fields.get("expires_at")),
            last_activity_at=_optional_float(fields.get("last_activity_at")),
            max_sessions=_optional_int(fields.get("max_sessions")),
            single_use=str(fields.get("single_use", "")).lower() in ("1", "true", "yes"),
            password=fields.get("password") or None,
        )


def parse_token_value(token_hash: str, value: str) -> TokenRecord:
    """
    Read a websockify-style token value: ``host:port``, JSON ``{"host": "host:port"}``, or a
    JSON object shaped like nova's consoleauth record (``host`` plus ``port``).
    """
    value = value.strip()
    if value.startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError as e:
            raise BadTarget(f"token value is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise BadTarget("token value JSON is not an object")
        return TokenRecord.from_fields(token_hash, {k: v for k, v in obj.items() if v is not None})
    host, port = parse_target(value)
    return TokenRecord(token_hash=token_hash, host=host, port=port)


def _number_text(value: float | int) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _optional_float(value: object) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BadTarget(f"token record field {value!r} is not a number") from None


def _optional_int(value: object) -> int | None:
    number = _optional_float(value)
    return None if number is None else int(number)


@implementer(ITokenStore, ITokenAdmin)
class MemoryTokenStore:
    """A token store in a dict: for embedding vncmux in another program, and for tests."""

    def __init__(self, records: dict[str, TokenRecord] | None = None) -> None:
        self._records: dict[str, TokenRecord] = dict(records or {})
        self.available = True

    def add(self, token: str, host: str, port: int, **fields: object) -> TokenRecord:
        """Store a record for C{token} at once (a convenience for tests and embedding)."""
        record = TokenRecord(hash_token(token), host, port, **fields)  # type: ignore[arg-type]
        self._records[record.token_hash] = record
        return record

    def lookup(self, token: str) -> Deferred[TokenRecord | None]:
        if not self.available:
            return fail(TokenStoreUnavailable("memory store marked unavailable"))
        return succeed(self._records.get(hash_token(token)))

    def ping(self) -> Deferred[None]:
        if not self.available:
            return fail(TokenStoreUnavailable("memory store marked unavailable"))
        return succeed(None)

    def issue(self, record: TokenRecord, token: str) -> Deferred[None]:
        self._records[hash_token(token)] = replace(record, token_hash=hash_token(token))
        return succeed(None)

    def show(self, token: str) -> Deferred[TokenRecord | None]:
        return self.lookup(token)

    def revoke(self, token_hash: str) -> Deferred[bool]:
        return succeed(self._records.pop(token_hash, None) is not None)

    def revoke_instance(self, instance_uuid: str) -> Deferred[int]:
        doomed = [h for h, r in self._records.items() if r.instance_uuid == instance_uuid]
        for token_hash in doomed:
            del self._records[token_hash]
        return succeed(len(doomed))
