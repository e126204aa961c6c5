"""
Soak: vncmux under mixed sessions and random faults for a bounded time, on loopback.

Starts fake VNC backends (``backend.py``: ``--echo-backends`` echo servers and one blast
server), vncmux as ``twistd -n vncmux`` on a listening socket handed to it (file token store,
metrics and admin API on a Unix socket), then runs ``--workers`` session loops until
``--seconds`` have passed. Each loop picks a session at random:

- ``echo``: random binary messages in batches; every batch must come back byte for byte;
- ``blast``: the blast backend's ``--blast-bytes`` must arrive as its known pattern;
- ``vanish``: an echo session whose client drops its TCP connection mid-session, no close;
- ``revoke``: a token issued through the admin API, revoked mid-session: close code 4002.

Meanwhile a fault loop SIGKILLs a random echo backend every ``--kill-interval`` seconds (on
average) and restarts it on the same port: its sessions must end with 1000 or 1011, and new
ones to it meanwhile are refused with 4502; a batch cut short by a fault must still be an
exact prefix of what was sent. Everything else is an error, counted by reason.

vncmux's resident memory and open descriptors are read after a warm-up and again at the end,
once every session has closed (its ``vncmux_sessions_active`` gauge back at 0). One JSON
object goes to stdout (and ``--json-out``); the exit status is 1 on any error, a checksum
mismatch, a session left open, more descriptors than at the start, or a proxy log line with
a traceback.

    .venv/bin/python benchmarks/soak.py --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import WsConn, WsError, connect, rfb_handshake

from tests.processes import loopback_listener, port_of, raise_nofile, spawn_vncmux, stop_process
from tests.procfs import open_fds, resident_kib

HERE = Path(__file__).resolve().parent
PATTERN = bytes(range(256))
KINDS = {"echo": 50, "blast": 15, "vanish": 20, "revoke": 15}
#: Expected outcomes (the faults doing what they should); anything else is an error.
EXPECTED = {"ok", "vanished", "revoked", "cut_by_backend_kill", "refused_backend_down"}
SESSION_TIMEOUT = 30.0
BACKEND_LOST_CODES = {1000, 1011}
BACKEND_DOWN_CODE = 4502
REVOKED_CODE = 4002


@dataclass
class Backend:
    """One fake VNC server process; C{generation} counts its restarts."""

    mode: str
    token: str
    port: int = 0
    process: asyncio.subprocess.Process | None = None
    generation: int = 0
    down: bool = False


@dataclass
class Totals:
    """What the run saw."""

    outcomes: Counter[str] = field(default_factory=Counter)
    sessions: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    bytes_verified: int = 0


class SessionCut(Exception):
    """A session ended early, with an outcome (expected or not)."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


async def start_backend(backend: Backend, blast_bytes: int) -> None:
    """
    (Re)start C{backend} on a listener made here: on a free port the first time, then on the
    same port again (while it is down, connections to it are refused).
    """
    with loopback_listener(backlog=1024, port=backend.port) as listener:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "backend.py"),
            "--mode",
            backend.mode,
            "--listen-fd",
            str(listener.fileno()),
            "--blast-bytes",
            str(blast_bytes),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            pass_fds=(listener.fileno(),),
            start_new_session=True,
        )
        backend.port = port_of(listener)
    backend.process = process
    backend.down = False


class Admin:
    """vncmux's admin API and metrics over its Unix socket (HTTP/1.0, one request each)."""

    def __init__(self, path: str, secret: str) -> None:
        self.path = path
        self.secret = secret

    async def request(self, method: str, target: str, body: Any = None) -> tuple[int, bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {target} HTTP/1.0\r\nHost: soak\r\n"
            f"Authorization: Bearer {self.secret}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            writer.write(head.encode() + data)
            answer = await asyncio.wait_for(reader.read(), 10.0)
        finally:
            writer.close()
        status = int(answer.split(b" ", 2)[1])
        return status, answer.partition(b"\r\n\r\n")[2]

    async def metrics(self) -> dict[str, float]:
        """vncmux's samples, by their full text name (with labels)."""
        _, body = await self.request("GET", "/metrics")
        samples = {}
        for line in body.decode().splitlines():
            if line.startswith("vncmux_"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples


class Soak:
    """The session loops, the fault loop and their bookkeeping."""

    def __init__(self, args: argparse.Namespace, port: int, admin: Admin,
                 echo: list[Backend], blast: Backend) -> None:  # fmt: skip
        self.args = args
        self.port = port
        self.admin = admin
        self.echo = echo
        self.blast = blast
        self.rng = random.Random(args.seed)
        self.totals = Totals()
        self.blast_digest = hashlib.sha256(
            (PATTERN * (args.blast_bytes // len(PATTERN) + 1))[: args.blast_bytes]
        ).hexdigest()

    # -- sessions --------------------------------------------------------------------------

    async def session(self, kind: str) -> str:
        """One session of C{kind}; its outcome."""
        if kind == "blast":
            return await self._blast()
        backend = self.rng.choice(self.echo)
        token = backend.token
        if kind == "revoke":
            status, body = await self.admin.request(
                "POST", "/tokens", {"host": "127.0.0.1", "port": backend.port}
            )
            if status != 201:
                return f"error: admin POST /tokens answered {status}"
            token = json.loads(body)["token"]
        # A backend that is down now may be back before this session's refusal is judged:
        # a session that starts during an outage counts as hit by the kill.
        generation = -1 if backend.down else backend.generation
        conn: WsConn | None = None
        try:
            conn = await connect("127.0.0.1", self.port, token)
            try:
                await rfb_handshake(conn)
            except WsError:
                await asyncio.wait_for(conn.lost, 10.0)  # the refusal's close frame
                return self._cut(conn, backend, generation, "handshake")
            batches = self.rng.randint(1, 6)
            cut_after = self.rng.randint(1, batches) if kind in ("vanish", "revoke") else None
            for number in range(1, batches + 1):
                await self._echo_batch(conn, backend, generation)
                if number == cut_after:
                    break
                await asyncio.sleep(self.rng.uniform(0, 0.3))
            if kind == "vanish":
                assert conn.transport is not None
                conn.transport.abort()
                return "vanished"
            if kind == "revoke":
                status, _ = await self.admin.request("DELETE", f"/tokens/{token}")
                if status != 200:
                    return f"error: admin DELETE /tokens answered {status}"
                await asyncio.wait_for(conn.lost, 10.0)
                if conn.close_code == REVOKED_CODE:
                    return "revoked"
                return self._cut(conn, backend, generation, "revoked session")
            conn.close()
            return "ok"
        except SessionCut as cut:
            return cut.outcome
        finally:
            if conn is not None and conn.transport is not None:
                conn.transport.abort()

    async def _echo_batch(self, conn: WsConn, backend: Backend, generation: int) -> None:
        """A few random messages; what comes back must be exactly what was sent."""
        rng = self.rng
        sent = b"".join(
            conn_send(conn, rng.randbytes(rng.randint(1, 32 * 1024)))
            for _ in range(rng.randint(1, 8))
        )
        try:
            back = await conn.read_exactly(len(sent))
        except WsError:
            received = bytes(conn.inbox)
            if not sent.startswith(received):
                raise SessionCut("error: checksum mismatch (cut batch)") from None
            self.totals.bytes_verified += len(received)
            raise SessionCut(self._cut(conn, backend, generation, "echo")) from None
        if hashlib.sha256(back).digest() != hashlib.sha256(sent).digest():
            raise SessionCut("error: checksum mismatch")
        self.totals.bytes_verified += len(sent)

    async def _blast(self) -> str:
        conn = await connect("127.0.0.1", self.port, self.blast.token)
        try:
            await rfb_handshake(conn)
            data = await conn.read_exactly(self.args.blast_bytes)
            if hashlib.sha256(data).hexdigest() != self.blast_digest:
                return "error: checksum mismatch (blast)"
            self.totals.bytes_verified += len(data)
            conn.close()
            return "ok"
        except WsError as e:
            return f"error: blast session: {e} (close {conn.close_code})"
        finally:
            if conn.transport is not None:
                conn.transport.abort()

    def _cut(self, conn: WsConn, backend: Backend, generation: int, where: str) -> str:
        """Why a session ended early: a backend kill explains 1000/1011 and 4502."""
        killed = backend.down or backend.generation != generation
        code = conn.close_code
        if killed and code in BACKEND_LOST_CODES:
            return "cut_by_backend_kill"
        if killed and code == BACKEND_DOWN_CODE:
            return "refused_backend_down"
        return f"error: {where} ended with close {code}" + (" (backend killed)" if killed else "")

    async def worker(self, deadline: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            self.totals.sessions[kind] += 1
            try:
                outcome = await asyncio.wait_for(self.session(kind), SESSION_TIMEOUT)
            except TimeoutError:
                outcome = f"error: {kind} session timed out"
            except (OSError, WsError) as e:
                outcome = f"error: {kind} session: {type(e).__name__}: {e}"
            self.totals.outcomes[outcome] += 1

    # -- faults ----------------------------------------------------------------------------

    async def killer(self, deadline: float) -> None:
        """SIGKILL a random echo backend now and then, and bring it back on its port."""
        interval = self.args.kill_interval
        while True:
            await asyncio.sleep(self.rng.uniform(0.5 * interval, 1.5 * interval))
            if time.monotonic() >= deadline:
                return
            backend = self.rng.choice(self.echo)
            backend.down = True
            backend.generation += 1
            assert backend.process is not None
            backend.process.kill()
            await backend.process.wait()
            self.totals.faults["backend_killed"] += 1
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            await start_backend(backend, self.args.blast_bytes)


def conn_send(conn: WsConn, payload: bytes) -> bytes:
    """Send one message (unless the connection is closing: the batch's read then says why);
    the payload, for the batch's record of what was sent."""
    if conn.transport is not None and not conn.transport.is_closing():
        conn.send(payload)
    return payload


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="vncmux-soak-"))
    echo = [Backend("echo", f"echo{i}") for i in range(args.echo_backends)]
    blast = Backend("blast", "blast0")
    backends = [*echo, blast]
    for backend in backends:
        await start_backend(backend, args.blast_bytes)
    tokens = workdir / "tokens"
    tokens.write_text("".join(f"{b.token}: 127.0.0.1:{b.port}\n" for b in backends))
    secret = secrets.token_urlsafe(24)
    (workdir / "admin-secret").write_text(secret + "\n")
    metrics_socket = str(workdir / "metrics.sock")
    metrics_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    metrics_listener.bind(metrics_socket)
    metrics_listener.listen(128)
    listener = loopback_listener(backlog=1024)
    port = port_of(listener)
    log = (workdir / "vncmux.log").open("wb")
    proxy = spawn_vncmux(
        ["--tokens", f"file:{tokens}",
         "--admin-token-file", str(workdir / "admin-secret"),
         # every worker shares the few backend tokens, all from 127.0.0.1
         "--max-sessions-per-token", "0", "--max-sessions-per-client", "0",
         "--max-pending-per-client", "0"],
        listener, metrics_listener=metrics_listener, stdout=log, stderr=log, cwd=workdir,
    )  # fmt: skip
    listener.close()
    metrics_listener.close()
    admin = Admin(metrics_socket, secret)
    soak = Soak(args, port, admin, echo, blast)
    try:
        warm = await soak.session("echo")
        if warm != "ok":
            raise RuntimeError(f"the warm-up session failed: {warm}")
        rss_start, fds_start = resident_kib(proxy.pid), open_fds(proxy.pid)
        started = time.monotonic()
        deadline = started + args.seconds
        await asyncio.gather(
            soak.killer(deadline), *(soak.worker(deadline) for _ in range(args.workers))
        )
        elapsed = time.monotonic() - started
        for backend in backends:
            if backend.process is None or backend.process.returncode is not None:
                await start_backend(backend, args.blast_bytes)
        left = await _sessions_left(admin, 15.0)
        fds_end = await _settled_fds(proxy.pid, fds_start, 15.0)
        rss_end = resident_kib(proxy.pid)
        samples = await admin.metrics()
    finally:
        exit_status = stop_process(proxy)
        log.close()
        for backend in backends:
            if backend.process is not None and backend.process.returncode is None:
                backend.process.terminate()
                await backend.process.wait()
    log_text = (workdir / "vncmux.log").read_text(errors="replace")
    totals = soak.totals
    soak.totals.faults["client_vanished"] = totals.outcomes["vanished"]
    soak.totals.faults["token_revoked"] = totals.outcomes["revoked"]
    errors = {k: v for k, v in totals.outcomes.items() if k not in EXPECTED}
    result = {
        "seconds": round(elapsed, 1),
        "workers": args.workers,
        "seed": args.seed,
        "sessions": dict(totals.sessions),
        "outcomes": dict(totals.outcomes),
        "errors": errors,
        "faults": dict(totals.faults),
        "bytes_verified": totals.bytes_verified,
        "sessions_left_open": left,
        "proxy_rss_kib": {"start": rss_start, "end": rss_end, "growth": rss_end - rss_start},
        "proxy_fds": {
            "start": sum(fds_start.values()),
            "end": sum(fds_end.values()),
            "more_at_end": dict(fds_end - fds_start),
        },
        "proxy_closed_by_reason": _labelled(samples, "vncmux_sessions_closed_total"),
        "proxy_rejected_by_reason": _labelled(samples, "vncmux_sessions_rejected_total"),
        "proxy_log_tracebacks": log_text.count("Traceback"),
        "proxy_exit_status": exit_status,
        "proxy_log_lines": log_text.count("\n"),
        "workdir": str(workdir),
    }
    result["passed"] = (
        not errors
        and left == 0
        and not fds_end - fds_start
        and result["proxy_log_tracebacks"] == 0
        and exit_status in (0, -signal.SIGTERM)  # twistd ends with the signal it got
    )
    return result


async def _sessions_left(admin: Admin, seconds: float) -> int:
    """Wait (at most C{seconds}) until vncmux has no session left; how many it still has."""
    deadline = time.monotonic() + seconds
    while True:
        active = int((await admin.metrics()).get("vncmux_sessions_active", -1))
        if active == 0 or time.monotonic() > deadline:
            return active
        await asyncio.sleep(0.2)


async def _settled_fds(pid: int, start: Counter[str], seconds: float) -> Counter[str]:
    """vncmux's descriptors once no more are open than at the start (closing sessions may
    hold theirs up to the close timeout), or after C{seconds}."""
    deadline = time.monotonic() + seconds
    while True:
        now = open_fds(pid)
        if not now - start or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.2)


def _labelled(samples: dict[str, float], family: str) -> dict[str, int]:
    prefix = family + '{reason="'
    return {
        name[len(prefix) : name.index('"', len(prefix))]: int(value)
        for name, value in samples.items()
        if name.startswith(prefix)
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long sessions start")
    parser.add_argument("--workers", type=int, default=16, help="concurrent session loops")
    parser.add_argument("--echo-backends", type=int, default=3)
    parser.add_argument("--blast-bytes", type=int, default=2 * 1024 * 1024)
    parser.add_argument("--kill-interval", type=float, default=4.0,
                        help="mean seconds between two backend kills")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    if not 1 <= args.seconds <= 24 * 3600 or not 1 <= args.workers <= 1000:
        parser.error("--seconds must be 1..86400 and --workers 1..1000")
    if args.echo_backends < 1:
        parser.error("--echo-backends must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile(4 * args.workers + 256)
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
