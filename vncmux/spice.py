"""SPICE HTML5 consoles: one SPICE session is several WebSockets, one per channel.

The spice-html5 client opens its main channel first, then (after the server's channel list)
one WebSocket per display, inputs, cursor... channel, all with the same token; each is
relayed to its own TCP connection to the SPICE server, as nova-spicehtml5proxy does. Every
channel starts with the client's link message (spice-protocol ``SpiceLinkHeader``: "REDQ",
major, minor, size; then ``SpiceLinkMess``: connection_id, channel_type, channel_id, caps).

- L{SpiceSessions}: the first connection of a token takes the reservation (it counts against
  the limits) and is the SPICE session in the supervisor's table; later connections of the
  same token, while it lives, join it without a reservation and end when it ends. A joined
  connection whose link message opens a main channel (another browser tab) is a second SPICE
  session, with a reservation of its own (or 4429).
- L{InputsActivity}: idle time comes from the inputs channel's keyboard and mouse messages,
  stamped on the SPICE session; the other channels are not parsed past their link message.
- L{LinkRefusal}: a refused client is answered as a SPICE server refusing the link
  (``SpiceLinkReply`` with ``SPICE_LINK_ERR_PERMISSION_DENIED``), which spice-html5 shows
  as "Error: reply link error 7" in its message area; the close frame carries the reason.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed

from vncmux.refusals import Ending, Refused
from vncmux.supervisor import Reservation, Supervisor

if TYPE_CHECKING:
    from vncmux.consoles import ActivityScanner
    from vncmux.relay import Session
    from vncmux.tokens import TokenRecord

__all__ = ["InputsActivity", "LinkRefusal", "SpiceSessions"]

MAGIC = b"REDQ"
VERSION_MAJOR = 2
VERSION_MINOR = 2
#: SpiceLinkHeader: magic, major_version, minor_version, size (little endian).
LINK_HEADER = struct.Struct("<4sIII")
#: A link message is a few dozen bytes (its capability words); a bigger size is not buffered
#: (the server refuses it anyway), so a client cannot make the scanner hold its stream.
MAX_LINK_SIZE = 4096
#: The start of SpiceLinkMess: connection_id, channel_type, channel_id, num_common_caps.
LINK_MESS = struct.Struct("<IBBI")
CHANNEL_MAIN = 1
CHANNEL_INPUTS = 3
COMMON_CAP_AUTH_SELECTION = 1
COMMON_CAP_MINI_HEADER = 3
#: The RSA-encrypted password; after AUTH_SELECTION it is preceded by the mechanism (u32).
TICKET_SIZE = 128
#: SpiceMiniDataHeader: type (u16), size (u32); the full SpiceDataHeader adds a serial
#: (u64) before and a sub-list offset (u32) after.
MINI_HEADER = struct.Struct("<HI")
FULL_HEADER = struct.Struct("<QHII")
#: SPICE_MSGC_INPUTS_KEY_DOWN .. SPICE_MSGC_INPUTS_MOUSE_RELEASE (101-104, 111-114); the
#: common messages below 100 (ACK, PONG, ...) are no input.
INPUT_MESSAGES = frozenset((101, 102, 103, 104, 111, 112, 113, 114))
LINK_ERR_PERMISSION_DENIED = 7
#: SpiceLinkReply: error (u32), pub_key (SPICE_TICKET_PUBKEY_BYTES), num_common_caps,
#: num_channel_caps, caps_offset (u32 each).
PUBKEY_SIZE = 162
LINK_REPLY = struct.Struct(f"<I{PUBKEY_SIZE}sIII")


class InputsActivity:
    """
    Finds keyboard and mouse messages in one channel's client stream. The link message says
    which channel it is; on any channel but inputs, nothing more is looked at. On the inputs
    channel the ticket is skipped and the messages (mini headers when the client offers
    them: every spice-server since 0.12 accepts them) are counted by type.
    """

    __slots__ = ("_buffer", "_need", "_state", "_header", "_skip", "channel_type")

    def __init__(self) -> None:
        #: The SPICE channel type of the link message, once it has been read.
        self.channel_type: int | None = None
        self._buffer = b""
        self._state = "header"
        self._need = LINK_HEADER.size
        self._header = MINI_HEADER
        self._skip = 0

    def feed(self, data: bytes) -> bool:
        state = self._state
        if state == "other":
            return False
        if state == "messages" and not self._buffer and self._skip >= len(data):
            self._skip -= len(data)
            return False
        buffer = self._buffer + data
        self._buffer = b""
        found = False
        offset = 0
        while True:
            if self._skip:
                taken = min(self._skip, len(buffer) - offset)
                self._skip -= taken
                offset += taken
                if self._skip:
                    return found
            if len(buffer) - offset < self._need:
                self._buffer = buffer[offset:]
                return found
            chunk = buffer[offset : offset + self._need]
            offset += self._need
            if self._state == "header":
                magic, _, _, size = LINK_HEADER.unpack(chunk)
                if magic != MAGIC or size > MAX_LINK_SIZE:
                    self._state = "other"
                    return found
                self._state, self._need = "link", size
            elif self._state == "link":
                if not self._link(chunk):
                    self._state = "other"
                    return found
            else:
                if self._header is MINI_HEADER:
                    message_type, size = MINI_HEADER.unpack(chunk)
                else:
                    _, message_type, size, _ = FULL_HEADER.unpack(chunk)
                found = found or message_type in INPUT_MESSAGES
                self._skip = size

    def _link(self, mess: bytes) -> bool:
        """Read SpiceLinkMess; True on the inputs channel (its messages are looked at)."""
        if len(mess) < LINK_MESS.size + 8:
            return False
        _, channel_type, _, num_common = LINK_MESS.unpack_from(mess)
        self.channel_type = channel_type
        if channel_type != CHANNEL_INPUTS:
            return False
        (caps_offset,) = struct.unpack_from("<I", mess, LINK_MESS.size + 4)
        common = struct.unpack_from("<I", mess, caps_offset)[0] if num_common else 0
        if not common & (1 << COMMON_CAP_MINI_HEADER):
            self._header = FULL_HEADER
        auth_selection = bool(common & (1 << COMMON_CAP_AUTH_SELECTION))
        self._state = "messages"
        self._skip = TICKET_SIZE + (4 if auth_selection else 0)
        self._need = self._header.size
        return True


class LinkRefusal:
    """A refusing SPICE server: once the client's link header is in, a link reply with
    PERMISSION_DENIED (spice-html5 shows its error code; the close frame has the reason)."""

    __slots__ = ("_received",)

    def __init__(self, reason: str) -> None:
        self._received = 0

    def greeting(self) -> bytes:
        """A SPICE server does not speak first."""
        return b""

    def receive(self, data: bytes) -> bytes | None:
        self._received += len(data)
        if self._received < LINK_HEADER.size:
            return None
        reply = LINK_REPLY.pack(
            LINK_ERR_PERMISSION_DENIED, bytes(PUBKEY_SIZE), 0, 0, LINK_REPLY.size
        )
        return LINK_HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, len(reply)) + reply


class ChannelReservation(Reservation):
    """The place of a channel that joins a live SPICE session: it counts against no limit
    (its session's reservation does); L{SpiceSessions} attaches it to C{session}."""

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self._supervisor = None
        self.session = session


class JoinedChannel:
    """
    The activity scanner of a connection that joined a live SPICE session: input found on
    it is its session's. Its link message says which channel it is; a main channel is a new
    SPICE session on the same token (another browser tab), which L{SpiceSessions} handles.
    """

    __slots__ = ("_scanner", "_link", "_channel", "_session", "_sessions", "_linked")

    def __init__(
        self, scanner: ActivityScanner | None, channel: Session, sessions: SpiceSessions
    ) -> None:
        self._scanner = scanner
        #: Reads the link message; with C{--idle-activity any} (no scanner) a parser of its
        #: own, and every client byte counts.
        self._link = scanner if isinstance(scanner, InputsActivity) else InputsActivity()
        self._channel = channel
        reservation = channel.reservation
        assert isinstance(reservation, ChannelReservation)
        self._session = reservation.session
        self._sessions = sessions
        self._linked = False

    def feed(self, data: bytes) -> bool:
        link = self._link
        found = link.feed(data)
        if self._scanner is None:
            found = bool(data)
        if not self._linked and link.channel_type is not None:
            self._linked = True
            if link.channel_type == CHANNEL_MAIN:
                self._sessions.new_session(self._channel, self._scanner)
                return found
        if found:
            self._session.last_activity_at = self._sessions.now
        return found


class SpiceSessions:
    """
    The SPICE listener's sessions: takes the reservation of a token's first connection and
    lets later connections of that token join its session (the gate's C{take_place}), and is
    the relay's registry, forwarding SPICE sessions to the supervisor and keeping the
    joined channels, which end with their session.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        #: The live SPICE session of each token hash.
        self._by_token: dict[str, Session] = {}
        #: The joined channels of each SPICE session, by the session's id.
        self._channels: dict[str, list[Session]] = {}

    @property
    def now(self) -> float:
        return self._supervisor.now

    def take_place(self, record: TokenRecord, client_address: str) -> Deferred[Reservation]:
        """Join the token's live SPICE session, or take a place under the limits."""
        session = self._by_token.get(record.token_hash)
        if session is not None and session.ending is None:
            return succeed(ChannelReservation(session))
        return self._supervisor.take_place(record, client_address)

    def session_started(self, channel: Session) -> None:
        reservation = channel.reservation
        if not isinstance(reservation, ChannelReservation):
            self._by_token[channel.record.token_hash] = channel
            self._channels[channel.id] = []
            self._supervisor.session_started(channel)
            return
        session = reservation.session
        if session.ending is not None:
            channel.end(session.ending)
            return
        self._channels[session.id].append(channel)
        channel.scanner = JoinedChannel(channel.scanner, channel, self)

    def new_session(self, channel: Session, scanner: ActivityScanner | None) -> None:
        """
        A main channel joined a live session of its token: it is a new SPICE session (the
        SPICE server drops the older client for it), counted against the limits on its own.
        Over a limit, it ends with 4429, its SPICE connection cut at once.
        """
        reservation = channel.reservation
        assert isinstance(reservation, ChannelReservation)
        self._leave(reservation.session, channel)
        try:
            channel.reservation = self._supervisor.reserve(channel.record, channel.client_address)
        except Refused as refused:
            self._supervisor.observer.session_rejected(
                channel.id,
                channel.client_address,
                refused.refusal,
                f"second SPICE session on the token: {refused.detail}",
                channel.record.token_id,
            )
            channel.end(Ending(refused.refusal.code, refused.refusal.reason, "error"))
            # Aborted, not only closed: the link message being relayed is dropped, so nothing
            # of a refused session reaches the server.
            channel.backend.abort()  # type: ignore[attr-defined]
            return
        channel.scanner = scanner
        self._by_token[channel.record.token_hash] = channel
        self._channels[channel.id] = []
        self._supervisor.session_started(channel)

    def session_ended(self, channel: Session) -> None:
        reservation = channel.reservation
        if isinstance(reservation, ChannelReservation):
            self._leave(reservation.session, channel)
            return
        if self._by_token.get(channel.record.token_hash) is channel:
            del self._by_token[channel.record.token_hash]
        self._supervisor.session_ended(channel)
        ending = channel.ending
        assert ending is not None
        for joined_channel in self._channels.pop(channel.id, []):
            joined_channel.end(ending)

    def _leave(self, session: Session, channel: Session) -> None:
        """C{channel} no longer ends with C{session} (which may have ended already)."""
        joined = self._channels.get(session.id, [])
        if channel in joined:
            joined.remove(channel)
