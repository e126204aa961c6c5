"""The admin API on the metrics port: list and end sessions, issue and revoke tokens.

Off unless ``--admin-token-file`` names a file holding the shared secret. Every request needs
``Authorization: Bearer <secret>`` (401 without it, 403 with a wrong one). After
L{FAILURE_LIMIT} wrong secrets from one client address within L{FAILURE_INTERVAL} seconds,
that address gets 429 (the secret is not even compared) until the interval is over; the log
has one warning for the first wrong secret of an interval and one line counting the rest.
Tokens are never logged: the log names them by ``token_id``, and sessions by their session id.

- ``GET /sessions``: the live sessions as a JSON list;
- ``DELETE /sessions/<id>``: end one with close code 4002 'token revoked';
- ``POST /tokens``: issue a token, like ``vncmux token add`` (JSON body: ``host``, ``port``,
  optional ``ttl``, ``instance_uuid``, ``single_use``, ``max_sessions``, ``password``,
  ``base_url``); answers 201 with ``token``, ``token_id``, ``access_url``, ``expires_at``,
  or 403 when the target is not an allowed backend (``--allowed-backend``, link-local);
- ``DELETE /tokens/<token>``: revoke one, like ``vncmux token revoke TOKEN``;
- ``DELETE /tokens?instance_uuid=<uuid>``: revoke every token of an instance, like
  ``vncmux token revoke --instance``.

Revoking also ends this process's sessions of the token at once; other proxies hear it on
the revocation channel.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from vncmux.backendpolicy import BackendPolicy
from vncmux.consoles import CONSOLE_TYPES
from vncmux.health import answer_later, write_json
from vncmux.interfaces import ISessionDirectory, ITokenAdmin
from vncmux.issuing import DEFAULT_BASE_URL, Issued, TokenRequest, check_base_url, issue_token
from vncmux.refusals import TOKEN_REVOKED, Refused
from vncmux.tokens import (
    BadTarget,
    TokenStoreUnavailable,
    UnsupportedOperation,
    check_instance,
    check_target,
    hash_token,
    token_id_of,
)

if TYPE_CHECKING:
    from vncmux.relay import Session
    from vncmux.supervisor import Supervisor

#: Bodies larger than this are refused before parsing.
MAX_BODY = 64 * 1024
#: Wrong bearer secrets one client address may send per interval before it gets 429.
FAILURE_LIMIT = 10
FAILURE_INTERVAL = 60.0

_log = Logger(namespace="vncmux.admin")


def read_admin_secret(path: str) -> bytes:
    """
    The shared secret in C{path} (its first line, surrounding whitespace removed).

    @raise ValueError: the file cannot be read or holds no secret (the message never
        contains the file's content).
    """
    try:
        with open(path, "rb") as f:
            secret = f.readline().strip()
    except OSError as e:
        raise ValueError(f"--admin-token-file {path}: {e.strerror}") from None
    if not secret:
        raise ValueError(f"--admin-token-file {path} is empty")
    return secret


class BadRequest(ValueError):
    """The request body is not what the endpoint takes; the message is shown to the caller."""


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"{name} must not be a boolean")
    if not isinstance(value, kind):
        raise BadRequest(f"{name} has the wrong type")
    return value


def token_request(body: object, default_base_url: str = DEFAULT_BASE_URL) -> TokenRequest:
    """Check a decoded ``POST /tokens`` body (the choices of ``vncmux token add``);
    L{BadRequest} names the first problem."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - set(TokenRequest.__dataclass_fields__)
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    port_value = _field(body, "port", (int, str))
    if port_value is None:
        raise BadRequest("port is required")
    try:
        host, port = check_target(_field(body, "host", str) or "", port_value)
    except BadTarget as e:
        raise BadRequest(str(e)) from None
    ttl = _field(body, "ttl", (int, float))
    if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
        raise BadRequest("ttl must be a positive number of seconds")
    try:
        instance_uuid = check_instance(_field(body, "instance_uuid", str) or "")
    except BadTarget as e:
        raise BadRequest(str(e)) from None
    console_type = _field(body, "console_type", str) or "novnc"
    if console_type not in CONSOLE_TYPES:
        raise BadRequest(f"console_type must be one of {', '.join(sorted(CONSOLE_TYPES))}")
    max_sessions = _field(body, "max_sessions", int)
    if max_sessions is not None and max_sessions <= 0:
        raise BadRequest("max_sessions must be positive")
    base_url = _field(body, "base_url", str) or default_base_url
    try:
        base_url = check_base_url(base_url)
    except ValueError as e:
        raise BadRequest(f"base_url: {e}") from None
    return TokenRequest(
        host=host,
        port=port,
        ttl=float(ttl) if ttl is not None else None,
        instance_uuid=instance_uuid,
        console_type=console_type,
        single_use=bool(_field(body, "single_use", bool)),
        max_sessions=max_sessions,
        password=_field(body, "password", str),
        base_url=base_url,
    )


def session_json(session: Session) -> dict[str, Any]:
    """One live session for ``GET /sessions``: never its token, only the token_id."""
    record = session.record
    return {
        "session_id": session.id,
        "client_address": session.client_address,
        "backend_host": record.host,
        "backend_port": record.port,
        "instance_uuid": record.instance_uuid,
        "console_type": record.console_type,
        "token_id": record.token_id,
        "started_at": session.started_at,
        "last_activity_at": session.last_activity_at,
        "bytes_to_backend": session.bytes_to_backend,
        "bytes_to_client": session.bytes_to_client,
    }


@implementer(ISessionDirectory)
class LocalSessions:
    """The sessions of this process: the supervisor's table."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def list_sessions(self) -> Deferred[list[dict[str, Any]]]:
        sessions = sorted(self._supervisor.sessions.values(), key=lambda s: s.started_at)
        return succeed([session_json(s) for s in sessions])

    def get_session(self, session_id: str) -> Deferred[dict[str, Any] | None]:
        session = self._supervisor.sessions.get(session_id)
        return succeed(None if session is None else session_json(session))

    def end_session(self, session_id: str) -> Deferred[bool]:
        return succeed(self._supervisor.end(session_id, TOKEN_REVOKED))

    def revoked(self, message: str) -> Deferred[int]:
        return succeed(self._supervisor.revoked(message))


@dataclass
class _Failures:
    count: int
    ends_at: float


class FailedSecrets:
    """
    Wrong bearer secrets per client address, in fixed intervals that start at an address's
    first wrong secret: past C{limit} in one interval the address is blocked until the
    interval ends. The first wrong secret of an interval is logged at once, the rest as one
    count once the interval is over (at the next admin request), so a guessing client
    cannot flood the log. No timers: ended intervals are swept, oldest first, whenever the
    admin API is asked anything, so memory follows the addresses of the last C{interval}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: int = FAILURE_LIMIT,
        interval: float = FAILURE_INTERVAL,
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.interval = interval
        # Insertion order is the order in which the intervals end: all last equally long.
        self._by_address: dict[str, _Failures] = {}

    def blocked(self, address: str) -> bool:
        """Whether C{address} has used up its wrong secrets for this interval."""
        self.sweep()
        entry = self._by_address.get(address)
        return entry is not None and entry.count >= self.limit

    def failed(self, address: str) -> None:
        """Count one wrong (or, once blocked, unchecked) secret from C{address}."""
        self.sweep()
        entry = self._by_address.get(address)
        if entry is not None:
            entry.count += 1
            return
        self._by_address[address] = _Failures(1, self._clock.seconds() + self.interval)
        _log.warn(
            "admin request from {client} refused: wrong secret",
            vncmux_event="admin_refused",
            client=address,
        )

    def sweep(self) -> None:
        """Forget the intervals that are over, logging how many more tries each one saw."""
        now = self._clock.seconds()
        while self._by_address:
            address, entry = next(iter(self._by_address.items()))
            if entry.ends_at > now:
                return
            del self._by_address[address]
            if entry.count > 1:
                _log.warn(
                    "admin: {count} more requests from {client} refused in {interval:g} s"
                    " (wrong secret, or blocked after {limit})",
                    vncmux_event="admin_refused_repeatedly",
                    count=entry.count - 1,
                    client=address,
                    interval=self.interval,
                    limit=self.limit,
                )


@dataclass(frozen=True)
class AdminAuth:
    """The shared secret and the wrong-secret counter every admin resource checks."""

    secret: bytes
    failures: FailedSecrets


class Guarded(Resource):
    """A resource that answers only requests carrying ``Authorization: Bearer <secret>``."""

    def __init__(self, auth: AdminAuth) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self._auth = auth

    def render(self, request: Request) -> bytes | int:
        """401 without a bearer secret, 429 for an address past its wrong secrets, 403 with
        a wrong one, else the method's answer."""
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            request.setHeader(b"www-authenticate", b'Bearer realm="vncmux"')
            return write_json(request, 401, {"error": "bearer secret required"})
        failures = self._auth.failures
        client = _client(request)
        if failures.blocked(client):
            failures.failed(client)
            request.setHeader(b"retry-after", str(int(failures.interval)).encode("ascii"))
            return write_json(request, 429, {"error": "too many wrong secrets; try later"})
        if not hmac.compare_digest(given.strip(), self._auth.secret):
            failures.failed(client)
            return write_json(request, 403, {"error": "wrong secret"})
        allowed = {n[len("render_") :] for n in dir(self) if n.startswith("render_")}
        if "GET" not in allowed:
            allowed.discard("HEAD")
        method = request.method.decode("ascii", "replace")
        if method not in allowed:
            request.setHeader(b"allow", ", ".join(sorted(allowed)).encode("ascii"))
            return write_json(request, 405, {"error": "method not allowed"})
        return getattr(self, "render_" + method)(request)  # type: ignore[no-any-return]


def _client(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "?"))


class SessionsPage(Guarded):
    """``GET /sessions`` and, through its children, ``DELETE /sessions/<id>``."""

    def __init__(self, auth: AdminAuth, sessions: ISessionDirectory) -> None:
        super().__init__(auth)
        self._sessions = sessions

    def getChild(self, path: bytes, request: Request) -> Resource:
        """``/sessions/<id>``; ``/sessions/`` is the list itself."""
        if path == b"":
            return self
        return OneSession(self._auth, self._sessions, path.decode("ascii", "replace"))

    def render_GET(self, request: Request) -> int:
        """The live sessions, oldest first."""
        listing = self._sessions.list_sessions()
        return answer_later(request, listing.addCallbacks(lambda s: (200, s), _store_failure))


class OneSession(Guarded):
    """``DELETE /sessions/<id>``: end one session with 4002 'token revoked'."""

    isLeaf = True

    def __init__(self, auth: AdminAuth, sessions: ISessionDirectory, session_id: str) -> None:
        super().__init__(auth)
        self._sessions = sessions
        self._session_id = session_id

    def render_GET(self, request: Request) -> int:
        """One session as JSON, or 404."""

        def found(session: dict[str, Any] | None) -> tuple[int, object]:
            if session is None:
                return 404, {"error": "no such session"}
            return 200, session

        getting = self._sessions.get_session(self._session_id)
        return answer_later(request, getting.addCallbacks(found, _store_failure))

    def render_DELETE(self, request: Request) -> int:
        """End the session; 404 when it is not live (any more)."""

        def ended(was_live: bool) -> tuple[int, object]:
            if not was_live:
                return 404, {"error": "no such session"}
            _log.info(
                "admin: session {session_id} ended by {client}",
                vncmux_event="admin_session_ended",
                session_id=self._session_id,
                client=_client(request),
            )
            return 200, {"ended": self._session_id}

        ending = self._sessions.end_session(self._session_id)
        return answer_later(request, ending.addCallbacks(ended, _store_failure))


class TokensPage(Guarded):
    """``POST /tokens`` (issue), ``DELETE /tokens?instance_uuid=`` and ``/tokens/<token>``."""

    def __init__(
        self,
        auth: AdminAuth,
        admin: ITokenAdmin | None,
        sessions: ISessionDirectory,
        clock: IReactorTime,
        backend_policy: BackendPolicy,
        base_url: str = DEFAULT_BASE_URL,
    ) -> None:
        super().__init__(auth)
        self._admin = admin
        self._sessions = sessions
        self._clock = clock
        self._backend_policy = backend_policy
        self._base_url = base_url

    def getChild(self, path: bytes, request: Request) -> Resource:
        """
        ``/tokens/<token>``. Twisted has already percent-decoded C{path} (once): decoding
        it again would revoke another token than the one asked for. A ``/`` in a token
        arrives here only as ``%2F``; a path with more segments names no token.
        """
        if request.postpath:
            return OneToken(self._auth, self, None)
        if path == b"":
            return self
        try:
            token = path.decode("utf-8")
        except UnicodeDecodeError:  # no token is stored under bytes that are not UTF-8
            return OneToken(self._auth, self, None)
        return OneToken(self._auth, self, token)

    def render_POST(self, request: Request) -> bytes | int:
        """Issue a token from the JSON body; 201 with the token and its access URL."""
        if self._admin is None:
            return _no_admin(request)
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_BODY:
            return write_json(request, 413, {"error": "body too large"})
        try:
            wanted = token_request(json.loads(raw or b"null"), self._base_url)
        except (ValueError, UnicodeDecodeError) as e:  # BadRequest and JSON errors
            message = str(e) if isinstance(e, BadRequest) else "the body is not valid JSON"
            return write_json(request, 400, {"error": message})
        issuing = issue_token(wanted, self._admin, self._backend_policy, self._clock.seconds())

        def issued(new: Issued) -> tuple[int, object]:
            record = new.record
            _log.info(
                "admin: token {token_id} issued for {backend} (instance {instance_uuid})",
                vncmux_event="admin_token_issued",
                token_id=record.token_id,
                backend=record.target,
                instance_uuid=record.instance_uuid,
                client=_client(request),
            )
            return 201, {
                "token": new.token,
                "token_id": record.token_id,
                "access_url": new.access_url,
                "expires_at": record.expires_at,
            }

        return answer_later(request, issuing.addCallbacks(issued, _store_failure))

    def render_DELETE(self, request: Request) -> bytes | int:
        """Revoke every token of ``?instance_uuid=``."""
        if self._admin is None:
            return _no_admin(request)
        values = request.args.get(b"instance_uuid", [])
        instance = values[0].decode("utf-8", "replace") if values else ""
        if not instance:
            return write_json(request, 400, {"error": "DELETE /tokens needs ?instance_uuid="})
        revoking = self._end_then(f"instance:{instance}", self._admin.revoke_instance, instance)

        def revoked(outcome: tuple[int, int]) -> tuple[int, object]:
            ended, count = outcome
            _log.info(
                "admin: {count} tokens of instance {instance_uuid} revoked",
                vncmux_event="admin_instance_revoked",
                count=count,
                instance_uuid=instance,
                sessions_ended=ended,
                client=_client(request),
            )
            status = 200 if count else 404
            return status, {"revoked": count, "sessions_ended": ended}

        return answer_later(request, revoking.addCallbacks(revoked, _store_failure))

    def _end_then(
        self, message: str, revoke: Callable[[str], object], argument: str
    ) -> Deferred[tuple[int, Any]]:
        """
        End the sessions of C{message} first, then C{revoke(argument)} in the store: the
        store's own announcement may reach them before its answer does, and the count of
        sessions ended must still include them. Fires with (sessions ended, store's answer).
        """

        def then(ended: int) -> Deferred[tuple[int, Any]]:
            revoking = maybeDeferred(revoke, argument)
            return revoking.addCallback(lambda answer: (ended, answer))

        return self._sessions.revoked(message).addCallback(then)

    def revoke(self, request: Request, token: str) -> bytes | int:
        """Revoke one token and end this process's sessions of it."""
        if self._admin is None:
            return _no_admin(request)
        token_hash = hash_token(token)
        revoking = self._end_then(token_hash, self._admin.revoke, token_hash)

        def revoked(outcome: tuple[int, bool]) -> tuple[int, object]:
            ended, found = outcome
            _log.info(
                "admin: token {token_id} revoked ({found})",
                vncmux_event="admin_token_revoked",
                token_id=token_id_of(token_hash),
                found="found" if found else "not found",
                sessions_ended=ended,
                client=_client(request),
            )
            body = {
                "revoked": bool(found),
                "token_id": token_id_of(token_hash),
                "sessions_ended": ended,
            }
            return (200 if found else 404), body

        return answer_later(request, revoking.addCallbacks(revoked, _store_failure))


class OneToken(Guarded):
    """``DELETE /tokens/<token>``; C{token} is C{None} when the path cannot name one."""

    isLeaf = True

    def __init__(self, auth: AdminAuth, tokens: TokensPage, token: str | None) -> None:
        super().__init__(auth)
        self._tokens = tokens
        self._token = token

    def render_DELETE(self, request: Request) -> bytes | int:
        """Revoke the token; 404 when the store did not know it."""
        if self._token is None:
            return write_json(request, 404, {"error": "no such token"})
        return self._tokens.revoke(request, self._token)


def _no_admin(request: Request) -> bytes:
    return write_json(request, 501, {"error": "this token store cannot issue or revoke tokens"})


def _store_failure(failure: Failure) -> tuple[int, object]:
    if failure.check(Refused):  # from the backend policy: the target is not allowed
        refused: Refused = failure.value  # type: ignore[assignment]
        return 403, {"error": f"{refused.refusal.reason}: {refused.detail}"}
    if failure.check(TokenStoreUnavailable):
        return 503, {"error": f"token store unavailable: {failure.getErrorMessage()}"}
    if failure.check(UnsupportedOperation, ValueError):
        return 400, {"error": failure.getErrorMessage()}
    return failure  # type: ignore[return-value]  # answer_later logs it and answers 500


def admin_resources(
    secret: bytes,
    sessions: ISessionDirectory,
    store: object,
    clock: IReactorTime,
    base_url: str = DEFAULT_BASE_URL,
    *,
    backend_policy: BackendPolicy,
    failures: FailedSecrets | None = None,
) -> dict[bytes, Resource]:
    """
    The admin API's top-level resources by path segment, to put on the HTTP root.
    C{backend_policy} decides which targets ``POST /tokens`` may issue tokens for;
    C{failures} counts wrong secrets (by default L{FAILURE_LIMIT} per L{FAILURE_INTERVAL}
    seconds of C{clock}).
    """
    admin = ITokenAdmin(store, None)
    auth = AdminAuth(secret, failures or FailedSecrets(clock))
    return {
        b"sessions": SessionsPage(auth, sessions),
        b"tokens": TokensPage(auth, admin, sessions, clock, backend_policy, base_url),
    }


__all__ = [
    "FAILURE_INTERVAL",
    "FAILURE_LIMIT",
    "MAX_BODY",
    "AdminAuth",
    "BadRequest",
    "FailedSecrets",
    "LocalSessions",
    "OneSession",
    "OneToken",
    "SessionsPage",
    "TokensPage",
    "admin_resources",
    "read_admin_secret",
    "session_json",
    "token_request",
]
