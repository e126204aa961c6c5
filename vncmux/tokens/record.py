"""
Token records and hashing.

A token is a bearer secret: it is hashed (SHA-256) as soon as it arrives and only the hash,
or its first 12 hex digits (the ``token_id``) in logs, is kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from vncmux.tokens.targets import BadTarget, check_target, format_target, parse_port, parse_target

TOKEN_ID_LENGTH = 12


def hash_token(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored and named."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_id_of(token_hash: str) -> str:
    """The short, non-secret name of a token hash in logs, metrics and the admin API."""
    return token_hash[:TOKEN_ID_LENGTH]


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
    #: Kept out of repr: records end up in logs and tracebacks.
    password: str | None = field(default=None, repr=False)

    @classmethod
    def issued(
        cls, token: str, host: str, port: int, now: float, ttl: float | None = None, **fields: Any
    ) -> TokenRecord:
        """
        The record of a token issued at C{now}, valid for C{ttl} seconds (None: no expiry);
        C{host} may be a bracketed IPv6 address (L{BadTarget} for a malformed one).
        """
        host, port = check_target(host, port)
        return cls(
            token_hash=hash_token(token),
            host=host,
            port=port,
            issued_at=now,
            expires_at=now + ttl if ttl else None,
            **fields,
        )

    @property
    def token_id(self) -> str:
        """The short, non-secret name of the token in logs, metrics and the admin API."""
        return token_id_of(self.token_hash)

    @property
    def target(self) -> str:
        """``host:port`` for logs and the admin API."""
        return format_target(self.host, self.port)

    def expired(self, now: float) -> bool:
        """Whether the token's ``expires_at`` has passed at C{now}."""
        return self.expires_at is not None and now >= self.expires_at

    def to_fields(self) -> dict[str, str]:
        """The Redis HASH fields of a token record, unset optional fields left out
        (docs/running.md, "The Redis layout")."""
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
                fields[name] = number_text(value)
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
            host, port = check_target(host, parse_port(fields["port"], "token record"))
        else:
            host, port = parse_target(host)
        password = fields.get("password")
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
            password=None if password in (None, "") else str(password),
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


def number_text(value: float | int) -> str:
    """A time or count as Redis keeps it: no ``.0`` on whole numbers, full precision else."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _optional_float(value: object) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise BadTarget(f"token record field {value!r} is not a finite number")
    return number


def _optional_int(value: object) -> int | None:
    number = _optional_float(value)
    return None if number is None else int(number)
