"""Helpers for the metrics-port tests: real HTTP parsing on a StringTransport, real sessions
on fake peers, no sockets and no real time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from tests.fakes import ClosingOwner, FakePeer
from tests.support import Response, parse_response
from vncmux.observability import QuietSite
from vncmux.relay import RelayStats, Session
from vncmux.supervisor import Supervisor
from vncmux.tokens import TokenRecord, hash_token


@dataclass
class Exchange:
    """One request on its own connection; L{response} parses what has been written so far."""

    transport: StringTransport
    protocol: Any
    closed: bool = field(default=False)

    def response(self) -> Response:
        """The full response (the server has finished it), and the connection closed."""
        response = parse_response(self.transport.value())
        self.close()
        return response

    def done(self) -> bool:
        """Whether the server finished its answer."""
        return b"\r\n\r\n" in self.transport.value() and self.transport.disconnecting

    def close(self) -> None:
        """Drop the connection (cancels the channel's idle timeout)."""
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


def http_site(root: Resource, clock: IReactorTime) -> QuietSite:
    """The production Site class around C{root}, its timeouts on C{clock}."""
    return QuietSite(root, reactor=clock)


def send(
    site: QuietSite,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    client: str = "10.1.2.3",
) -> Exchange:
    """Send one HTTP/1.0 request through a real HTTPChannel on a StringTransport, from
    C{client}."""
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9108))
    transport = StringTransport(peerAddress=IPv4Address("TCP", client, 40000))
    protocol.makeConnection(transport)
    lines = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1:9108"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    return Exchange(transport, protocol)


def fetch(
    site: QuietSite,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    client: str = "10.1.2.3",
) -> Response:
    """L{send}, for answers that are complete at once."""
    return send(site, method, path, headers, body, client).response()


def open_session(
    supervisor: Supervisor,
    stats: RelayStats,
    token: str = "secret-token-1",
    session_id: str = "s1",
    client_address: str = "192.0.2.7",
    host: str = "10.0.0.5",
    port: int = 5901,
    instance_uuid: str = "inst-1",
    console_type: str = "novnc",
) -> tuple[Session, FakePeer, FakePeer]:
    """A real relaying session on fake peers, started in C{supervisor}'s table."""
    record = TokenRecord(
        hash_token(token), host, port, instance_uuid=instance_uuid, console_type=console_type
    )
    client, backend = FakePeer(), FakePeer()
    reservation = supervisor.reserve(record, client_address)
    session = Session(
        session_id,
        record,
        client_address,
        client,
        backend,
        supervisor.clock.seconds(),
        supervisor,
        None,
        reservation,
        ClosingOwner(),
    )
    session.start(client.transport, backend.transport, stats)
    return session, client, backend
