"""``ssl:`` listeners on real loopback sockets: minimum version, ciphers, and certificates
re-read without dropping a connection."""

from __future__ import annotations

import os
import shutil
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.redis_server import make_tls_files
from tests.support import async_test
from vncmux.service import Listener
from vncmux.tls import TLSFiles, TLSFilesError, endpoint_arguments, load_context, tls_listener


class _Echo(Protocol):
    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class _EchoFactory(Factory):
    protocol = _Echo

    def __init__(self) -> None:
        self.connections: list[_Echo] = []


class _Client(Protocol):
    """Sends what it is told and hands back the next chunk it receives."""

    def __init__(self) -> None:
        self.waiting: Deferred[bytes] | None = None
        self.lost: Deferred[None] = Deferred()
        self.reason: Any = None

    def dataReceived(self, data: bytes) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(data)

    def echo(self, data: bytes) -> Deferred[bytes]:
        self.waiting = Deferred()
        self.transport.write(data)
        return self.waiting

    def connectionLost(self, reason: object = None) -> None:
        self.reason = reason
        self.lost.callback(None)
        if self.waiting is not None:
            self.waiting.errback(ConnectionError("lost"))


def _serial(path: str) -> int:
    with open(path, "rb") as f:
        return Certificate.loadPEM(f.read()).original.get_serial_number()


class ReloadTests(TestCase):
    """New handshakes see the new certificate, open connections go on, a broken one is kept
    out."""

    timeout = 30

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.sets = []
        for name in ("one", "two"):
            os.makedirs(os.path.join(self.directory, name))
            self.sets.append(make_tls_files(os.path.join(self.directory, name)))
        self.cert = os.path.join(self.directory, "cert.pem")
        self.key = os.path.join(self.directory, "key.pem")
        self.install(self.sets[0])
        self.clients: list[_Client] = []
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def install(self, files: dict[str, str]) -> None:
        shutil.copy(files["cert"], self.cert)
        shutil.copy(files["key"], self.key)

    async def listen(self, min_version: str = "1.2") -> Listener:
        self.factory = _EchoFactory()
        description = f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"
        listener = Listener(description, self.factory, reactor, tls_min_version=min_version)
        listener.startService()
        port = await listener.listening()
        self.port = port.getHost().port

        def stop() -> Deferred[Any]:
            lost = [c.lost for c in self.factory.connections]
            for conn in self.factory.connections:
                conn.transport.loseConnection()
            return DeferredList([listener.stopService(), *lost])

        self.addCleanup(stop)
        return listener

    async def connect(self, trusted: int = 0, **extra: Any) -> tuple[_Client, int]:
        """A TLS client trusting the CA of set C{trusted} only (both test CAs have the same
        name); returns it and the server's serial."""
        with open(self.sets[trusted]["ca"], "rb") as f:
            ca = Certificate.loadPEM(f.read())
        options = optionsForClientTLS(
            "localhost", trustRoot=trustRootFromCertificates([ca]), extraCertificateOptions=extra
        )
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        client = await connectProtocol(endpoint, _Client())
        self.clients.append(client)

        def close() -> Deferred[None] | None:
            if client.reason is not None:
                return None
            client.transport.loseConnection()
            return client.lost

        self.addCleanup(close)
        self.assertEqual(await client.echo(b"hello"), b"hello")
        return client, client.transport.getPeerCertificate().get_serial_number()

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.log]

    @async_test
    async def test_reload(self) -> None:
        """After reload() new handshakes get the new certificate while a connection opened
        before keeps relaying; a broken or mismatched certificate is logged and the one in
        use is kept."""
        listener = await self.listen()
        first, serial = await self.connect()
        self.assertEqual(serial, _serial(self.sets[0]["cert"]))

        self.install(self.sets[1])
        listener.reload()
        second, serial = await self.connect(trusted=1)
        self.assertEqual(serial, _serial(self.sets[1]["cert"]))
        self.assertEqual(await first.echo(b"still here"), b"still here")
        self.assertTrue([m for m in self.messages() if "certificate reloaded" in m])

        with open(self.cert, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nhalf a file")
        listener.reload()
        shutil.copy(self.sets[0]["cert"], self.cert)  # with the key of set two: no match
        listener.reload()
        third, serial = await self.connect(trusted=1)
        self.assertEqual(serial, _serial(self.sets[1]["cert"]))
        errors = [m for m in self.messages() if "cannot reload the certificate" in m]
        self.assertEqual(len(errors), 2, errors)
        self.assertIn("holds no PEM certificate", errors[0])
        self.assertIn("does not belong to the certificate", errors[1])
        for client in (first, second, third):
            self.assertEqual(await client.echo(b"ok"), b"ok")

    @async_test
    async def test_minimum_version(self) -> None:
        """With --tls-min-version 1.3 a client that stops at TLS 1.2 cannot connect; by
        default TLS 1.2 is accepted, TLS 1.1 never."""
        await self.listen("1.3")
        with self.assertRaises(ConnectionError):
            await self.connect(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        refused = self.clients[-1]
        self.assertTrue(refused.reason.check(SSL.Error), refused.reason)
        self.assertEqual((await self.connect())[1], _serial(self.sets[0]["cert"]))

    @async_test
    async def test_default_accepts_1_2(self) -> None:
        """The default minimum is TLS 1.2: a 1.2-only client connects."""
        await self.listen()
        _, serial = await self.connect(lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        self.assertEqual(serial, _serial(self.sets[0]["cert"]))


class TLSOptionsTests(SynchronousTestCase):
    """Parsing ssl: descriptions and building contexts, without sockets."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.files = make_tls_files(self.directory)

    def test_endpoint_arguments(self) -> None:
        """Twisted's syntax: positional and named arguments, backslash escapes."""
        self.assertEqual(
            endpoint_arguments(r"ssl:6443:privateKey=C\:\\k.pem:interface=\:\:1"),
            ("ssl", ["6443"], {"privateKey": r"C:\k.pem", "interface": "::1"}),
        )

    def test_not_ssl(self) -> None:
        """Other endpoints are left to Twisted."""
        self.assertIsNone(tls_listener(reactor, "tcp:6080:interface=127.0.0.1"))

    def test_refused_descriptions(self) -> None:
        """Options vncmux replaces, a missing port or unusable files are ValueErrors that
        name the problem."""
        key, cert = self.files["key"], self.files["cert"]
        for description, words in [
            (f"ssl:1:privateKey={key}:sslmethod=TLSv1_METHOD", "sslmethod"),
            (f"ssl:privateKey={key}:certKey={cert}", "port"),
            (f"ssl:1:privateKey={cert}:certKey={cert}", "no unencrypted PEM private key"),
            (f"ssl:1:privateKey={key}:certKey={key}", "no PEM certificate"),
            (f"ssl:1:privateKey={key}:certKey=/nonexistent.pem", "/nonexistent.pem"),
        ]:
            with self.subTest(description=description):
                error = self.assertRaises(ValueError, tls_listener, reactor, description)
                self.assertIn(words, str(error))

    def test_modern_ciphers(self) -> None:
        """Only ECDHE key exchange with AEAD ciphers for TLS 1.2 (and OpenSSL's TLS 1.3
        suites): no RSA key exchange, no CBC, no SHA-1 MACs."""
        context = load_context(TLSFiles(self.files["cert"], self.files["key"])).context
        ciphers = SSL.Connection(context, None).get_cipher_list()
        self.assertTrue(ciphers)
        for cipher in ciphers:
            self.assertTrue(cipher.startswith(("ECDHE-", "TLS_")), cipher)
            self.assertTrue(("GCM" in cipher) or ("CHACHA20" in cipher), cipher)

    def test_mismatched_key(self) -> None:
        """A key of another certificate is refused, naming both files."""
        other = os.path.join(self.directory, "other")
        os.makedirs(other)
        foreign = make_tls_files(other)["key"]
        error = self.assertRaises(
            TLSFilesError, load_context, TLSFiles(self.files["cert"], foreign)
        )
        self.assertIn(foreign, str(error))
