"""What differs between the console types a listener serves, in one object per type.

A listener serves one console type (nova's ``console_type`` of the token: ``novnc`` on the
noVNC listener, ``serial`` on the serial one) and hands every connection the
L{ConsoleKind} of that type. The lifecycle, the dial and the relay ask it the few questions
whose answer depends on the type, and nothing else branches on the type:

- does the backend speak first with an RFB greeting (a VNC server does; a serial port does
  not), so that the dial can tell a console from a wrong port;
- how a refusal reaches the user: noVNC shows only an RFB security failure, so the proxy
  plays a refusing VNC server; a serial client has nothing but the close code and reason;
- what counts as activity for the idle timeout: RFB keyboard, pointer and clipboard
  messages, or, on a serial console, any byte the client types;
- whether the listener serves web pages (``--web``): nova-serialproxy serves none;
- whether one console session is several connections: a SPICE session's channels share its
  token and its place under the limits (L{vncmux.spice.SpiceSessions}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from vncmux.rfb import ClientActivityScanner, RefusingServer
from vncmux.spice import InputsActivity, LinkRefusal, SpiceSessions

if TYPE_CHECKING:
    from vncmux.supervisor import Supervisor

__all__ = [
    "CONSOLE_TYPES",
    "NOVNC",
    "SERIAL",
    "SPICE_HTML5",
    "ActivityScanner",
    "ConsoleKind",
    "InBandRefusal",
]


class ActivityScanner(Protocol):
    """Tells whether a chunk of the client's stream holds user activity."""

    def feed(self, data: bytes) -> bool: ...


class InBandRefusal(Protocol):
    """A refusal told inside the console protocol: a greeting, then an answer to the client."""

    def greeting(self) -> bytes: ...

    def receive(self, data: bytes) -> bytes | None: ...


class ClientBytes:
    """Activity on a serial console: every byte the client sends is a keystroke (or a paste)."""

    __slots__ = ()

    def feed(self, data: bytes) -> bool:
        return bool(data)


@dataclass(frozen=True, slots=True)
class ConsoleKind:
    """The behaviour of one console type (see the module's docstring)."""

    #: nova's ``console_type``: the only records this listener admits.
    console_type: str
    #: The backend sends a 12-byte RFB ProtocolVersion before anything else.
    rfb_greeting: bool
    #: The listener answers plain HTTP requests with the ``--web`` directory.
    serves_web: bool
    #: The scanner of ``--idle-activity input``.
    _input_scanner: Callable[[], ActivityScanner]
    #: Builds the in-band refusal from the user-facing reason; None: close code only.
    _in_band_refusal: Callable[[str], InBandRefusal] | None
    #: Builds the listener's registry of sessions made of several connections; None: one
    #: connection is one session, and the supervisor is the registry.
    _grouped_sessions: Callable[[Supervisor], SpiceSessions] | None = None

    def activity_scanner(self, idle_activity: str) -> ActivityScanner | None:
        """The scanner for a new session; None (``--idle-activity any``): every byte either
        way counts."""
        return self._input_scanner() if idle_activity == "input" else None

    def refusal(self, reason: str) -> InBandRefusal | None:
        """How to tell a refused client C{reason} before the close frame, if at all."""
        return self._in_band_refusal(reason) if self._in_band_refusal is not None else None

    def sessions(self, supervisor: Supervisor) -> Supervisor | SpiceSessions:
        """The listener's places under the limits (the gate's C{take_place}) and the relay's
        registry of sessions."""
        if self._grouped_sessions is None:
            return supervisor
        return self._grouped_sessions(supervisor)


NOVNC = ConsoleKind(
    console_type="novnc",
    rfb_greeting=True,
    serves_web=True,
    _input_scanner=ClientActivityScanner,
    _in_band_refusal=RefusingServer,
)

SERIAL = ConsoleKind(
    console_type="serial",
    rfb_greeting=False,
    serves_web=False,
    _input_scanner=ClientBytes,
    _in_band_refusal=None,
)

SPICE_HTML5 = ConsoleKind(
    console_type="spice-html5",
    rfb_greeting=False,
    serves_web=True,
    _input_scanner=InputsActivity,
    _in_band_refusal=LinkRefusal,
    _grouped_sessions=SpiceSessions,
)

#: The console types vncmux serves, by nova's name.
CONSOLE_TYPES = {kind.console_type: kind for kind in (NOVNC, SERIAL, SPICE_HTML5)}
