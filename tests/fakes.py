"""In-memory fakes of the relay's collaborators, checked against their interfaces."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from vncmux.interfaces import IClientPeer, IConsolePeer
from vncmux.refusals import Ending
from vncmux.relay import Session


@implementer(IClientPeer, IConsolePeer)
class FakePeer:
    """A relay side on a StringTransport that remembers how it was closed."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.closed: tuple[int, str] | None = None
        self.pings = 0
        self.dropped = False
        self.blocked: list[bool] = []

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def write_sequence(self, pieces: Sequence[bytes]) -> None:
        self.transport.writeSequence(pieces)

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def ping(self) -> None:
        self.pings += 1

    def output_blocked(self, blocked: bool) -> None:
        self.blocked.append(blocked)

    def drop(self) -> None:
        self.dropped = True
        self.transport.loseConnection()

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.transport.loseConnection()


class Registry:
    """Records what the session tells its supervisor."""

    def __init__(self) -> None:
        self.now = 100.0
        self.started: list[Session] = []
        self.ended: list[Session] = []

    def session_started(self, session: Session) -> None:
        self.started.append(session)

    def session_ended(self, session: Session) -> None:
        self.ended.append(session)


class ClosingOwner:
    """Ends sessions as the connection lifecycle does (session first, then both sides),
    for tests of the relay and the supervisor that have no connection."""

    def end_session(self, session: Session, ending: Ending) -> None:
        session.finish(ending)
        session.backend.close(ending.code, ending.reason)
        session.client.close(ending.code, ending.reason)


@implementer(IHostnameResolver)
class FakeNameResolver:
    """Answers host names from a table at once (unknown names: no address)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(
        self, resolutionReceiver: IResolutionReceiver, hostName: str, portNumber: int = 0,
        addressTypes: object = None, transportSemantics: str = "TCP",
    ) -> IResolutionReceiver:  # fmt: skip
        self.asked.append(hostName)
        resolutionReceiver.resolutionBegan(None)
        for address in self.table.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolutionReceiver


class ResolvingClock(Clock):
    """A Clock that is also a reactor with a name resolver (as BackendPolicy.for_reactor
    needs), answering from a table."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        super().__init__()
        self.nameResolver = FakeNameResolver(table)
