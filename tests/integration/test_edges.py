"""The edges of the upgrade on real sockets: trusted proxies, what the logs keep, headers."""

from __future__ import annotations

import os

from twisted.logger import ILogObserver, LogEvent, formatEventAsClassicLogText, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.support import (
    GREETING,
    async_test,
    connect_client,
    listen_proxy,
    proxy_to_fake_vnc,
    raw_request,
)
from vncmux.handshake import parse_networks
from vncmux.logformat import JsonLineObserver
from vncmux.tokens import MemoryTokenStore

CANARY = "canary-" + os.urandom(8).hex()

#: Upgrade requests autobahn or vncmux refuse, each carrying the canary token somewhere.
MALFORMED = [
    f"GET /websockify?token={CANARY} HTTP/1.1 extra\r\nUpgrade: websocket\r\n\r\n",
    f"GET /websockify?token={CANARY} HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    f"POST /websockify?token={CANARY} HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
    f"GET /websockify?token={CANARY} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    f"GET /websockify?token={CANARY} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    f"Sec-WebSocket-Version: 99\r\nCookie: token={CANARY}\r\n\r\n",
    f"GET /websockify HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    f"Sec-WebSocket-Protocol: {CANARY}\r\nCookie: token={CANARY}\r\n\r\n",
    f"GET /websockify?token={CANARY} HTTP/1.1\r\nUpgrade: websocket\r\n"
    f"X-Junk: {'x' * 20000}\r\n\r\n",
    f"GET /websockify?token={CANARY} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\nearly bytes",
]


@implementer(ILogObserver)
class Lines:
    """Every log event, rendered as twistd's text log and vncmux's JSON log write it."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._json = JsonLineObserver(self)  # type: ignore[arg-type]

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        """The JSON observer flushes its file."""

    def __call__(self, event: LogEvent) -> None:
        self.lines.append(formatEventAsClassicLogText(event) or "")
        self._json(event)


class LogsTests(TestCase):
    """No handshake failure logs the request line, path, query or cookies."""

    @async_test
    async def test_canary_token_never_logged(self) -> None:
        """A corpus of malformed upgrades, each carrying a canary token: the token appears
        in no text or JSON log line, while every refusal was logged."""
        proxy = await listen_proxy(self, MemoryTokenStore())
        lines = Lines()
        globalLogPublisher.addObserver(lines)
        self.addCleanup(globalLogPublisher.removeObserver, lines)
        for request in MALFORMED:
            answer = await raw_request(proxy.port, request.encode())
            self.assertRegex(answer[:12], rb"^HTTP/1.1 [45]\d\d", request[:40])
        self.assertEqual([line for line in lines.lines if CANARY in line], [])
        refused = [line for line in lines.lines if "refused" in line and "4400" in line]
        self.assertGreaterEqual(len(refused), len(MALFORMED))


class TrustedProxyTests(TestCase):
    """Behind a trusted reverse proxy the client is the one X-Forwarded-For names."""

    @async_test
    async def test_forwarded_for(self) -> None:
        """An upgrade from a trusted peer with X-Forwarded-For (with a port) relays, and the
        session is counted under the forwarded address."""
        trusted = parse_networks(["127.0.0.0/8"])
        vnc, proxy = await proxy_to_fake_vnc(self, trusted_proxies=trusted)
        client = await connect_client(
            self, proxy.port, headers={"X-Forwarded-For": "198.51.100.4, 203.0.113.9:5123"}
        )
        self.assertEqual(await client.receive(len(GREETING)), GREETING)
        session = next(iter(proxy.supervisor.sessions.values()))
        self.assertEqual(session.client_address, "203.0.113.9")


class HeaderTests(TestCase):
    """The 101 answer does not advertise the server software."""

    @async_test
    async def test_no_server_header(self) -> None:
        """No Server header on the upgrade answer."""
        vnc, proxy = await proxy_to_fake_vnc(self)
        request = (
            "GET /websockify?token=good HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        from tests.integration.test_attacks import raw_client

        client = await raw_client(self, proxy.port)
        client.transport.write(request.encode())  # type: ignore[union-attr]
        await client.seen(GREETING)
        head = client.data.partition(b"\r\n\r\n")[0].lower()
        self.assertTrue(head.startswith(b"http/1.1 101"))
        self.assertNotIn(b"server:", head)
        self.assertNotIn(b"autobahn", head)
