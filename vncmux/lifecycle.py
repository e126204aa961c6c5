"""The life of one browser connection, written down once.

Every event that can happen to a connection (the upgrade request, the token store's and the
VNC server's answers, the upgrade going out, either side closing, a timer, the supervisor
ending the session) is an input of one state machine, and each transition below lists what
it does. docs/architecture.md has the same table. The bytes themselves do not go through the
machine: once relaying, the frame reader hands them straight to the L{Session}.

Two rules hold in every state: whatever counts against a limit (the pending-connection slot,
the session reservation) is given back on every path out, and every close has a deadline
after which the sides still open are cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from automat import NoTransition, TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from vncmux.admission import Admission
from vncmux.refusals import (
    BAD_REQUEST,
    CLIENT_CLOSED,
    CLIENT_UNRESPONSIVE,
    INTERNAL_ERROR,
    INTERNAL_FAILURE,
    RFB_HANDSHAKE_FAILED,
    Ending,
    Refused,
)
from vncmux.relay import Session
from vncmux.rfbsecurity import BrowserSecurity, RfbClientError

if TYPE_CHECKING:
    from automat._core import Automaton

    from vncmux.consoles import InBandRefusal
    from vncmux.supervisor import PendingSlot
    from vncmux.websocket import ConsoleFactory


class ConnectionInputs(Protocol):
    """What can happen to a browser connection."""

    def refuse(self, refused: Refused) -> None:
        """The upgrade request is refused before any lookup (no token, foreign Origin)."""

    def admit(self, token: str) -> None:
        """The upgrade request carries a token: look it up and dial its console."""

    def admitted(self, admission: Admission) -> None:
        """The token is good and its console answered (a VNC server with its greeting)."""

    def admitted_secured(self, admission: Admission) -> None:
        """The token is good and vncmux has negotiated security with its VNC server."""

    def client_secured(self) -> None:
        """The browser took security type None from the security proxy."""

    def security_failed(self, error: RfbClientError) -> None:
        """The browser's RFB handshake with the security proxy cannot go on."""

    def not_admitted(self, refused: Refused) -> None:
        """The token store or the VNC server said no."""

    def upgraded(self) -> None:
        """The 101 answer went out (autobahn's onOpen)."""

    def upgrade_failed(self, detail: str) -> None:
        """The upgrade was answered with an HTTP error instead (malformed request)."""

    def handed_over(self) -> None:
        """The request is plain HTTP: twisted.web serves the connection from now on."""

    def early_data(self) -> None:
        """The client sent bytes before its upgrade was answered."""

    def refusal_answered(self, answer: bytes) -> None:
        """The refused client sent its RFB version; C{answer} is the RFB failure message (a
        console type without an in-band refusal answers at once, with nothing)."""

    def end(self, ending: Ending) -> None:
        """Something ends the session: supervisor, admin API, drain, the client's close frame."""

    def client_failed(self, ending: Ending) -> None:
        """The client broke the WebSocket protocol: fail the connection (RFC 6455 7.1.7)."""

    def client_lost(self) -> None:
        """The browser's TCP connection is gone."""

    def backend_lost(self, ending: Ending) -> None:
        """The VNC server's TCP connection is gone."""

    def timed_out(self) -> None:
        """The current state's deadline passed (handshake, refusal or close)."""


class ClientSide(Protocol):
    """What the lifecycle asks of the browser connection (the WebSocket protocol)."""

    def write(self, data: bytes) -> None:
        """Send C{data} as one binary frame."""

    def close(self, code: int, reason: str) -> None:
        """Send a close frame (after what is queued), unless one went out already."""

    def answer_upgrade(self) -> None:
        """Send the 101 answer; the protocol reports C{upgraded} or C{upgrade_failed}."""

    def fail_upgrade(self, status: int, reason: str) -> None:
        """Answer the upgrade with an HTTP error and close."""

    def relay_to(self, deliver: Callable[[Sequence[bytes]], None] | None) -> None:
        """Where the payload of the client's binary frames goes from now on (None: nowhere),
        one list of pieces per read."""

    def lose(self) -> None:
        """Close the TCP connection once what is queued has been sent."""

    def abort(self) -> None:
        """Close the TCP connection at once."""

    def transport_for_relay(self) -> object:
        """The transport the relay registers its producer on."""


class Connection:
    """
    The lifecycle's own data: everything one connection holds between events, so that each
    transition can give it back.
    """

    _log = Logger()

    # One per connection, for the whole of it: no per-instance dict.
    __slots__ = (
        "session_id",
        "client",
        "factory",
        "slot",
        "client_address",
        "token_id",
        "admitting",
        "admission",
        "refused",
        "refuser",
        "browser",
        "session",
        "timer",
        "abandoned",
        "machine",
    )

    def __init__(
        self,
        session_id: str,
        client: ClientSide,
        factory: ConsoleFactory,
        slot: PendingSlot,
        client_address: str,
    ) -> None:
        self.session_id = session_id
        self.client = client
        self.factory = factory
        self.slot = slot
        self.client_address = client_address
        self.token_id: str | None = None
        self.admitting: Deferred[Admission] | None = None
        self.admission: Admission | None = None
        self.refused: Refused | None = None
        self.refuser: InBandRefusal | None = None
        self.browser: BrowserSecurity | None = None
        self.session: Session | None = None
        self.timer: IDelayedCall | None = None
        #: Set after a bug: the machine's state can no longer be trusted, later events are
        #: ignored (everything was given back and both sides were cut).
        self.abandoned = False
        self.machine: ConnectionInputs = Lifecycle(self)
        self.start_timer(factory.settings.handshake_timeout)

    def fire(self, event: Callable[[ConnectionInputs], None]) -> None:
        """
        Feed one event to the machine. A bug in a transition is logged with the session id,
        and the connection is cut with everything it holds given back, never left half open.
        """
        if self.abandoned:
            return
        try:
            event(self.machine)
        except Exception:
            self._log.failure("connection {sid}: lifecycle failed", sid=self.session_id)
            self.abandon()

    # -- what transitions do ------------------------------------------------------------------

    def reject(self, refused: Refused) -> None:
        """Tell the observers (log, metrics) why this connection gets no session."""
        self.token_id = refused.token_id or self.token_id
        self.factory.observer.session_rejected(
            self.session_id, self.client_address, refused.refusal, refused.detail, self.token_id
        )

    def start_timer(self, seconds: float) -> None:
        """The deadline of the state being entered (replacing the last one)."""
        self.cancel_timer()
        self.timer = self.factory.clock.callLater(
            seconds, self.fire, lambda machine: machine.timed_out()
        )

    def cancel_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def start_admission(self, token: str) -> None:
        admitting = self.admitting = self.factory.gate.admit(token, self.client_address)
        admitting.addCallbacks(self._admitted, self._not_admitted)

    def _admitted(self, admission: Admission) -> None:
        self.admitting = None
        if admission.backend.security is None:
            self.fire(lambda machine: machine.admitted(admission))
        else:
            self.fire(lambda machine: machine.admitted_secured(admission))

    def _not_admitted(self, failure: Failure) -> None:
        self.admitting = None
        if failure.check(CancelledError):
            return
        refused = failure.value
        if not isinstance(refused, Refused):
            self._log.failure(
                "connection {sid}: admission failed", failure, sid=self.session_id
            )
            refused = Refused(INTERNAL_ERROR, f"internal error: {failure.getErrorMessage()}")
        self.fire(lambda machine: machine.not_admitted(refused))

    def cancel_admission(self) -> None:
        admitting, self.admitting = self.admitting, None
        if admitting is not None:
            admitting.cancel()

    def hold_admission(self, admission: Admission) -> None:
        self.admission = admission
        self.token_id = admission.record.token_id
        admission.backend.on_lost = lambda ending: self.fire(
            lambda machine: machine.backend_lost(ending)
        )

    def drop_admission(self, admission: Admission) -> None:
        """An admission nobody will use: its place and its VNC connection go back."""
        admission.reservation.release()
        admission.backend.on_lost = None
        admission.backend.close()

    def fail_opening(self, detail: str) -> None:
        """The upgrade of an admitted connection failed: everything it holds goes back."""
        self.cancel_timer()
        admission = self.admission
        assert admission is not None
        self.drop_held_admission()
        self.reject(Refused(BAD_REQUEST, detail, admission.record.token_id))
        self.slot.release()

    def drop_held_admission(self) -> None:
        admission, self.admission = self.admission, None
        assert admission is not None
        self.drop_admission(admission)

    def start_browser_security(self) -> None:
        """Play the VNC server's side of the handshake to the browser: security type None."""
        browser = self.browser = BrowserSecurity()
        self.client.write(browser.greeting())
        self.client.relay_to(self._browser_security_data)

    def _browser_security_data(self, pieces: Sequence[bytes]) -> None:
        browser = self.browser
        assert browser is not None
        try:
            answer = browser.receive(b"".join(pieces))
        except RfbClientError as error:
            failed = error
            self.fire(lambda machine: machine.security_failed(failed))
            return
        if answer:
            self.client.write(answer)
        if browser.done:
            self.fire(lambda machine: machine.client_secured())

    def start_relay(self) -> None:
        """
        Register each side as the other's producer, then let bytes flow both ways. After the
        security proxy's handshake the relay is the same: the browser's handshake only goes
        through the activity scanner, and what it sent after it (ClientInit) is relayed.
        """
        admission, self.admission = self.admission, None
        assert admission is not None
        factory = self.factory
        backend = admission.backend
        scanner = factory.kind.activity_scanner(factory.settings.idle_activity)
        session = self.session = Session(
            self.session_id,
            admission.record,
            self.client_address,
            self.client,  # type: ignore[arg-type]
            backend,
            factory.clock.seconds(),
            factory.sessions,
            scanner,
            admission.reservation,
            self,
        )
        if backend.greeting:
            session.from_backend(backend.greeting)
        backend.session = session
        self.client.relay_to(session.from_client)
        session.start(
            self.client.transport_for_relay(),  # type: ignore[arg-type]
            backend.transport,  # type: ignore[arg-type]
            factory.stats,
        )
        browser, self.browser = self.browser, None
        if browser is not None:
            if scanner is not None:
                scanner.feed(browser.handshake)
            if browser.leftover:
                session.from_client((browser.leftover,))

    def end_session(self, session: Session, ending: Ending) -> None:
        """The L{SessionOwner} side: whoever ends the session goes through the machine."""
        self.fire(lambda machine: machine.end(ending))

    def finish_session(self, ending: Ending) -> None:
        """The session's end: producers unregistered, place given back, out of the table."""
        session = self.session
        assert session is not None
        self.client.relay_to(None)
        session.finish(ending)

    def close_backend(self, ending: Ending) -> None:
        assert self.session is not None
        self.session.backend.close(ending.code, ending.reason)

    def abort_backend(self) -> None:
        if self.session is not None:
            self.session.backend.abort()  # type: ignore[attr-defined]

    def close_client(self, ending: Ending) -> None:
        """A close frame with the ending's code, or a cut for a client that stopped answering
        (code 1006 is never sent)."""
        if ending is CLIENT_UNRESPONSIVE:
            self.client.abort()
        else:
            self.client.close(ending.code, ending.reason)

    def start_refusal(self) -> None:
        """
        Tell the refusal inside the console protocol where the console type has a way (noVNC
        shows only an RFB security failure: answer as a VNC server that refuses); else the
        close frame alone carries it, at once.
        """
        assert self.refused is not None
        refuser = self.refuser = self.factory.kind.refusal(self.refused.refusal.reason)
        if refuser is None:
            self.fire(lambda machine: machine.refusal_answered(b""))
            return
        greeting = refuser.greeting()
        if greeting:
            self.client.write(greeting)
        self.client.relay_to(self._refusal_data)

    def _refusal_data(self, pieces: Sequence[bytes]) -> None:
        assert self.refuser is not None
        answer = self.refuser.receive(b"".join(pieces))
        if answer is not None:
            self.fire(lambda machine: machine.refusal_answered(answer))

    def abandon(self) -> None:
        """After a bug: give back everything this connection holds and cut both sides."""
        self.abandoned = True
        self.cancel_timer()
        self.cancel_admission()
        self.slot.release()
        if self.admission is not None:
            self.drop_admission(self.admission)
            self.admission = None
        session = self.session
        if session is not None:
            if session.ending is None:
                self.client.relay_to(None)
                session.finish(INTERNAL_FAILURE)
            else:
                session.let_go()
            session.backend.abort()  # type: ignore[attr-defined]
        self.client.abort()


_builder = TypeMachineBuilder(ConnectionInputs, Connection)
handshaking = _builder.state("handshaking")
admitting = _builder.state("admitting")
opening = _builder.state("opening")
opening_secured = _builder.state("opening_secured")
securing = _builder.state("securing")
opening_refusal = _builder.state("opening_refusal")
refusing = _builder.state("refusing")
relaying = _builder.state("relaying")
closing = _builder.state("closing")
closing_client = _builder.state("closing_client")
closing_backend = _builder.state("closing_backend")
closed = _builder.state("closed")

# -- handshaking: reading the upgrade request (autobahn parses it) ------------------------------


@handshaking.upon(ConnectionInputs.refuse).to(opening_refusal)
def _refuse_request(machine: ConnectionInputs, conn: Connection, refused: Refused) -> None:
    conn.refused = refused
    conn.reject(refused)


@handshaking.upon(ConnectionInputs.admit).to(admitting)
def _admit(machine: ConnectionInputs, conn: Connection, token: str) -> None:
    conn.start_admission(token)


@handshaking.upon(ConnectionInputs.upgrade_failed).to(closed)
def _bad_request(machine: ConnectionInputs, conn: Connection, detail: str) -> None:
    conn.cancel_timer()
    conn.reject(Refused(BAD_REQUEST, detail))
    conn.slot.release()


@handshaking.upon(ConnectionInputs.handed_over).to(closed)
def _handed_over(machine: ConnectionInputs, conn: Connection) -> None:
    conn.cancel_timer()
    conn.slot.release()


@handshaking.upon(ConnectionInputs.client_lost).to(closed)
def _gone_early(machine: ConnectionInputs, conn: Connection) -> None:
    conn.cancel_timer()
    conn.slot.release()


@handshaking.upon(ConnectionInputs.timed_out).to(closed)
def _handshake_too_slow(machine: ConnectionInputs, conn: Connection) -> None:
    conn.timer = None
    conn.client.abort()
    conn.slot.release()


# -- admitting: token lookup and backend dial, the upgrade not answered yet ----------------------


@admitting.upon(ConnectionInputs.admitted).to(opening)
def _admitted(machine: ConnectionInputs, conn: Connection, admission: Admission) -> None:
    conn.hold_admission(admission)
    conn.client.answer_upgrade()


@admitting.upon(ConnectionInputs.admitted_secured).to(opening_secured)
def _admitted_secured(machine: ConnectionInputs, conn: Connection, admission: Admission) -> None:
    conn.hold_admission(admission)
    conn.client.answer_upgrade()


@admitting.upon(ConnectionInputs.not_admitted).to(opening_refusal)
def _not_admitted(machine: ConnectionInputs, conn: Connection, refused: Refused) -> None:
    conn.refused = refused
    conn.reject(refused)
    conn.client.answer_upgrade()


@admitting.upon(ConnectionInputs.early_data).to(closed)
def _early_data(machine: ConnectionInputs, conn: Connection) -> None:
    conn.cancel_timer()
    conn.cancel_admission()
    conn.reject(Refused(BAD_REQUEST, "data before the upgrade was answered"))
    conn.client.fail_upgrade(400, "data before the upgrade was answered")
    conn.slot.release()


@admitting.upon(ConnectionInputs.client_lost).to(closed)
def _gone_while_admitting(machine: ConnectionInputs, conn: Connection) -> None:
    conn.cancel_timer()
    conn.cancel_admission()
    conn.slot.release()


@admitting.upon(ConnectionInputs.timed_out).to(closed)
def _admission_too_slow(machine: ConnectionInputs, conn: Connection) -> None:
    conn.timer = None
    conn.cancel_admission()
    conn.client.abort()
    conn.slot.release()


# -- opening: the 101 is going out ---------------------------------------------------------------


@opening.upon(ConnectionInputs.upgraded).to(relaying)
def _start_relay(machine: ConnectionInputs, conn: Connection) -> None:
    conn.cancel_timer()
    conn.slot.release()
    conn.start_relay()


@opening.upon(ConnectionInputs.upgrade_failed).to(closed)
def _upgrade_failed_after_admission(
    machine: ConnectionInputs, conn: Connection, detail: str
) -> None:
    conn.fail_opening(detail)


@opening_secured.upon(ConnectionInputs.upgraded).to(securing)
def _start_browser_security(machine: ConnectionInputs, conn: Connection) -> None:
    conn.start_timer(conn.factory.settings.refusal_timeout)
    conn.start_browser_security()


@opening_secured.upon(ConnectionInputs.upgrade_failed).to(closed)
def _secured_upgrade_failed(machine: ConnectionInputs, conn: Connection, detail: str) -> None:
    conn.fail_opening(detail)


# -- securing: the security proxy plays the VNC server's handshake to the browser ----------------


@securing.upon(ConnectionInputs.client_secured).to(relaying)
def _secured(machine: ConnectionInputs, conn: Connection) -> None:
    conn.cancel_timer()
    conn.slot.release()
    conn.start_relay()


@securing.upon(ConnectionInputs.security_failed).to(closing_client)
def _security_failed(machine: ConnectionInputs, conn: Connection, error: RfbClientError) -> None:
    conn.client.relay_to(None)
    conn.client.write(error.answer)
    conn.client.close(RFB_HANDSHAKE_FAILED.code, RFB_HANDSHAKE_FAILED.reason)
    conn.reject(Refused(BAD_REQUEST, error.detail, conn.token_id))
    conn.drop_held_admission()
    conn.slot.release()
    conn.start_timer(conn.factory.settings.close_timeout)


@securing.upon(ConnectionInputs.client_failed).to(closing_client)
def _securing_client_failed(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    conn.client.relay_to(None)
    conn.client.close(ending.code, ending.reason)
    conn.client.lose()
    conn.drop_held_admission()
    conn.slot.release()
    conn.start_timer(conn.factory.settings.close_timeout)


@securing.upon(ConnectionInputs.end).to(closing_client)
def _securing_client_closed(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    conn.client.relay_to(None)
    conn.drop_held_admission()
    conn.slot.release()
    conn.start_timer(conn.factory.settings.close_timeout)


@securing.upon(ConnectionInputs.backend_lost).to(closing_client)
def _securing_backend_lost(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    conn.client.relay_to(None)
    conn.drop_held_admission()
    conn.client.close(ending.code, ending.reason)
    conn.slot.release()
    conn.start_timer(conn.factory.settings.close_timeout)


@securing.upon(ConnectionInputs.client_lost).to(closed)
def _securing_client_gone(machine: ConnectionInputs, conn: Connection) -> None:
    conn.cancel_timer()
    conn.drop_held_admission()
    conn.slot.release()


@securing.upon(ConnectionInputs.timed_out).to(closed)
def _securing_too_slow(machine: ConnectionInputs, conn: Connection) -> None:
    conn.timer = None
    conn.client.abort()
    conn.drop_held_admission()
    conn.slot.release()


@opening_refusal.upon(ConnectionInputs.upgraded).to(refusing)
def _start_refusal(machine: ConnectionInputs, conn: Connection) -> None:
    conn.start_timer(conn.factory.settings.refusal_timeout)
    conn.start_refusal()


@opening_refusal.upon(ConnectionInputs.upgrade_failed).to(closed)
def _refusal_upgrade_failed(machine: ConnectionInputs, conn: Connection, detail: str) -> None:
    conn.cancel_timer()
    conn.slot.release()


# -- refusing: answering as a refusing VNC server -----------------------------------------------


@refusing.upon(ConnectionInputs.refusal_answered).to(closing_client)
def _refusal_answered(machine: ConnectionInputs, conn: Connection, answer: bytes) -> None:
    refusal = conn.refused
    assert refusal is not None
    conn.client.relay_to(None)
    if answer:
        conn.client.write(answer)
    conn.client.close(refusal.refusal.code, refusal.refusal.reason)
    conn.slot.release()
    conn.start_timer(conn.factory.settings.close_timeout)


@refusing.upon(ConnectionInputs.client_failed).to(closing_client)
def _refused_client_failed(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    conn.client.relay_to(None)
    conn.client.close(ending.code, ending.reason)
    conn.client.lose()
    conn.slot.release()
    conn.start_timer(conn.factory.settings.close_timeout)


@refusing.upon(ConnectionInputs.end).to(closing_client)
def _refused_client_closed(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    conn.client.relay_to(None)
    conn.slot.release()
    conn.start_timer(conn.factory.settings.close_timeout)


@refusing.upon(ConnectionInputs.timed_out).to(closed)
def _refusal_unanswered(machine: ConnectionInputs, conn: Connection) -> None:
    conn.timer = None
    conn.client.abort()
    conn.slot.release()


@refusing.upon(ConnectionInputs.client_lost).to(closed)
def _refused_client_gone(machine: ConnectionInputs, conn: Connection) -> None:
    conn.cancel_timer()
    conn.slot.release()


# -- relaying ------------------------------------------------------------------------------------


@relaying.upon(ConnectionInputs.end).to(closing)
def _end(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    conn.finish_session(ending)
    conn.close_backend(ending)
    conn.close_client(ending)
    conn.start_timer(conn.factory.settings.close_timeout)


@relaying.upon(ConnectionInputs.client_failed).to(closing)
def _client_failed(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    conn.finish_session(ending)
    conn.close_backend(ending)
    conn.close_client(ending)
    conn.client.lose()
    conn.start_timer(conn.factory.settings.close_timeout)


@relaying.upon(ConnectionInputs.client_lost).to(closing_backend)
def _client_lost(machine: ConnectionInputs, conn: Connection) -> None:
    conn.finish_session(CLIENT_CLOSED)
    conn.close_backend(CLIENT_CLOSED)
    conn.start_timer(conn.factory.settings.close_timeout)


@relaying.upon(ConnectionInputs.backend_lost).to(closing_client)
def _backend_lost(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    conn.finish_session(ending)
    conn.close_client(ending)
    conn.start_timer(conn.factory.settings.close_timeout)


# -- closing: each side flushes and closes, within the close timeout ----------------------------


@closing.upon(ConnectionInputs.client_lost).to(closing_backend)
def _closing_client_gone(machine: ConnectionInputs, conn: Connection) -> None:
    """The backend may still be flushing."""


@closing.upon(ConnectionInputs.backend_lost).to(closing_client)
def _closing_backend_gone(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    """The client may still be flushing or answering the close frame."""


@closing.upon(ConnectionInputs.timed_out).to(closed)
def _close_too_slow(machine: ConnectionInputs, conn: Connection) -> None:
    conn.timer = None
    conn.abort_backend()
    conn.client.abort()


@closing_client.upon(ConnectionInputs.client_lost).to(closed)
def _client_closed_last(machine: ConnectionInputs, conn: Connection) -> None:
    conn.cancel_timer()


@closing_client.upon(ConnectionInputs.timed_out).to(closed)
def _client_close_too_slow(machine: ConnectionInputs, conn: Connection) -> None:
    conn.timer = None
    conn.client.abort()


@closing_backend.upon(ConnectionInputs.backend_lost).to(closed)
def _backend_closed_last(machine: ConnectionInputs, conn: Connection, ending: Ending) -> None:
    conn.cancel_timer()


@closing_backend.upon(ConnectionInputs.timed_out).to(closed)
def _backend_close_too_slow(machine: ConnectionInputs, conn: Connection) -> None:
    conn.timer = None
    conn.abort_backend()


# -- late news: ignored while closing or closed, except what must be given back -----------------

for _state in (closing, closing_client, closing_backend, closed):
    _state.upon(ConnectionInputs.end).loop().returns(None)
    _state.upon(ConnectionInputs.client_failed).loop().returns(None)
for _state in (closing_client, closed):
    _state.upon(ConnectionInputs.backend_lost).loop().returns(None)
for _state in (closing_backend, closed):
    _state.upon(ConnectionInputs.client_lost).loop().returns(None)
closed.upon(ConnectionInputs.not_admitted).loop().returns(None)
closed.upon(ConnectionInputs.upgrade_failed).loop().returns(None)
closed.upon(ConnectionInputs.timed_out).loop().returns(None)


@closed.upon(ConnectionInputs.admitted).loop()
def _admitted_too_late(machine: ConnectionInputs, conn: Connection, admission: Admission) -> None:
    conn.drop_admission(admission)


@closed.upon(ConnectionInputs.admitted_secured).loop()
def _secured_too_late(machine: ConnectionInputs, conn: Connection, admission: Admission) -> None:
    conn.drop_admission(admission)


Lifecycle = _builder.build()


_State = TypeVar("_State")
_Input = TypeVar("_Input")
_Output = TypeVar("_Output")


def _index_transitions(automaton: Automaton[_State, _Input, _Output]) -> None:
    """
    automat finds a transition by scanning every transition of the machine and comparing
    states (frozen dataclasses) one by one: here about a hundred comparisons per event, a
    tenth of a connection's setup cost. Index them once by (state, input) instead; the
    answers are the same (tests/test_lifecycle.py compares them for every state and input).
    """
    table = {
        (state, symbol): (next_state, tuple(outputs))
        for state, symbol, next_state, outputs in automaton.allTransitions()
    }

    def output_for_input(state: _State, symbol: _Input) -> tuple[_State, Sequence[_Output]]:
        try:
            return table[(state, symbol)]
        except KeyError:
            raise NoTransition(state=state, symbol=symbol) from None

    # One instance's method replaced: mypy compares it with the unbound method (self too).
    automaton.outputForInput = output_for_input  # type: ignore[method-assign,assignment]


_index_transitions(Lifecycle.__automat_automaton__)
