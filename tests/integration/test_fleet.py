"""Proxy processes sharing one real Redis: revocation reaches every instance, and the fleet
view (docs/sessions.md, "The fleet") lists, ends and counts every instance's sessions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.integration.test_observability import AUTH, SECRET, http
from tests.processes import loopback_listener, port_of, spawn_vncmux, stop_process
from tests.redis_server import start_redis
from tests.support import GREETING, ClientState, connect_client, listen_fake_vnc
from vncmux.fleet import COUNTS_KEY_PREFIX, SESSIONS_KEY_PREFIX
from vncmux.tokens import hash_token, token_id_of

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


class FleetViewTests(TestCase):
    """
    Two `twistd vncmux` instances share one Redis (issue #11, the fleet view): the admin API
    of A lists and ends B's sessions, a per-token limit counts both, and an instance that is
    killed or stopped leaves the registry by itself.
    """

    timeout = 60
    cli = FleetRevocationTests.cli
    relaying = FleetRevocationTests.relaying

    async def token(self, vnc_port: int, *extra: str) -> str:
        out = await self.cli(
            "token", "add", "--host", "127.0.0.1", "--port", str(vnc_port), "--ttl", "600", *extra
        )
        return out.split("token: ", 1)[1].split()[0]

    def instance(self, *args: str, admin: bool = False) -> Instance:
        """A `twistd -n vncmux` on its own listener (and admin API), stopped on cleanup."""
        listener = loopback_listener()
        metrics_listener = None
        options = ["--metrics", "none"]
        admin_port = 0
        if admin:
            secret = self.mktemp()
            with open(secret, "w") as f:
                f.write(SECRET)
            metrics_listener = loopback_listener()
            admin_port = port_of(metrics_listener)
            options = ["--admin-token-file", secret]
        proc = spawn_vncmux(
            ["--tokens", self.redis.url(), "--idle-timeout", "0", *options, *args],
            listener,
            metrics_listener=metrics_listener,
        )
        self.addCleanup(stop_process, proc)
        port = port_of(listener)
        listener.close()
        if metrics_listener is not None:
            metrics_listener.close()
        return Instance(proc, port, admin_port)

    async def refusal(self, port: int, token: str) -> tuple[int | None, str | None]:
        """How a console of C{token} is refused (after the RFB version, as noVNC sends it)."""
        client = await connect_client(self, port, path=f"/websockify?token={token}")
        await client.receive(12)
        client.send(b"RFB 003.008\n")
        return await client.closed

    async def admin(self, instance: Instance, method: str, path: str) -> tuple[int, Any]:
        answer = await http(instance.admin_port, method, path, AUTH)
        return answer.status, json.loads(answer.body)

    def fleet_keys(self, instance: Instance, client: Any = None) -> list[str]:
        """The registry keys of C{instance} (its id holds its pid)."""
        if client is None:
            with self.redis.client() as client:
                return self.fleet_keys(instance, client)
        return sorted(k for k in client.keys("vncmux:fleet:*") if f":{instance.proc.pid}:" in k)

    def until_registry(self, holds: Callable[[Any], bool]) -> None:
        """
        Wait until C{holds(client)}, a check of the registry in Redis, at most 2 s: an
        instance writes its sessions' starts and ends at most every 50 ms, so the registry
        lags the instance's own table that long.
        """
        if not self.redis.wait_for(holds, "vncmux:fleet:*"):
            self.fail("the fleet registry did not show it within 2 s")

    def registered(self, client: Any, instance: Instance, prefix: str) -> int:
        """Fields of C{instance}'s registry hash C{prefix} (sessions, or per-token counts)."""
        keys = self.fleet_keys(instance, client)
        return sum(client.hlen(k) for k in keys if k.startswith(prefix))

    def test_admin_lists_and_ends_every_instance(self) -> None:
        """GET /sessions on A lists B's session too (once B has written it); DELETE of B's
        session on A closes it on B with 4002 within a second; once B has written its end,
        it is gone (404)."""
        return ensureDeferred(self._admin())

    async def _admin(self) -> None:
        self.redis = start_redis(self)
        vnc, vnc_port = await listen_fake_vnc(self)
        token_a, token_b = await self.token(vnc_port), await self.token(vnc_port)
        a, b = self.instance(admin=True), self.instance()
        await self.relaying(a.port, token_a)  # A is up: its admin port is listening
        on_b = await self.relaying(b.port, token_b)
        self.until_registry(lambda c: self.registered(c, b, SESSIONS_KEY_PREFIX) == 1)
        status, listed = await self.admin(a, "GET", "/sessions")
        self.assertEqual(status, 200)
        by_token = {s["token_id"]: s for s in listed}
        self.assertEqual(set(by_token), {token_id_of(hash_token(t)) for t in (token_a, token_b)})
        ours, theirs = (
            by_token[token_id_of(hash_token(token_a))],
            by_token[token_id_of(hash_token(token_b))],
        )
        self.assertIn(f":{a.proc.pid}:", ours["instance"])
        self.assertIn(f":{b.proc.pid}:", theirs["instance"])
        status, shown = await self.admin(a, "GET", f"/sessions/{theirs['session_id']}")
        self.assertEqual((status, shown["backend_port"]), (200, vnc_port))

        asked_at = reactor.seconds()
        status, _ = await self.admin(a, "DELETE", f"/sessions/{theirs['session_id']}")
        self.assertEqual(status, 200)
        self.assertEqual(await on_b.closed, (4002, "token revoked"))
        self.assertLess(reactor.seconds() - asked_at, 1.0)
        self.until_registry(lambda c: self.registered(c, b, SESSIONS_KEY_PREFIX) == 0)
        status, _ = await self.admin(a, "DELETE", f"/sessions/{theirs['session_id']}")
        self.assertEqual(status, 404)

    def test_per_token_limit_across_instances(self) -> None:
        """A token limited to one session has it on A: B refuses the second with 4429;
        once A's session ends, B accepts one."""
        return ensureDeferred(self._limit())

    async def _limit(self) -> None:
        self.redis = start_redis(self)
        vnc, vnc_port = await listen_fake_vnc(self)
        token = await self.token(vnc_port, "--max-sessions", "1")
        a, b = self.instance(), self.instance()
        on_a = await self.relaying(a.port, token)
        self.assertEqual(await self.refusal(b.port, token), (4429, "too many sessions"))
        assert on_a.client is not None
        on_a.client.sendClose(1000)
        await on_a.closed
        self.until_registry(lambda c: self.registered(c, a, COUNTS_KEY_PREFIX) == 0)
        await self.relaying(b.port, token)

    def test_killed_instance_leaves_within_one_ttl(self) -> None:
        """B, killed with SIGKILL, leaves A's listing and the per-token counts once its
        heartbeat key expires: within one TTL (3 heartbeats of 0.5 s) of the kill."""
        return ensureDeferred(self._killed())

    async def _killed(self) -> None:
        self.redis = start_redis(self)
        client = self.redis.client()
        client.config_set("notify-keyspace-events", "Ex")
        vnc, vnc_port = await listen_fake_vnc(self)
        token = await self.token(vnc_port, "--max-sessions", "1")
        heartbeat = ["--fleet-heartbeat", "0.5"]
        a, b = self.instance(*heartbeat, admin=True), self.instance(*heartbeat)
        await self.relaying(b.port, token)
        self.assertEqual(await self.refusal(a.port, token), (4429, "too many sessions"))
        self.until_registry(lambda c: self.registered(c, b, SESSIONS_KEY_PREFIX) == 1)
        status, listed = await self.admin(a, "GET", "/sessions")
        self.assertEqual([f":{b.proc.pid}:" in s["instance"] for s in listed], [True])
        alive = next(k for k in self.fleet_keys(b) if k.startswith("vncmux:fleet:alive:"))

        expired = client.pubsub()
        expired.subscribe("__keyevent@0__:expired")
        os.killpg(b.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        self.assertLessEqual(client.pttl(alive), 1500)
        deadline = killed_at + 3.0
        while time.monotonic() < deadline:
            message = expired.get_message(timeout=deadline - time.monotonic())
            if message and message["data"] == alive:
                break
        gone_after = time.monotonic() - killed_at
        expired.close()
        self.assertLess(gone_after, 1.5 + 0.5)  # one TTL, and Redis's expiry cycle (100 ms)

        status, listed = await self.admin(a, "GET", "/sessions")
        self.assertEqual((status, listed), (200, []))
        await self.relaying(a.port, token)  # B's place is not counted any more
        self.assertEqual(self.fleet_keys(b), [])

    def test_lost_registry_written_again(self) -> None:
        """When Redis loses the registry (here its keys are deleted; a restarted Redis
        without persistence loses them too), B's next heartbeat writes it all again."""
        return ensureDeferred(self._lost())

    async def _lost(self) -> None:
        self.redis = start_redis(self)
        client = self.redis.client()
        client.config_set("notify-keyspace-events", "E$")
        vnc, vnc_port = await listen_fake_vnc(self)
        token = await self.token(vnc_port)
        heartbeat = ["--fleet-heartbeat", "0.5"]
        a, b = self.instance(*heartbeat, admin=True), self.instance(*heartbeat)
        await self.relaying(a.port, token)  # A is up: its admin port is listening
        await self.relaying(b.port, token)
        alive = next(k for k in self.fleet_keys(b) if k.startswith("vncmux:fleet:alive:"))
        written = client.pubsub()
        written.subscribe("__keyevent@0__:set")
        client.delete(*client.keys("vncmux:fleet:*"))
        status, listed = await self.admin(a, "GET", "/sessions")
        self.assertEqual([f":{b.proc.pid}:" in s["instance"] for s in listed], [False])
        deleted_at = time.monotonic()
        while time.monotonic() < deleted_at + 3.0:
            message = written.get_message(timeout=deleted_at + 3.0 - time.monotonic())
            if message and message["data"] == alive:
                break
        written.close()
        self.assertLess(time.monotonic() - deleted_at, 0.5 + 0.2)  # within one heartbeat
        status, listed = await self.admin(a, "GET", "/sessions")
        self.assertEqual([f":{b.proc.pid}:" in s["instance"] for s in listed], [False, True])

    def test_clean_stop_removes_keys(self) -> None:
        """SIGTERM: B drains and deletes its registry keys at once; A's stay."""
        return ensureDeferred(self._stopped())

    async def _stopped(self) -> None:
        self.redis = start_redis(self)
        vnc, vnc_port = await listen_fake_vnc(self)
        token = await self.token(vnc_port)
        a, b = self.instance(), self.instance("--drain-timeout", "0")
        await self.relaying(a.port, token)
        on_b = await self.relaying(b.port, token)
        self.until_registry(lambda c: len(self.fleet_keys(b, c)) == 3)  # alive, sessions, counts
        assert on_b.client is not None
        on_b.client.sendClose(1000)  # stop_process blocks this reactor: no close handshake then
        await on_b.closed
        stop_process(b.proc)
        self.assertEqual(self.fleet_keys(b), [])
        self.assertEqual(len(self.fleet_keys(a)), 3)


@dataclass
class Instance:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int = 0


class FailedAttemptsAcrossInstancesTests(TestCase):
    """Unknown tokens counted on one instance block their client on every instance: the
    cooldown lives in Redis, checked by the lookup's own script."""

    timeout = 60
    cli = FleetRevocationTests.cli
    relaying = FleetRevocationTests.relaying
    token = FleetViewTests.token
    instance = FleetViewTests.instance
    refusal = FleetViewTests.refusal

    def test_blocked_on_every_instance(self) -> None:
        """With --max-failed-tokens 2, three unknown tokens on A (4401 each) block the
        client: on B a good token gets 4429 'too many failed attempts', and its console is
        not dialled."""
        return ensureDeferred(self._blocked())

    async def _blocked(self) -> None:
        self.redis = start_redis(self)
        vnc, vnc_port = await listen_fake_vnc(self)
        token = await self.token(vnc_port)
        limit = ("--max-failed-tokens", "2")
        a, b = self.instance(*limit), self.instance(*limit)
        await self.relaying(a.port, token)  # both up, the token good
        await self.relaying(b.port, token)
        dialled = len(vnc.connections)
        for _ in range(3):
            self.assertEqual(await self.refusal(a.port, "no-such-token"), (4401, "invalid token"))
        self.assertEqual(await self.refusal(b.port, token), (4429, "too many failed attempts"))
        self.assertEqual(len(vnc.connections), dialled)
