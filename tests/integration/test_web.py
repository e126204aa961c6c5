"""The ``--web`` files on the console port, served by twisted.web over real loopback sockets."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from tests.procfs import resident_kib
from tests.redis_server import make_tls_files
from tests.support import (
    GREETING,
    Response,
    async_test,
    connect_client,
    listen_fake_vnc,
    listen_proxy,
    parse_response,
    raw_request,
)
from vncmux.handshake import parse_networks
from vncmux.tokens import MemoryTokenStore

PAGE = b"<html>noVNC</html>"
SLOW_READERS = 5
BIG_FILE_SIZE = 8 * 1024 * 1024


def _web_root(test: TestCase) -> str:
    root = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, root)
    with open(os.path.join(root, "vnc.html"), "wb") as f:
        f.write(PAGE)
    with open(os.path.join(root, "data.bin"), "wb") as f:
        f.write(bytes(range(256)) * 4)
    os.mkdir(os.path.join(root, "app"))
    with open(os.path.join(root, "app", "ui.js"), "wb") as f:
        f.write(b"export {};\n")
    return root


async def _get(port: int, target: str, *headers: str, method: str = "GET") -> Response:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return parse_response(await raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode()))


class _SlowReader:
    """A client that asks for a file and then reads one byte a second, as an attacker would."""

    def __init__(self, port: int, target: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.sock.setblocking(False)
        self.received = 0
        self.first_byte: Deferred[None] = Deferred()
        self._loop = LoopingCall(self._read_one)
        self._loop.clock = reactor
        self._loop.start(1.0)

    def _read_one(self) -> None:
        try:
            data = self.sock.recv(1)
        except BlockingIOError:
            return
        self.received += len(data)
        if data and not self.first_byte.called:
            self.first_byte.callback(None)

    def was_cut(self) -> bool:
        """Stop reading slowly; whether the server reset the connection (what the kernel
        had buffered for us is read first)."""
        self._loop.stop()
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self.sock.close()


class StaticFileTests(TestCase):
    """twisted.web serves the files: ranges, caching headers, no listings, no escapes."""

    @async_test
    async def test_root_is_vnc_html_with_safety_headers(self) -> None:
        """C{/} is vnc.html, with nosniff and no-cache, and no Server header naming software."""
        proxy = await listen_proxy(self, MemoryTokenStore(), web=_web_root(self))
        answer = await _get(proxy.port, "/")
        self.assertEqual((answer.status, answer.body), (200, PAGE))
        self.assertEqual(answer.headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(answer.headers["x-content-type-options"], "nosniff")
        self.assertEqual(answer.headers["cache-control"], "no-cache")
        self.assertNotIn("server", answer.headers)
        script = await _get(proxy.port, "/app/ui.js")
        self.assertEqual(script.headers["content-type"], "text/javascript; charset=utf-8")

    @async_test
    async def test_errors_carry_the_safety_headers_too(self) -> None:
        """A 404 and a 405 are twisted.web's, with the same headers; HEAD has no body."""
        proxy = await listen_proxy(self, MemoryTokenStore(), web=_web_root(self))
        missing = await _get(proxy.port, "/nothing.js")
        self.assertEqual(missing.status, 404)
        self.assertEqual(missing.headers["x-content-type-options"], "nosniff")
        posted = await _get(proxy.port, "/vnc.html", "Content-Length: 0", method="POST")
        self.assertEqual(posted.status, 405)
        head = await _get(proxy.port, "/vnc.html", method="HEAD")
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(head.headers["content-length"], str(len(PAGE)))

    @async_test
    async def test_range_requests(self) -> None:
        """A Range request gets 206 and exactly the bytes asked for; a bad range 416."""
        proxy = await listen_proxy(self, MemoryTokenStore(), web=_web_root(self))
        part = await _get(proxy.port, "/data.bin", "Range: bytes=10-19")
        self.assertEqual(part.status, 206)
        self.assertEqual(part.body, bytes(range(10, 20)))
        self.assertEqual(part.headers["content-range"], "bytes 10-19/1024")
        beyond = await _get(proxy.port, "/data.bin", "Range: bytes=5000-6000")
        self.assertEqual(beyond.status, 416)

    @async_test
    async def test_conditional_get(self) -> None:
        """ETag and Last-Modified are sent, and a request carrying either gets a 304."""
        proxy = await listen_proxy(self, MemoryTokenStore(), web=_web_root(self))
        first = await _get(proxy.port, "/data.bin")
        self.assertEqual(len(first.body), 1024)
        etag, modified = first.headers["etag"], first.headers["last-modified"]
        by_etag = await _get(proxy.port, "/data.bin", f"If-None-Match: {etag}")
        self.assertEqual((by_etag.status, by_etag.body), (304, b""))
        by_date = await _get(proxy.port, "/data.bin", f"If-Modified-Since: {modified}")
        self.assertEqual((by_date.status, by_date.body), (304, b""))
        other = await _get(proxy.port, "/data.bin", 'If-None-Match: "other"')
        self.assertEqual(other.status, 200)

    @async_test
    async def test_no_listing_no_escape(self) -> None:
        """Directories are not listed; dot segments, encoded or not, and symlinks out of the
        root never reach a file outside it."""
        root = _web_root(self)
        outside = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, outside)
        with open(os.path.join(outside, "secret.txt"), "wb") as f:
            f.write(b"secret")
        os.symlink(os.path.join(outside, "secret.txt"), os.path.join(root, "link.txt"))
        os.symlink(outside, os.path.join(root, "linkdir"))
        proxy = await listen_proxy(self, MemoryTokenStore(), web=root)
        for target in (
            "/app/",
            "/link.txt",
            "/linkdir/secret.txt",
            "/../../etc/passwd",
            "/%2e%2e/%2e%2e/etc/passwd",
            "/app/..%2f..%2fetc%2fpasswd",
            "/app/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        ):
            answer = await _get(proxy.port, target)
            self.assertIn(answer.status, (404, 400), target)
            self.assertNotIn(b"secret", answer.body, target)
            self.assertNotIn(b"root:", answer.body, target)

    @async_test
    async def test_404_without_web(self) -> None:
        """Without --web every plain request is a 404, whatever the path."""
        proxy = await listen_proxy(self, MemoryTokenStore())
        for target in ("/", "/vnc.html", "/status"):
            answer = await _get(proxy.port, target)
            self.assertEqual(answer.status, 404, target)
            self.assertNotIn(b"autobahn", answer.body.lower())

    @async_test
    async def test_keep_alive_then_drain(self) -> None:
        """Two requests share one connection, and stopping the proxy closes the idle
        connection at once (the drain does not wait for its deadline)."""
        proxy = await listen_proxy(self, MemoryTokenStore(), web=_web_root(self))
        client = _KeepAliveClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port)
        await endpoint.connect(Factory.forProtocol(lambda: client))
        client.transport.write(b"GET /vnc.html HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        await client.both_answered
        self.assertEqual(proxy.supervisor.connections.count, 1)
        self.assertEqual(proxy.supervisor.pending.total, 0)
        started = reactor.seconds()
        await proxy.service.stopService()
        everything = await client.closed
        self.assertEqual(everything.count(b"HTTP/1.1 200 OK"), 2)
        self.assertLess(reactor.seconds() - started, 5.0)


class _KeepAliveClient(Protocol):
    """Collects the answers on one connection; tells when two pages came and when it closed."""

    def __init__(self) -> None:
        self.received = b""
        self.both_answered: Deferred[None] = Deferred()
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.count(PAGE) >= 2 and not self.both_answered.called:
            self.both_answered.callback(None)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(self.received)


class SlowReaderTests(TestCase):
    """Issue 9: five clients reading an 8 MB file one byte a second hold little, not long."""

    @async_test
    async def test_slow_readers_are_streamed_and_cut(self) -> None:
        """
        The file is streamed (the process grows by well under the file's size for five
        readers, where reading it whole added 8 MB each), the connections leave the pending
        limits at once but still count as open for the drain, and each is cut at its
        --web-timeout although it keeps reading.
        """
        root = _web_root(self)
        with open(os.path.join(root, "big.bin"), "wb") as f:
            f.write(os.urandom(BIG_FILE_SIZE))
        deadline = 3.0
        proxy = await listen_proxy(self, MemoryTokenStore(), web=root, web_timeout=deadline)
        before = 1024 * resident_kib()
        readers = [_SlowReader(proxy.port, "/big.bin") for _ in range(SLOW_READERS)]
        for reader in readers:
            self.addCleanup(reader.close)
        await DeferredList([reader.first_byte for reader in readers])
        grown = 1024 * resident_kib() - before
        self.assertLess(grown, 4 * 1024 * 1024, f"grew by {grown} bytes")
        self.assertEqual(proxy.supervisor.pending.total, 0)
        self.assertEqual(proxy.supervisor.connections.count, SLOW_READERS)
        started = reactor.seconds()
        await proxy.supervisor.connections.all_closed()
        held = reactor.seconds() - started
        self.assertLess(held, deadline + 2.0)
        self.assertTrue(all(0 < reader.received < 10 for reader in readers))
        self.assertTrue(all(reader.was_cut() for reader in readers))


class TokenCookieTests(TestCase):
    """Issue 10: a page opened with ?token= (nova's classic URL) hands the token to noVNC 1.3's
    WebSocket, which does not carry it, as a short-lived cookie."""

    async def _cookie(self, target: str, *headers: str, **settings: object) -> str | None:
        proxy = await listen_proxy(self, MemoryTokenStore(), web=_web_root(self), **settings)
        answer = await _get(proxy.port, target, *headers)
        self.assertEqual(answer.status, 200, target)
        return answer.headers.get("set-cookie")

    @async_test
    async def test_page_with_token_sets_the_cookie(self) -> None:
        """The cookie is HttpOnly, SameSite=Strict, lives 60 s and is sent only to noVNC's
        WebSocket path (``websockify``, or the page's own ``path``); not Secure on plain
        HTTP."""
        cookie = await self._cookie("/vnc.html?token=abc-123_x")
        self.assertEqual(
            cookie, "token=abc-123_x; Path=/websockify; Max-Age=60; HttpOnly; SameSite=strict"
        )
        cookie = await self._cookie("/vnc.html?token=abc&path=console%2Fws%3Fa%3Db")
        self.assertEqual(
            cookie, "token=abc; Path=/console/ws; Max-Age=60; HttpOnly; SameSite=strict"
        )

    @async_test
    async def test_no_cookie_unless_a_page_with_a_clean_token(self) -> None:
        """No cookie for a file that is no page, for a page without a token, or for a token
        that cannot be a cookie value; a path that could add attributes is not used."""
        self.assertIsNone(await self._cookie("/data.bin?token=abc"))
        self.assertIsNone(await self._cookie("/vnc.html"))
        self.assertIsNone(await self._cookie("/vnc.html?token=a%3Bb"))
        self.assertIsNone(await self._cookie("/vnc.html?token=a%20b"))
        cookie = await self._cookie("/vnc.html?token=abc&path=x%3B%20Domain%3Devil.com")
        self.assertIn("Path=/websockify;", cookie or "")
        self.assertNotIn("evil", cookie or "")

    @async_test
    async def test_secure_behind_a_tls_proxy_only_when_trusted(self) -> None:
        """Behind a trusted TLS-terminating proxy (X-Forwarded-Proto https) the cookie is
        Secure; the same header from an untrusted peer changes nothing."""
        trusted = parse_networks(["127.0.0.1/32"])
        cookie = await self._cookie(
            "/vnc.html?token=abc", "X-Forwarded-Proto: https", trusted_proxies=trusted
        )
        self.assertIn("; Secure", cookie or "")
        cookie = await self._cookie("/vnc.html?token=abc", "X-Forwarded-Proto: https")
        self.assertNotIn("Secure", cookie or "")

    @async_test
    async def test_cookie_opens_the_console(self) -> None:
        """The upgrade that carries only the cookie the page set (no token in its URL) opens
        the token's console."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("classic-token", "127.0.0.1", vnc_port)
        proxy = await listen_proxy(self, store, web=_web_root(self))
        page = await _get(proxy.port, "/vnc_auto.html?token=classic-token")
        self.assertEqual(page.status, 404)  # no such page in this root: no cookie either
        page = await _get(proxy.port, "/vnc.html?token=classic-token")
        cookie = page.headers["set-cookie"].split(";", 1)[0]
        client = await connect_client(
            self, proxy.port, path="/websockify", headers={"Cookie": cookie}
        )
        await client.opened
        self.assertEqual(await client.receive(12), GREETING)
        self.assertEqual(len(vnc.connections), 1)

    @async_test
    async def test_secure_over_tls(self) -> None:
        """On an ssl: listener the page (handed over to twisted.web inside TLS) is served
        and its cookie is Secure."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        files = make_tls_files(directory)
        listen = f"ssl:0:interface=127.0.0.1:privateKey={files['key']}:certKey={files['cert']}"
        proxy = await listen_proxy(self, MemoryTokenStore(), web=_web_root(self), listen=listen)
        with open(files["ca"], "rb") as f:
            ca = Certificate.loadPEM(f.read())
        options = optionsForClientTLS("localhost", trustRoot=trustRootFromCertificates([ca]))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port))
        client = _KeepAliveClient()
        await endpoint.connect(Factory.forProtocol(lambda: client))
        client.transport.write(
            b"GET /vnc.html?token=tls-token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = parse_response(await client.closed)
        self.assertEqual((answer.status, answer.body), (200, PAGE))
        self.assertIn("; Secure", answer.headers["set-cookie"])
