"""
The benchmark backend's VeNCrypt mode (``benchmarks/backend.py --vencrypt``) through the real
proxy: vncmux must negotiate TLSNone with it and relay the session over the TLS leg, since
``benchmarks/run.py --backend-arg=--vencrypt`` measures that leg's throughput.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import GREETING, async_test, connect_client, listen_proxy
from vncmux.tokens import MemoryTokenStore

BACKEND = Path(__file__).resolve().parents[2] / "benchmarks" / "backend.py"
OK = b"\x00\x00\x00\x00"


class VencryptBackendTests(TestCase):
    """backend.py --vencrypt --mode echo behind vncmux with --auth-schemes=vencrypt."""

    def start_backend(self, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
        backend = subprocess.Popen(
            [sys.executable, str(BACKEND), "--mode", "echo", "--vencrypt", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: backend.poll() is None and backend.kill())
        assert backend.stdout is not None
        line = backend.stdout.readline().decode()
        if not line.startswith("PORT "):
            backend.wait(5)
            assert backend.stderr is not None
            self.fail(f"backend.py did not start: {backend.stderr.read().decode()}")
        return backend, int(line.split()[1])

    @async_test
    async def test_echo_over_tlsnone(self) -> None:
        """The browser gets None, vncmux negotiates VeNCrypt TLSNone with the backend, bytes
        after the handshake come back unchanged, and the backend saw a TLS 1.2 session with
        anonymous ECDH (the suite TigerVNC picks against vncmux's offer)."""
        await self.echo_through_vncmux("TLSv1.2 AECDH-AES256-SHA")

    @async_test
    async def test_echo_over_tlsnone_with_dh_params(self) -> None:
        """With --vencrypt-dh-params the backend negotiates anonymous DH with AES-GCM."""
        if shutil.which("openssl") is None:
            message = "openssl is not installed (Debian package openssl)"
            if os.environ.get("CI"):
                raise AssertionError(message)
            raise SkipTest(message)
        path = self.mktemp()
        # RFC 7919's ffdhe2048, the command the option's help names (instant: no search)
        subprocess.run(
            ["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt",
             "group:ffdhe2048", "-out", path],
            check=True,
            capture_output=True,
        )  # fmt: skip
        await self.echo_through_vncmux(
            "TLSv1.2 ADH-AES256-GCM-SHA384", "--vencrypt-dh-params", str(path)
        )

    @async_test
    async def test_vnc_server_gone_over_tls(self) -> None:
        """The VNC server dies while the session relays over the TLS leg: the browser gets
        the backend's close code and the session, its place and its sockets are all given
        back (Twisted's TLS transport cannot unregister a producer once it is lost)."""
        backend, backend_port = self.start_backend()
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", backend_port)
        proxy = await listen_proxy(self, store, auth_schemes=("vencrypt",))
        client = await connect_client(self, proxy.port)
        await client.receive(12)
        client.send(GREETING)
        await client.receive(14)
        client.send(b"\x01")
        await client.receive(18)
        self.assertEqual(len(proxy.supervisor.sessions), 1)
        backend.kill()
        backend.wait(5)
        code, _ = await client.closed
        self.assertIn(code, (1000, 1011))
        self.assertEqual(proxy.supervisor.sessions, {})
        self.assertEqual(proxy.supervisor.reserved, 0)

    async def echo_through_vncmux(self, tls: str, *backend_args: str) -> None:
        """One session through vncmux to backend.py --vencrypt, then the backend's TLS."""
        backend, backend_port = self.start_backend(*backend_args)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", backend_port)
        proxy = await listen_proxy(self, store, auth_schemes=("vencrypt",))
        client = await connect_client(self, proxy.port)
        await client.opened
        self.assertEqual(await client.receive(12), GREETING)
        client.send(GREETING)
        self.assertEqual((await client.receive(14))[12:], b"\x01\x01", "the browser gets None")
        client.send(b"\x01")
        self.assertEqual((await client.receive(18))[14:], OK)
        client.send(b"\x01")  # ClientInit
        server_init = (await client.receive(18 + 24 + 12))[18:]
        self.assertTrue(server_init.endswith(b"vncmux-bench"))
        payload = bytes(range(256)) * 64
        client.send(payload)
        echoed = (await client.receive(18 + 36 + len(payload)))[18 + 36 :]
        self.assertEqual(echoed, payload)
        opened = [e for e in events if e.get("vncmux_event") == "session_opened"]
        self.assertEqual(
            [e["security"] for e in opened],
            ["VeNCrypt TLSNone to the VNC server, None to the browser"],
        )
        assert client.client is not None
        client.client.sendClose()
        await client.closed
        backend.terminate()
        _, err = backend.communicate(timeout=5)
        self.assertIn(f"tls={tls!r}", err.decode())
        self.assertIn("protocol_errors=0", err.decode())
