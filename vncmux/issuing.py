"""
Issuing a token: one request type and one path, for ``vncmux token add`` and the admin API.

The caller checks its own input into a L{TokenRequest} (argparse for the command line, a JSON
body for ``POST /tokens``); L{issue_token} then checks the target against the backend policy,
draws the token, stores its record and says how to reach the console.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from twisted.internet.defer import Deferred

from vncmux.backendpolicy import BackendPolicy
from vncmux.interfaces import ITokenAdmin
from vncmux.tokens import TokenRecord

DEFAULT_BASE_URL = "http://127.0.0.1:6080/vnc_lite.html"


def new_token() -> str:
    """C{secrets.token_urlsafe(32)}, never starting with ``-`` (it would read as an option)."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def check_base_url(url: str) -> str:
    """
    A base URL for access URLs: ``http://`` or ``https://`` with a host, nothing else (a
    ``javascript:`` or ``data:`` URL handed to a user would run in their browser).
    """
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    return url.strip()


def access_url(base_url: str, token: str) -> str:
    """noVNC's URL for a token: ``BASE?path=websockify%3Ftoken%3D<token>``."""
    joiner = "&" if "?" in base_url else "?"
    return f"{base_url}{joiner}path={quote(f'websockify?token={token}', safe='')}"


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What a new token opens and for how long; the target is checked (L{check_target})."""

    host: str
    port: int
    ttl: float | None = None
    instance_uuid: str = ""
    console_type: str = "novnc"
    single_use: bool = False
    max_sessions: int | None = None
    password: str | None = None
    base_url: str = DEFAULT_BASE_URL

    def record(self, token: str, now: float) -> TokenRecord:
        """The record stored for C{token} issued at C{now}."""
        return TokenRecord.issued(
            token,
            self.host,
            self.port,
            now,
            self.ttl,
            instance_uuid=self.instance_uuid,
            console_type=self.console_type,
            access_url=self.base_url,
            max_sessions=self.max_sessions,
            single_use=self.single_use,
            password=self.password,
        )


@dataclass(frozen=True, slots=True)
class Issued:
    """A stored token: the secret to hand to the user once, its record and its URL."""

    token: str
    record: TokenRecord
    access_url: str


def issue_token(
    request: TokenRequest, store: ITokenAdmin, policy: BackendPolicy, now: float
) -> Deferred[Issued]:
    """
    Store a new token for C{request} at C{now}. Fails with L{vncmux.refusals.Refused} when
    the policy forbids the target (nothing stored), or with the store's error.
    """
    checking = policy.check_issue(request.host, request.port)

    def store_it(_: object) -> Deferred[Issued]:
        token = new_token()
        record = request.record(token, now)
        storing: Deferred[None] = store.issue(record, token)
        return storing.addCallback(
            lambda _: Issued(token, record, access_url(request.base_url, token))
        )

    return checking.addCallback(store_it)


__all__ = [
    "DEFAULT_BASE_URL",
    "Issued",
    "TokenRequest",
    "access_url",
    "check_base_url",
    "issue_token",
    "new_token",
]
