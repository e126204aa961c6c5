"""
vncmux behind a real HAProxy (Debian's ``haproxy``) on loopback: in HTTP mode with
X-Forwarded-For / X-Forwarded-Proto and ``--trusted-proxy``, and in TCP mode with the PROXY
protocol (v1 and v2) on a ``haproxy:tcp:`` listener.

The browser connects from 127.0.0.2, HAProxy to vncmux from 127.0.0.1: a session whose
client address is 127.0.0.2 got it through the proxy's headers or PROXY line, not from its
TCP peer. HAProxy gets its listening sockets made before it starts (``bind fd@N``), so no
port is guessed and nothing waits for it to be ready.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import SkipTest, TestCase

from tests.processes import loopback_listener, port_of, spawn, stop_process
from tests.support import (
    GREETING,
    ClientState,
    ConsoleClient,
    Proxy,
    async_test,
    listen_fake_vnc,
    listen_proxy,
)
from vncmux.handshake import parse_networks
from vncmux.tokens import MemoryTokenStore

BROWSER_ADDRESS = "127.0.0.2"
SPOOFED = "203.0.113.9"

_CONFIG = """\
global
    maxconn 100
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 30s
frontend http_in
    mode http
    bind fd@{http_fd}
    option forwardfor
    # as a TLS-terminating proxy in front of vncmux would say
    http-request set-header X-Forwarded-Proto https
    default_backend vncmux_http
backend vncmux_http
    mode http
    server vncmux 127.0.0.1:{http_port}
frontend proxy_v1
    mode tcp
    bind fd@{v1_fd}
    default_backend vncmux_v1
backend vncmux_v1
    mode tcp
    server vncmux 127.0.0.1:{proxy_port} send-proxy
frontend proxy_v2
    mode tcp
    bind fd@{v2_fd}
    default_backend vncmux_v2
backend vncmux_v2
    mode tcp
    server vncmux 127.0.0.1:{proxy_port} send-proxy-v2
"""


def _haproxy() -> str:
    """The haproxy binary; a test run under CI fails without it instead of skipping."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None:
        message = "haproxy is not installed (Debian package haproxy; scripts/install-system-deps)"
        if os.environ.get("CI"):
            raise AssertionError(message)
        raise SkipTest(message)
    return found


class HAProxyFrontends:
    """One HAProxy with three frontends: HTTP, TCP with PROXY v1, TCP with PROXY v2."""

    def __init__(self, test: TestCase, http_port: int, proxy_port: int) -> None:
        binary = _haproxy()
        sockets = {name: loopback_listener() for name in ("http", "v1", "v2")}
        self.ports = {name: port_of(sock) for name, sock in sockets.items()}
        directory = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, directory)
        config = Path(directory, "haproxy.cfg")
        config.write_text(
            _CONFIG.format(
                http_fd=sockets["http"].fileno(),
                v1_fd=sockets["v1"].fileno(),
                v2_fd=sockets["v2"].fileno(),
                http_port=http_port,
                proxy_port=proxy_port,
            )
        )
        self.process = spawn(
            [binary, "-db", "-f", str(config)],
            pass_fds=[sock.fileno() for sock in sockets.values()],
        )
        for sock in sockets.values():
            sock.close()
        test.addCleanup(stop_process, self.process)


async def _connect(
    test: TestCase, port: int, origin: str | None = None, path: str = "/websockify?token=good"
) -> ClientState:
    """A WebSocket client from 127.0.0.2 through the frontend on C{port}."""
    state = ClientState()
    # A browser (or an attacker) may send its own X-Forwarded-For: it must not count.
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}{path}", origin=origin, headers={"X-Forwarded-For": SPOOFED}
    )
    factory.protocol = ConsoleClient
    factory.state = state
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(BROWSER_ADDRESS, 0))
    proto = await endpoint.connect(factory)

    def cleanup() -> object:
        proto.transport.loseConnection()
        return state.closed

    test.addCleanup(cleanup)
    return state


class ReverseProxyTests(TestCase):
    """The client address and the scheme come through a real reverse proxy."""

    async def _setup(self) -> tuple[Proxy, Proxy, HAProxyFrontends]:
        _haproxy()
        vnc, vnc_port = await listen_fake_vnc(self)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", vnc_port)
        behind_http = await listen_proxy(
            self, store, trusted_proxies=parse_networks(["127.0.0.1/32"])
        )
        behind_tcp = await listen_proxy(self, store, listen="haproxy:tcp:0:interface=127.0.0.1")
        return behind_http, behind_tcp, HAProxyFrontends(self, behind_http.port, behind_tcp.port)

    async def _session_address(self, proxy: Proxy, state: ClientState) -> str:
        await state.opened
        self.assertEqual(await state.receive(12), GREETING)
        (session,) = proxy.supervisor.sessions.values()
        return str(session.client_address)

    @async_test
    async def test_http_mode_forwarded_headers(self) -> None:
        """
        Through HAProxy in HTTP mode the session's client address is the one HAProxy
        forwarded (X-Forwarded-For from the trusted 127.0.0.1; the client's own
        X-Forwarded-For entry is not taken), and a page origin
        https://… is the request's own origin through X-Forwarded-Proto.
        """
        behind_http, _, haproxy = await self._setup()
        port = haproxy.ports["http"]
        state = await _connect(self, port, origin=f"https://127.0.0.1:{port}")
        self.assertEqual(await self._session_address(behind_http, state), BROWSER_ADDRESS)

    @async_test
    async def test_http_mode_scheme_is_the_forwarded_one(self) -> None:
        """The same page served over plain http does not match: the scheme vncmux compares
        is HAProxy's X-Forwarded-Proto (https), not the plain TCP it sees."""
        behind_http, _, haproxy = await self._setup()
        port = haproxy.ports["http"]
        state = await _connect(self, port, origin=f"http://127.0.0.1:{port}")
        await state.opened
        self.assertEqual(await state.receive(12), GREETING)
        state.send(b"RFB 003.008\n")
        self.assertEqual(await state.closed, (4403, "origin not allowed"))
        self.assertEqual(behind_http.supervisor.sessions, {})

    @async_test
    async def test_proxy_protocol_v1_and_v2(self) -> None:
        """Through HAProxy in TCP mode with send-proxy and send-proxy-v2, the session's
        client address is the one HAProxy saw, on vncmux's haproxy:tcp: listener (the
        client's own X-Forwarded-For is ignored: its peer is no trusted proxy)."""
        _, behind_tcp, haproxy = await self._setup()
        for frontend in ("v1", "v2"):
            state = await _connect(self, haproxy.ports[frontend])
            address = await self._session_address(behind_tcp, state)
            self.assertEqual(address, BROWSER_ADDRESS, frontend)
            state.client.sendClose()  # type: ignore[union-attr]
            await state.closed
            await behind_tcp.supervisor.connections.all_closed()


def test_loopback_alias_reachable() -> None:
    """The tests above connect from 127.0.0.2: Linux routes all of 127.0.0.0/8 to lo."""
    with socket.socket() as sock:
        sock.bind((BROWSER_ADDRESS, 0))
