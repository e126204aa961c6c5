"""The console listener on real loopback sockets: relay, refusals, static files."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support import (
    GREETING,
    async_test,
    connect_client,
    listen_fake_vnc,
    listen_proxy,
    raw_request,
)
from vncmux.tokens import MemoryTokenStore


def rfb_failure(reason: bytes) -> bytes:
    """What a refusing RFB 3.8 server sends after the client's version."""
    return b"\x00" + struct.pack("!I", len(reason)) + reason


class RelayTests(TestCase):
    """A good token relays bytes both ways between a WebSocket client and a VNC server."""

    async def _setup(self, **settings: object):  # type: ignore[no-untyped-def]
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        proxy = await listen_proxy(self, store, **settings)
        return vnc, proxy, store

    @async_test
    async def test_round_trip(self) -> None:
        """The VNC greeting reaches the client first; client bytes are echoed back; both
        sockets send small packets at once (no Nagle delay) and use TCP keepalive."""
        vnc, proxy, _ = await self._setup()
        client = await connect_client(self, proxy.port)
        await client.opened
        self.assertEqual(await client.receive(12), GREETING)
        client.send(b"RFB 003.008\n")
        client.send(b"\x01" * 5000)
        await client.receive(12 + 12 + 5000)
        self.assertEqual(client.received, GREETING + b"RFB 003.008\n" + b"\x01" * 5000)
        self.assertEqual(len(proxy.supervisor.sessions), 1)
        session = next(iter(proxy.supervisor.sessions.values()))
        self.assertEqual(session.bytes_to_backend, 5012)
        self.assertEqual(session.bytes_to_client, 5024)
        for side in (session.client, session.backend):
            sock = side.transport.getHandle()
            self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), side)
            self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), side)

    @async_test
    async def test_session_log_is_quiet(self) -> None:
        """A session's own log lines are the proxy's: no "Starting factory" and "Stopping
        factory" pair from Twisted for every VNC connection."""
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        vnc, proxy, _ = await self._setup()
        client = await connect_client(self, proxy.port)
        await client.receive(12)
        client.client.sendClose()  # type: ignore[union-attr]
        await client.closed
        await proxy.supervisor.connections.all_closed()
        session_lines = [event.get("vncmux_event") for event in events]
        self.assertIn("session_closed", session_lines)
        proxy_side = [
            type(event["factory"]).__qualname__
            for event in events
            if "factory" in event and not type(event["factory"]).__module__.startswith("tests")
            and "WebSocketClientFactory" not in type(event["factory"]).__qualname__
        ]
        self.assertEqual(proxy_side, [])

    @async_test
    async def test_frames_mixed_with_control_frames(self) -> None:
        """Data frames, pings and a fragmented message interleaved: every byte reaches the VNC
        server in order and each ping is answered (autobahn handles the control frames, the
        fast path the data)."""
        vnc, proxy, _ = await self._setup()
        client = await connect_client(self, proxy.port)
        opened = await client.opened
        await client.receive(12)
        pongs: list[bytes] = []
        ponged: Deferred[None] = Deferred()

        def on_pong(payload: bytes) -> None:
            pongs.append(payload)
            if len(pongs) == 2:
                ponged.callback(None)

        opened.onPong = on_pong  # type: ignore[method-assign]
        client.send(b"one")
        opened.sendPing(b"p1")
        client.send(b"two" * 30000)
        opened.beginMessage(isBinary=True)
        opened.sendMessageFrame(b"frag-a")
        opened.sendPing(b"p2")
        opened.sendMessageFrame(b"frag-b")
        opened.endMessage()
        client.send(b"three")
        expected = b"one" + b"two" * 30000 + b"frag-a" + b"frag-b" + b"three"
        await client.receive(12 + len(expected))
        self.assertEqual(vnc.connections[0].received, expected)
        await ponged
        self.assertEqual(pongs, [b"p1", b"p2"])

    @async_test
    async def test_binary_subprotocol(self) -> None:
        """A client offering 'binary' gets it; one offering nothing gets no subprotocol."""
        _, proxy, _ = await self._setup()
        client = await connect_client(self, proxy.port, protocols=["binary"])
        opened = await client.opened
        self.assertEqual(opened.websocket_protocol_in_use, "binary")

    @async_test
    async def test_backend_close_closes_client(self) -> None:
        """When the VNC server hangs up, the client gets 1000 'backend closed' and the
        session leaves the table."""
        vnc, proxy, _ = await self._setup()
        client = await connect_client(self, proxy.port)
        await client.receive(12)
        vnc.connections[0].transport.loseConnection()
        code, reason = await client.closed
        self.assertEqual((code, reason), (1000, "backend closed"))
        self.assertEqual(proxy.supervisor.sessions, {})

    @async_test
    async def test_client_close_closes_backend(self) -> None:
        """When the browser leaves, the backend connection is closed too."""
        vnc, proxy, _ = await self._setup()
        client = await connect_client(self, proxy.port)
        await client.receive(12)
        assert client.client is not None
        client.client.sendClose(1000)
        await vnc.connections[0].lost
        await client.closed
        self.assertEqual(proxy.supervisor.sessions, {})


class Rejections:
    """Records what observers hear about refused connections."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str | None]] = []

    def session_rejected(self, session_id, client_address, refusal, detail, token_id):  # type: ignore[no-untyped-def]
        self.seen.append((refusal.code, token_id))

    def session_opened(self, session: object) -> None:
        """Not a refusal."""

    def session_closed(self, session: object, duration: float) -> None:
        """Not a refusal."""

    def stage_timed(self, stage: str, seconds: float) -> None:
        """Not a refusal."""


class RefusalTests(TestCase):
    """Refused consoles answer as a refusing VNC server, then close with their code
    (docs/protocol.md)."""

    async def _refused(
        self,
        path: str,
        store: MemoryTokenStore | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[bytes, tuple]:
        proxy = await listen_proxy(self, store or MemoryTokenStore())
        client = await connect_client(self, proxy.port, path=path, headers=headers)
        await client.opened
        self.assertEqual(await client.receive(12), GREETING)
        client.send(b"RFB 003.008\n")
        closed = await client.closed
        self.assertEqual(proxy.supervisor.sessions, {})
        return client.received[12:], closed

    @async_test
    async def test_unknown_token(self) -> None:
        """An unknown token gets 'invalid token' as RFB failure and close code 4401, and no
        VNC server is contacted."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        answer, closed = await self._refused("/websockify?token=nope", store)
        self.assertEqual(answer, rfb_failure(b"invalid token"))
        self.assertEqual(closed, (4401, "invalid token"))
        self.assertEqual(vnc.connections, [])

    @async_test
    async def test_silent_client_dropped(self) -> None:
        """A refused client that never answers the RFB greeting is dropped after the
        refusal timeout, leaving no connection and no timer behind."""
        proxy = await listen_proxy(self, MemoryTokenStore(), refusal_timeout=0.2)
        client = await connect_client(self, proxy.port, path="/?token=nope")
        self.assertEqual(await client.receive(12), GREETING)
        code, _ = await client.closed
        self.assertEqual(code, 1006)
        await proxy.supervisor.connections.all_closed()

    @async_test
    async def test_no_token(self) -> None:
        """No token at all is a bad request (4400)."""
        answer, closed = await self._refused("/websockify")
        self.assertEqual(closed, (4400, "bad request"))

    @async_test
    async def test_token_from_cookie(self) -> None:
        """The token cookie is used when the query has none."""
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("cookie-token", "127.0.0.1", vnc_port)
        proxy = await listen_proxy(self, store)
        client = await connect_client(
            self, proxy.port, path="/websockify", headers={"Cookie": "a=b; token=cookie-token"}
        )
        self.assertEqual(await client.receive(12), GREETING)

    @async_test
    async def test_expired_token(self) -> None:
        """A token past its expires_at is refused with 4403 'token expired'."""
        store = MemoryTokenStore()
        store.add("old", "127.0.0.1", 1, expires_at=1.0)
        answer, closed = await self._refused("/?token=old", store)
        self.assertEqual(closed, (4403, "token expired"))

    @async_test
    async def test_unreachable_backend(self) -> None:
        """A backend that refuses the connection gives 4502 'console unreachable'."""
        listener = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        dead_port = listener.getHost().port
        await listener.stopListening()
        store = MemoryTokenStore()
        store.add("dead", "127.0.0.1", dead_port)
        answer, closed = await self._refused("/?token=dead", store)
        self.assertEqual(answer, rfb_failure(b"console unreachable"))
        self.assertEqual(closed, (4502, "console unreachable"))

    @async_test
    async def test_not_a_vnc_server(self) -> None:
        """A backend that does not greet with RFB is unreachable as a console."""
        vnc, vnc_port = await listen_fake_vnc(self, greeting=b"SSH-2.0-OpenSSH_9.2\r\n")
        store = MemoryTokenStore()
        store.add("ssh", "127.0.0.1", vnc_port)
        answer, closed = await self._refused("/?token=ssh", store)
        self.assertEqual(closed, (4502, "console unreachable"))
        await vnc.connections[0].lost

    @async_test
    async def test_store_unavailable(self) -> None:
        """A token store that cannot answer gives 4503."""
        store = MemoryTokenStore()
        store.available = False
        answer, closed = await self._refused("/?token=x", store)
        self.assertEqual(closed, (4503, "token store unavailable"))

    @async_test
    async def test_foreign_origin(self) -> None:
        """A browser page from another origin is refused with 4403."""
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", 1)
        answer, closed = await self._refused(
            "/?token=good", store, headers={"Origin": "http://evil.example"}
        )
        self.assertEqual(closed, (4403, "origin not allowed"))

    @async_test
    async def test_refusals_name_the_token(self) -> None:
        """Refusals after the token was found (expired, unreachable) are reported with its
        token_id; an unknown token has none to report."""
        store = MemoryTokenStore()
        old = store.add("old", "127.0.0.1", 1, expires_at=1.0)
        dead = store.add("dead", "127.0.0.1", 1)
        proxy = await listen_proxy(self, store)
        rejections = Rejections()
        proxy.observers.add(rejections)
        for path in ("/?token=old", "/?token=dead", "/?token=nope"):
            client = await connect_client(self, proxy.port, path=path)
            await client.receive(12)
            client.send(GREETING)
            await client.closed
        self.assertEqual(
            rejections.seen, [(4403, old.token_id), (4502, dead.token_id), (4401, None)]
        )

    @async_test
    async def test_malformed_upgrade_counted(self) -> None:
        """An upgrade autobahn itself refuses (no Sec-WebSocket-Key) gets HTTP 400 and is
        reported once as a bad request."""
        proxy = await listen_proxy(self, MemoryTokenStore())
        rejections = Rejections()
        proxy.observers.add(rejections)
        answer = await raw_request(
            proxy.port,
            b"GET /?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:80])
        self.assertEqual(rejections.seen, [(4400, None)])

    @async_test
    async def test_unsupported_subprotocol(self) -> None:
        """A client that offers only other subprotocols gets HTTP 400 before the upgrade,
        reported once as a bad request."""
        proxy = await listen_proxy(self, MemoryTokenStore())
        rejections = Rejections()
        proxy.observers.add(rejections)
        answer = await raw_request(
            proxy.port,
            b"GET /?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: base64\r\n\r\n",
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:80])
        self.assertEqual(rejections.seen, [(4400, None)])


class PlainHttpTests(TestCase):
    """Plain GETs on the console port: files from --web, else 404."""

    @async_test
    async def test_404_without_web(self) -> None:
        """Without --web every plain GET is a 404, not autobahn's status page."""
        proxy = await listen_proxy(self, MemoryTokenStore())
        answer = await raw_request(
            proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 404"), answer[:80])
        self.assertNotIn(b"autobahn", answer.lower())

    @async_test
    async def test_serves_web_dir(self) -> None:
        """With --web a file below the directory is served with its content type."""
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        with open(os.path.join(root, "vnc.html"), "wb") as f:
            f.write(b"<html>noVNC</html>")
        proxy = await listen_proxy(self, MemoryTokenStore(), web=root)
        answer = await raw_request(
            proxy.port, b"GET /vnc.html?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:80])
        self.assertIn(b"Content-Type: text/html", answer)
        self.assertTrue(answer.endswith(b"<html>noVNC</html>"))
        escape = await raw_request(
            proxy.port, b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(escape.startswith(b"HTTP/1.1 404"))
