"""The refusal and close codes of docs/protocol.md, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a console was refused: the WebSocket close code and the reason the user reads."""

    code: int
    reason: str


BAD_REQUEST = Refusal(4400, "bad request")
INVALID_TOKEN = Refusal(4401, "invalid token")
ORIGIN_NOT_ALLOWED = Refusal(4403, "origin not allowed")
TOKEN_EXPIRED = Refusal(4403, "token expired")
TOKEN_USED = Refusal(4403, "token already used")
TOO_MANY_SESSIONS = Refusal(4429, "too many sessions")
CONSOLE_UNREACHABLE = Refusal(4502, "console unreachable")
#: The VNC server offers none of the security types ``--auth-schemes`` allows (or an RFB
#: version too old for the security proxy).
CONSOLE_SECURITY = Refusal(4502, "console offers no allowed security type")
#: The security proxy's authentication with the VNC server failed (password, TLS).
CONSOLE_AUTH_FAILED = Refusal(4502, "console authentication failed")
#: A token's target resolves outside ``--allowed-backend`` (or to a link-local address).
BACKEND_NOT_ALLOWED = Refusal(4403, "backend not allowed")
#: Too many failed token lookups from this client address (``--max-failed-tokens``).
TOO_MANY_FAILED = Refusal(4429, "too many failed attempts")
STORE_UNAVAILABLE = Refusal(4503, "token store unavailable")
#: A bug in vncmux, never expected in operation.
INTERNAL_ERROR = Refusal(1011, "internal error")

ALL_REFUSALS = (
    BAD_REQUEST,
    INVALID_TOKEN,
    ORIGIN_NOT_ALLOWED,
    TOKEN_EXPIRED,
    TOKEN_USED,
    TOO_MANY_SESSIONS,
    CONSOLE_UNREACHABLE,
    CONSOLE_SECURITY,
    CONSOLE_AUTH_FAILED,
    STORE_UNAVAILABLE,
    BACKEND_NOT_ALLOWED,
    TOO_MANY_FAILED,
)


class Refused(Exception):
    """
    A session cannot start.

    C{detail} is for the operator's log (never contains the token); the user only sees
    C{refusal.reason}. C{token_id} names the token once it was found.
    """

    def __init__(self, refusal: Refusal, detail: str = "", token_id: str | None = None) -> None:
        super().__init__(refusal.reason, detail)
        self.refusal = refusal
        self.detail = detail or refusal.reason
        self.token_id = token_id


@dataclass(frozen=True, slots=True)
class Ending:
    """How a relaying session ended: close code and reason for the client, metric label."""

    code: int
    reason: str
    label: str


CLIENT_CLOSED = Ending(1000, "client closed", "client")
#: Never sent (the client is not listening): the connection is dropped.
CLIENT_UNRESPONSIVE = Ending(1006, "client stopped answering pings", "client")
BACKEND_CLOSED = Ending(1000, "backend closed", "backend")
BACKEND_ERROR = Ending(1011, "backend error", "error")
IDLE_TIMEOUT = Ending(4000, "idle timeout", "idle")
LIFETIME_REACHED = Ending(4001, "session lifetime reached", "lifetime")
TOKEN_EXPIRED_ENDING = Ending(4403, "token expired", "expired")
TOKEN_REVOKED = Ending(4002, "token revoked", "revoked")
SHUTDOWN = Ending(1001, "going away", "shutdown")
TEXT_FRAME = Ending(1003, "binary frames only", "error")
#: The browser's RFB handshake with the security proxy failed (a version or security type
#: it does not offer).
RFB_HANDSHAKE_FAILED = Ending(4400, "RFB handshake failed", "error")
#: vncmux itself failed (logged with a traceback): never expected in operation.
INTERNAL_FAILURE = Ending(1011, "internal error", "error")
