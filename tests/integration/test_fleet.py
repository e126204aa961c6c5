"""Two proxy processes sharing one real Redis: revocation reaches every instance."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.processes import loopback_listener, port_of, spawn_vncmux, stop_process
from tests.redis_server import start_redis
from tests.support import GREETING, ClientState, connect_client, listen_fake_vnc
from vncmux.tokens import hash_token

VNCMUX_CLI = str(Path(sys.executable).parent / "vncmux")


class FleetRevocationTests(TestCase):
    """`vncmux token revoke` closes the token's sessions on every proxy within a second."""

    timeout = 60

    async def cli(self, *args: str) -> str:
        """Run the `vncmux` console script without blocking the reactor."""
        out, err, code = await getProcessOutputAndValue(
            VNCMUX_CLI, [*args, "--tokens", self.redis.url()], env=dict(os.environ)
        )
        self.assertEqual(code, 0, err.decode())
        return out.decode()

    async def add_token(self, port: int, instance: str) -> str:
        out = await self.cli(
            "token",
            "add",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ttl",
            "600",
            "--instance",
            instance,
        )
        return out.split("token: ", 1)[1].split()[0]

    def start_proxy(self, *args: str) -> int:
        """A `twistd -n vncmux` process on its own listener, stopped on cleanup."""
        listener = loopback_listener()
        self.proc = spawn_vncmux(
            ["--tokens", self.redis.url(), "--metrics", "none", "--idle-timeout", "0", *args],
            listener,
        )
        self.addCleanup(stop_process, self.proc)
        port = port_of(listener)
        listener.close()
        return port

    async def relaying(self, port: int, token: str) -> ClientState:
        """A session that really relays (the fake VNC server echoes)."""
        client = await connect_client(self, port, path=f"/websockify?token={token}")
        self.assertEqual(await client.receive(12), GREETING)
        client.send(b"ping")
        await client.receive(16)
        return client

    def test_revocation_reaches_every_proxy(self) -> None:
        """Revoking a token or an instance closes matching sessions on both proxies with
        4002; after a Redis restart the proxies re-subscribe by themselves and end the
        sessions whose records were lost with it."""
        return ensureDeferred(self._revocation())

    async def _revocation(self) -> None:
        self.redis = start_redis(self)
        vnc, vnc_port = await listen_fake_vnc(self)
        token_a = await self.add_token(vnc_port, "instance-a")
        token_b = await self.add_token(vnc_port, "instance-b")
        token_c = await self.add_token(vnc_port, "instance-c")
        proxy1, proxy2 = self.start_proxy(), self.start_proxy()

        a1 = await self.relaying(proxy1, token_a)
        a2 = await self.relaying(proxy2, token_a)
        b1 = await self.relaying(proxy1, token_b)
        c2 = await self.relaying(proxy2, token_c)

        await self.cli("token", "revoke", token_a)
        revoked_at = reactor.seconds()
        self.assertEqual(await a1.closed, (4002, "token revoked"))
        self.assertEqual(await a2.closed, (4002, "token revoked"))
        self.assertLess(reactor.seconds() - revoked_at, 1.0)

        await self.cli("token", "revoke", "--instance", "instance-c")
        self.assertEqual(await c2.closed, (4002, "token revoked"))
        self.assertFalse(b1.closed.called, "a session of another token was closed")

        # The restarted server keeps no data: token b's record is gone with it, and the
        # revocation channel was down meanwhile. The proxy notices once it re-subscribes.
        self.redis.restart()
        self.assertEqual(await b1.closed, (4002, "token revoked"))


class ActivityWriteBackTests(TestCase):
    """last_activity_at reaches the token record, where other proxies and restarts see it."""

    timeout = 60
    cli = FleetRevocationTests.cli
    add_token = FleetRevocationTests.add_token
    start_proxy = FleetRevocationTests.start_proxy

    def test_input_written_back(self) -> None:
        """User input on a session is in the Redis record once the proxy has stopped."""
        return ensureDeferred(self._write_back())

    async def _write_back(self) -> None:
        self.redis = start_redis(self)
        vnc, vnc_port = await listen_fake_vnc(self)
        token = await self.add_token(vnc_port, "instance-a")
        port = self.start_proxy("--drain-timeout", "0")
        client = await connect_client(self, port, path=f"/websockify?token={token}")
        await client.receive(12)
        client.send(b"RFB 003.008\n\x01\x01")  # version, security None, ClientInit
        client.send(b"\x05\x00\x00\x10\x00\x10")  # a PointerEvent: user input
        await client.receive(12 + 14 + 6)
        typed_at = reactor.seconds()
        assert client.client is not None
        client.client.sendClose(1000)
        await client.closed
        stop_process(self.proc)  # SIGTERM: drain, write activity back, exit
        stamp = self.redis.client().hget(f"vncmux:token:{hash_token(token)}", "last_activity_at")
        self.assertIsNotNone(stamp, "no last_activity_at in the record")
        self.assertLess(abs(float(stamp) - typed_at), 2.0)
