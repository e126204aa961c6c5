"""The boundaries between the stages of a console session, as zope interfaces.

Each stage has a real implementation and an in-memory one; tests check both against the same
interface with ``verifyObject``.
"""

from __future__ import annotations

from zope.interface import Interface


class ITokenStore(Interface):
    """Where the proxy learns which console a token opens."""

    def lookup(token: str):  # type: ignore[no-untyped-def]
        """
        Resolve a raw token.

        @return: a Deferred firing with a L{vncmux.tokens.TokenRecord}, or C{None} when the
            token is unknown (or revoked: the two are not told apart); it fails with
            L{vncmux.tokens.TokenStoreUnavailable} when the store cannot answer.
        """

    def ping():  # type: ignore[no-untyped-def]
        """
        One real round trip to the store, for readiness checks.

        @return: a Deferred firing with C{None}, or failing with TokenStoreUnavailable.
        """


class ITokenAdmin(Interface):
    """Issuing and revoking tokens: what `vncmux token` and the admin API call."""

    def issue(record, token: str):  # type: ignore[no-untyped-def]
        """
        Store C{record} (a TokenRecord whose C{token_hash} is the hash of C{token}).

        @return: a Deferred firing with C{None}.
        """

    def show(token: str):  # type: ignore[no-untyped-def]
        """@return: a Deferred firing with the TokenRecord or C{None}."""

    def revoke(token_hash: str):  # type: ignore[no-untyped-def]
        """
        Delete the record and tell every proxy instance to close its sessions.

        @return: a Deferred firing with C{True} when a record was deleted.
        """

    def revoke_instance(instance_uuid: str):  # type: ignore[no-untyped-def]
        """
        Revoke every token of one instance.

        @return: a Deferred firing with the number of records deleted.
        """


class ISessionBackchannel(Interface):
    """What live sessions write back to and hear from a shared store (Redis)."""

    def record_activity(updates):  # type: ignore[no-untyped-def]
        """
        Write C{last_activity_at} for many tokens in one round trip.

        @param updates: mapping of token hash to unix seconds.
        @return: a Deferred firing with C{None}.
        """

    def claim_use(token_hash: str):  # type: ignore[no-untyped-def]
        """
        Mark a single-use token as used, atomically across every proxy instance.

        @return: a Deferred firing with C{True} for the first claim, C{False} after.
        """

    def watch_revocations(on_revoke, on_reconnect=None):  # type: ignore[no-untyped-def]
        """
        Call C{on_revoke(message)} for each message on the revocation channel (a token hash,
        or C{"instance:<uuid>"}), re-subscribing by itself after a lost connection. Messages
        sent while disconnected are missed, so C{on_reconnect()} is called after every
        re-subscription for the caller to re-check its sessions with L{lookup_hash}.
        """

    def lookup_hash(token_hash: str):  # type: ignore[no-untyped-def]
        """
        @return: a Deferred firing with the record stored under C{token_hash}, or C{None}
            when it is gone (revoked or expired).
        """


class ISharedLimits(Interface):
    """
    Session limits counted beyond this process: by the parent of the workers (every worker's
    sessions), or by the fleet in Redis (every instance's). The supervisor checks its own
    counters first; a session then takes a place with each shared limit in turn.
    """

    def claim(record, client_address: str):  # type: ignore[no-untyped-def]
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

    def list_sessions():  # type: ignore[no-untyped-def]
        """@return: a Deferred firing with every live session, oldest first."""

    def get_session(session_id: str):  # type: ignore[no-untyped-def]
        """@return: a Deferred firing with the session, or C{None} when it is not live."""

    def end_session(session_id: str):  # type: ignore[no-untyped-def]
        """
        End one session with 4002 "token revoked", wherever it runs.

        @return: a Deferred firing with C{True} when the session was live.
        """

    def revoked(message: str):  # type: ignore[no-untyped-def]
        """
        End the sessions of a revoked token hash (or C{instance:<uuid>}) at once, before the
        store announces the revocation.

        @return: a Deferred firing with the number of sessions ended.
        """


class IPeer(Interface):
    """One side of a relayed session (the browser or the VNC server), as the relay sees it."""

    def write(data: bytes) -> None:
        """Send bytes to this side."""

    def pause() -> None:
        """Stop reading from this side."""

    def resume() -> None:
        """Read from this side again."""

    def close(code: int, reason: str) -> None:
        """End this side; C{code} and C{reason} reach a WebSocket client as its close frame."""


class IClientPeer(IPeer):
    """The browser side, which can also be asked whether it is still there."""

    def ping() -> None:
        """Send a WebSocket ping; the answer clears the session's C{ping_sent_at}."""

    def drop() -> None:
        """Cut the connection at once (the client stopped answering)."""


class ISessionObserver(Interface):
    """Told about session events: metrics and logs listen here."""

    def session_rejected(
        session_id: str,
        client_address: str,
        refusal,
        detail: str,  # type: ignore[no-untyped-def]
        token_id: str | None,
    ) -> None:
        """A connection was refused with C{refusal} (vncmux.refusals); C{detail} is for logs."""

    def session_opened(session) -> None:  # type: ignore[no-untyped-def]
        """A session passed its checks and started relaying."""

    def session_closed(session, duration: float) -> None:  # type: ignore[no-untyped-def]
        """A relaying session ended; C{session.ending} says why."""

    def stage_timed(stage: str, seconds: float) -> None:
        """How long a connect stage (``token_lookup``, ``backend_connect``) took."""


__all__ = [
    "ISessionBackchannel",
    "ISessionDirectory",
    "ISessionObserver",
    "IClientPeer",
    "IPeer",
    "ISharedLimits",
    "ITokenAdmin",
    "ITokenStore",
]
