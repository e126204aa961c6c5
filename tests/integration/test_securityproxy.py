"""
The RFB security proxy against real TigerVNC servers (VncAuth, X509None, TLSNone) and the
CONNECT tunnel against a real tunnel endpoint, on loopback sockets.

The browser side is a raw RFB client over a WebSocket: it must get security type None and
a working session (ServerInit, then a framebuffer update). The Xvnc servers start once for
the module. Without ``Xvnc`` the tests are skipped, except under CI (env ``CI``), where they
fail.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.processes import Xvnc, start_xvnc
from tests.support import ClientState, async_test, connect_client, listen_fake_vnc, listen_proxy
from vncmux.tokens import MemoryTokenStore

V38 = b"RFB 003.008\n"
PASSWORD = "s3cr3t-pw"
OK = b"\x00\x00\x00\x00"


# -- certificates --------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, Any] | None, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, *items: Any) -> str:
    data = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            data += item.public_bytes(serialization.Encoding.PEM)
        else:
            data += item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    path.write_bytes(data)
    return str(path)


def make_pki(directory: Path, name: str) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(f"{name} CA", ca_key, None, True)
    files = {"ca": _write_pem(directory / f"{name}-ca.pem", ca)}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"{name} {role}", key, (ca.subject, ca_key), False)
        files[f"{role}_cert"] = _write_pem(directory / f"{name}-{role}-cert.pem", cert)
        files[f"{role}_key"] = _write_pem(directory / f"{name}-{role}-key.pem", key)
    return files


# -- the VNC servers, once per module ------------------------------------------------------------


@pytest.fixture(scope="class")
def vnc_servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Xvnc with VncAuth, X509None, TLSNone and X509Vnc, and the PKI of the X509 ones."""
    if shutil.which("Xvnc") is None:
        if os.environ.get("CI"):
            pytest.fail("Xvnc (tigervnc-standalone-server) is required under CI")
        pytest.skip("Xvnc not installed")
    workdir = tmp_path_factory.mktemp("xvnc")
    pki = make_pki(workdir, "vnc")
    started: list[Xvnc] = []
    try:
        vnc_auth = start_xvnc(workdir, password=PASSWORD)
        started.append(vnc_auth)
        x509_none = start_xvnc(
            workdir,
            security_types="X509None",
            extra_args=["-X509Cert", pki["server_cert"], "-X509Key", pki["server_key"]],
        )
        started.append(x509_none)
        tls_none = start_xvnc(workdir, security_types="TLSNone")
        started.append(tls_none)
        x509_vnc = start_xvnc(
            workdir,
            password=PASSWORD,
            security_types="X509Vnc",
            extra_args=["-X509Cert", pki["server_cert"], "-X509Key", pki["server_key"]],
        )
        started.append(x509_vnc)
        request.cls.x509_vnc = x509_vnc
        request.cls.vnc_auth = vnc_auth
        request.cls.x509_none = x509_none
        request.cls.tls_none = tls_none
        request.cls.pki = pki
        request.cls.workdir = workdir
        yield
    finally:
        for server in started:
            server.stop()


async def open_console(test: TestCase, port: int) -> tuple[ClientState, bytes]:
    """Through the proxy as a raw RFB client: security None, ClientInit, ServerInit, then a
    framebuffer update for a full-screen request. Returns the client and its ServerInit."""
    client = await connect_client(test, port)
    await client.opened
    test.assertEqual(await client.receive(12), V38)
    client.send(V38)
    test.assertEqual((await client.receive(14))[12:], b"\x01\x01", "only None is offered")
    client.send(b"\x01")
    test.assertEqual((await client.receive(18))[14:], OK)
    client.send(b"\x01")  # ClientInit: shared
    head = (await client.receive(18 + 24))[18:]
    name_length = struct.unpack(">I", head[20:24])[0]
    server_init = (await client.receive(18 + 24 + name_length))[18:]
    seen = len(client.received)
    client.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 640, 400))  # FramebufferUpdateRequest
    update = (await client.receive(seen + 4))[seen:]
    test.assertEqual(update[:1], b"\x00", "a FramebufferUpdate comes back")
    return client, server_init


@pytest.mark.usefixtures("vnc_servers")
class SecurityProxyTests(TestCase):
    """Real Xvnc servers that want authentication; the browser is offered None only."""

    vnc_auth: Xvnc
    x509_none: Xvnc
    tls_none: Xvnc
    x509_vnc: Xvnc
    pki: dict[str, str]
    workdir: Path

    async def proxy_for(self, server: Xvnc, **settings: object) -> tuple[int, MemoryTokenStore]:
        store = MemoryTokenStore()
        proxy = await listen_proxy(self, store, **settings)
        return proxy.port, store

    @async_test
    async def test_vnc_auth(self) -> None:
        """VncAuth with the record's password: the console opens without a password prompt,
        and the password never reaches the browser."""
        port, store = await self.proxy_for(self.vnc_auth)
        store.add("good", "127.0.0.1", self.vnc_auth.port, password=PASSWORD)
        client, server_init = await open_console(self, port)
        self.assertEqual(struct.unpack(">HH", server_init[:4]), (640, 400))
        self.assertTrue(server_init.endswith(b"vncmux"))
        self.assertNotIn(PASSWORD.encode(), client.received)

    @async_test
    async def test_vnc_auth_wrong_password(self) -> None:
        """Xvnc refuses the password: the browser reads 'console authentication failed'
        and the close code is 4502."""
        port, store = await self.proxy_for(self.vnc_auth)
        store.add("good", "127.0.0.1", self.vnc_auth.port, password="not-it")
        client = await connect_client(self, port)
        await client.opened
        await client.receive(12)
        client.send(V38)
        code, reason = await client.closed
        self.assertEqual((code, reason), (4502, "console authentication failed"))
        self.assertIn(b"console authentication failed", client.received)

    @async_test
    async def test_x509none(self) -> None:
        """VeNCrypt X509None: TLS to Xvnc, its certificate checked against the CA bundle,
        the client certificate shown."""
        port, store = await self.proxy_for(
            self.x509_none,
            auth_schemes=("vencrypt",),
            vencrypt_ca_certs=self.pki["ca"],
            vencrypt_client_cert=self.pki["client_cert"],
            vencrypt_client_key=self.pki["client_key"],
        )
        store.add("good", "127.0.0.1", self.x509_none.port)
        _, server_init = await open_console(self, port)
        self.assertTrue(server_init.endswith(b"vncmux"))

    @async_test
    async def test_x509vnc(self) -> None:
        """VeNCrypt X509Vnc: verified TLS, then VncAuth with the record's password inside."""
        port, store = await self.proxy_for(
            self.x509_vnc, auth_schemes=("vencrypt",), vencrypt_ca_certs=self.pki["ca"]
        )
        store.add("good", "127.0.0.1", self.x509_vnc.port, password=PASSWORD)
        client, server_init = await open_console(self, port)
        self.assertTrue(server_init.endswith(b"vncmux"))
        self.assertNotIn(PASSWORD.encode(), client.received)

    @async_test
    async def test_x509none_untrusted_certificate(self) -> None:
        """A server certificate from another CA: the TLS handshake fails, 4502."""
        other = make_pki(self.workdir, "other")
        port, store = await self.proxy_for(
            self.x509_none, auth_schemes=("vencrypt",), vencrypt_ca_certs=other["ca"]
        )
        store.add("good", "127.0.0.1", self.x509_none.port)
        client = await connect_client(self, port)
        await client.opened
        await client.receive(12)
        client.send(V38)
        code, reason = await client.closed
        self.assertEqual((code, reason), (4502, "console authentication failed"))

    @async_test
    async def test_tlsnone(self) -> None:
        """VeNCrypt TLSNone (anonymous TLS), with no CA bundle configured."""
        port, store = await self.proxy_for(self.tls_none, auth_schemes=("vencrypt",))
        store.add("good", "127.0.0.1", self.tls_none.port)
        _, server_init = await open_console(self, port)
        self.assertTrue(server_init.endswith(b"vncmux"))

    @async_test
    async def test_no_allowed_scheme(self) -> None:
        """A server that offers only X509None to a proxy allowing none (a password given):
        4502 'console offers no allowed security type'."""
        port, store = await self.proxy_for(self.x509_none)
        store.add("good", "127.0.0.1", self.x509_none.port, password=PASSWORD)
        client = await connect_client(self, port)
        await client.opened
        await client.receive(12)
        client.send(V38)
        code, reason = await client.closed
        self.assertEqual((code, reason), (4502, "console offers no allowed security type"))

    @async_test
    async def test_tunnel_then_vnc_auth(self) -> None:
        """internal_access_path and a password together: CONNECT through the tunnel
        endpoint, then VncAuth with Xvnc behind it."""
        tunnel = await listen_tunnel(self, "/console?ref=vm1", self.vnc_auth.port)
        port, store = await self.proxy_for(self.vnc_auth)
        store.add(
            "good",
            "127.0.0.1",
            tunnel.port,
            password=PASSWORD,
            internal_access_path="/console?ref=vm1",
        )
        await open_console(self, port)
        self.assertEqual(tunnel.requests, [b"CONNECT /console?ref=vm1 HTTP/1.1"])
        self.assertEqual(tunnel.hosts, [f"127.0.0.1:{tunnel.port}".encode()])


# -- a tunnel endpoint, as a compute host's ------------------------------------------------------


class _Relay(Protocol):
    """One side of the tunnel's relay to the console."""

    def __init__(self, peer: Protocol) -> None:
        self.peer = peer
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.peer.connected_to(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        self.peer.transport.loseConnection()  # type: ignore[union-attr]
        self.lost.callback(None)


class TunnelEndpoint(Protocol):
    """Answers ``CONNECT <path>`` with 200 and relays to the console, anything else 403."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.head = b""
        self.relay: _Relay | None = None
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.transport.write(data)  # type: ignore[union-attr]
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        head, _, rest = self.head.partition(b"\r\n\r\n")
        request_line, *headers = head.split(b"\r\n")
        self.factory.requests.append(request_line)
        self.factory.hosts += [h[5:].strip() for h in headers if h.lower().startswith(b"host:")]
        if request_line != b"CONNECT " + self.factory.path + b" HTTP/1.1":
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            self.transport.loseConnection()
            return
        self.pending = rest
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.factory.console_port)
        endpoint.connect(Factory.forProtocol(lambda: _Relay(self)))

    def connected_to(self, relay: _Relay) -> None:
        self.relay = relay
        self.factory.relays.append(relay)
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.pending:
            relay.transport.write(self.pending)
        self.transport.resumeProducing()

    def connectionLost(self, reason: object = None) -> None:
        if self.relay is not None:
            self.relay.transport.loseConnection()
        self.lost.callback(None)


class TunnelFactory(Factory):
    protocol = TunnelEndpoint

    def __init__(self, path: str, console_port: int) -> None:
        self.path = path.encode()
        self.console_port = console_port
        self.connections: list[TunnelEndpoint] = []
        self.relays: list[_Relay] = []
        self.requests: list[bytes] = []
        self.hosts: list[bytes] = []
        self.port = 0


async def listen_tunnel(test: TestCase, path: str, console_port: int) -> TunnelFactory:
    """A tunnel endpoint on a free loopback port, stopped with its connections on cleanup."""
    factory = TunnelFactory(path, console_port)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    factory.port = port.getHost().port

    def stop() -> Deferred[object]:
        for conn in factory.connections:
            conn.transport.loseConnection()  # type: ignore[union-attr]
        lost = [c.lost for c in factory.connections] + [r.lost for r in factory.relays]
        return DeferredList([port.stopListening(), *lost])

    test.addCleanup(stop)
    return factory


class TunnelTests(TestCase):
    """internal_access_path through a real tunnel endpoint to a fake VNC server."""

    async def through_tunnel(self, served_path: str):  # type: ignore[no-untyped-def]
        """A fake VNC server behind a tunnel endpoint that opens C{served_path}, and a client
        of a proxy whose token names the path /vnc/instance-1 through that endpoint."""
        vnc, vnc_port = await listen_fake_vnc(self)
        tunnel = await listen_tunnel(self, served_path, vnc_port)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", tunnel.port, internal_access_path="/vnc/instance-1")
        proxy = await listen_proxy(self, store)
        client = await connect_client(self, proxy.port)
        await client.opened
        return vnc, tunnel, client

    @async_test
    async def test_tunnel(self) -> None:
        """The greeting comes through the tunnel and bytes are relayed both ways."""
        vnc, tunnel, client = await self.through_tunnel("/vnc/instance-1")
        self.assertEqual(await client.receive(12), V38)
        client.send(b"hello")
        self.assertEqual(await client.receive(17), V38 + b"hello")
        self.assertEqual(tunnel.requests, [b"CONNECT /vnc/instance-1 HTTP/1.1"])

    @async_test
    async def test_tunnel_refuses(self) -> None:
        """A 403 from the tunnel endpoint: the browser reads 'console unreachable' (4502)."""
        vnc, tunnel, client = await self.through_tunnel("/vnc/other")
        await client.receive(12)
        client.send(V38)
        self.assertEqual(await client.closed, (4502, "console unreachable"))
        self.assertEqual(vnc.connections, [])
