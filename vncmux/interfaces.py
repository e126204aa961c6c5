"""The boundaries between the stages of a console session, as zope interfaces.

Each stage has a real implementation and an in-memory one; tests check both against the same
interface with ``verifyObject``, and mypy (with the zope plugin) checks the signatures of every
class that declares one with ``@implementer``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from zope.interface import Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from vncmux.refusals import Refusal
    from vncmux.relay import Session
    from vncmux.tokens import TokenRecord


class ITokenStore(Interface):
    """Where the proxy learns which console a token opens."""

    def lookup(token: str) -> Deferred[TokenRecord | None]:
        """
        Resolve a raw token.

        @return: a Deferred firing with a L{vncmux.tokens.TokenRecord}, or C{None} when the
            token is unknown (or revoked: the two are not told apart); it fails with
            L{vncmux.tokens.TokenStoreUnavailable} when the store cannot answer.
        """

    def ping() -> Deferred[None]:
        """
        One real round trip to the store, for readiness checks.

        @return: a Deferred firing with C{None}, or failing with TokenStoreUnavailable.
        """


class ITokenAdmin(Interface):
    """Issuing and revoking tokens: what `vncmux token` and the admin API call (reading a
    token back is L{ITokenStore.lookup})."""

    def issue(record: TokenRecord, token: str) -> Deferred[None]:
        """
        Store C{record} (a TokenRecord whose C{token_hash} is the hash of C{token}).

        @return: a Deferred firing with C{None}.
        """

    def revoke(token_hash: str) -> Deferred[bool]:
        """
        Delete the record and tell every proxy instance to close its sessions.

        @return: a Deferred firing with C{True} when a record was deleted.
        """

    def revoke_instance(instance_uuid: str) -> Deferred[int]:
        """
        Revoke every token of one instance.

        @return: a Deferred firing with the number of records deleted.
        """


class IActivitySink(Interface):
    """Where the supervisor writes back when each token was last used (a shared store)."""

    def record_activity(updates: Mapping[str, float]) -> Deferred[None]:
        """
        Write C{last_activity_at} for many tokens in one round trip; a time never moves
        back, and tokens that are gone are not created again.

        @param updates: mapping of token hash to unix seconds.
        @return: a Deferred firing with C{None}.
        """


class ISingleUse(Interface):
    """A store that can use up a single-use token once across every proxy instance."""

    def claim_use(token_hash: str) -> Deferred[bool]:
        """
        Mark a single-use token as used, atomically across every proxy instance.

        @return: a Deferred firing with C{True} for the first claim, C{False} after (and
            for a token that is unknown or revoked).
        """


class IHashLookup(Interface):
    """Reading a record back by its hash: how live sessions, which keep no raw token, are
    checked against the store."""

    def lookup_hash(token_hash: str) -> Deferred[TokenRecord | None]:
        """
        @return: a Deferred firing with the record stored under C{token_hash}, or C{None}
            when it is gone (revoked or expired).
        """


class IRevocationFeed(IHashLookup):
    """
    Revocations announced to every proxy instance, so that they end the live sessions of
    a revoked token. A feed can miss messages, so it also answers L{lookup_hash}: the
    watcher re-checks its sessions after each gap.
    """

    def watch_revocations(
        on_revoke: Callable[[str], object], on_reconnect: Callable[[], object] | None = None
    ) -> Deferred[None]:
        """
        Call C{on_revoke(message)} for each message on the revocation channel (a token hash,
        or C{"instance:<uuid>"}), re-subscribing by itself after a lost connection. Messages
        sent while disconnected are missed, so C{on_reconnect()} is called after every
        re-subscription for the caller to re-check its sessions with L{lookup_hash}.

        @return: a Deferred firing with C{None} once the first subscription is made.
        """


class ISharedLimits(Interface):
    """
    Session limits counted beyond this process: by the parent of the workers (every worker's
    sessions), or by the fleet in Redis (every instance's). The supervisor checks its own
    counters first; a session then takes a place with each shared limit in turn.
    """

    def claim(record: TokenRecord, client_address: str) -> Deferred[Callable[[], None]]:
        """
        Count one more session of C{record}'s token from C{client_address}.

        @return: a Deferred firing with a callable of no arguments that gives the place
            back (called once), or failing with L{vncmux.refusals.Refused} (too many
            sessions). It is never cancelled: an answer that comes too late is given back.
        """


class ISessionDirectory(Interface):
    """
    The live sessions the admin API sees and ends: this process's (L{vncmux.admin.
    LocalSessions}), every worker's, or the whole fleet's. Sessions are JSON-ready dicts
    (L{vncmux.admin.session_json}), never with their token.
    """

    def list_sessions() -> Deferred[list[dict[str, Any]]]:
        """@return: a Deferred firing with every live session, oldest first."""

    def get_session(session_id: str) -> Deferred[dict[str, Any] | None]:
        """@return: a Deferred firing with the session, or C{None} when it is not live."""

    def end_session(session_id: str) -> Deferred[bool]:
        """
        End one session with 4002 "token revoked", wherever it runs.

        @return: a Deferred firing with C{True} when the session was live.
        """

    def revoked(message: str) -> Deferred[int]:
        """
        End the sessions of a revoked token hash (or C{instance:<uuid>}) at once, before the
        store announces the revocation.

        @return: a Deferred firing with the number of sessions ended.
        """


class IPeer(Interface):
    """One side of a relayed session (the browser or the VNC server), as the relay sees it."""

    def pause() -> None:
        """Stop reading from this side."""

    def resume() -> None:
        """Read from this side again."""

    def close(code: int, reason: str) -> None:
        """End this side; C{code} and C{reason} reach a WebSocket client as its close frame."""


class IConsolePeer(IPeer):
    """The VNC server (or serial console) side."""

    def write_sequence(pieces: Sequence[bytes]) -> None:
        """Send the pieces in order, as one write (one send where the socket takes it)."""


class IClientPeer(IPeer):
    """The browser side, which can also be asked whether it is still there."""

    def write(data: bytes) -> None:
        """Send C{data} as one binary frame."""

    def ping() -> None:
        """Send a WebSocket ping; the answer clears the session's C{ping_sent_at}."""

    def drop() -> None:
        """Cut the connection at once (the client stopped answering)."""

    def output_blocked(blocked: bool) -> None:
        """The relay paused (C{True}) or resumed (C{False}) reading the VNC server because
        this side's queue is full, so it bounds what else it queues (pongs)."""


class ISessionObserver(Interface):
    """Told about session events: metrics and logs listen here."""

    def session_rejected(
        session_id: str, client_address: str, refusal: Refusal, detail: str, token_id: str | None
    ) -> None:
        """A connection was refused with C{refusal} (vncmux.refusals); C{detail} is for logs."""

    def session_opened(session: Session) -> None:
        """A session passed its checks and started relaying."""

    def session_closed(session: Session, duration: float) -> None:
        """A relaying session ended; C{session.ending} says why."""

    def stage_timed(stage: str, seconds: float) -> None:
        """How long a connect stage (``token_lookup``, ``backend_connect``) took."""


__all__ = [
    "IActivitySink",
    "IClientPeer",
    "IHashLookup",
    "IPeer",
    "IRevocationFeed",
    "ISessionDirectory",
    "ISessionObserver",
    "ISharedLimits",
    "ISingleUse",
    "ITokenAdmin",
    "ITokenStore",
]
