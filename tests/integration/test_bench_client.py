"""
The benchmark client's raw TCP mode (how it speaks to socat) and its commands on stdin,
against ``benchmarks/backend.py`` directly on loopback: no proxy, no benchmark run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import IO, Any
from unittest import TestCase

from tests.processes import loopback_listener, port_of, spawn, stop_process

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
MiB = 2**20


class BenchClientTests(TestCase):
    """client.py --raw against one backend.py process."""

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """A process, killed on cleanup."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, **kw)
        self.addCleanup(proc.wait)  # cleanups run last first: kill, then reap
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def backend(self, mode: str, blast_bytes: int = MiB) -> tuple[subprocess.Popen[bytes], int]:
        """backend.py in ``mode`` on a listener it inherits, as run.py starts it, and its
        port (which it reports, too)."""
        with loopback_listener(backlog=1024) as listener:
            proc = spawn([sys.executable, str(BENCHMARKS / "backend.py"), "--mode", mode,
                          "--blast-bytes", str(blast_bytes), "--listen-fd", "3"],
                         stdout=subprocess.PIPE, listeners={"backend": listener})  # fmt: skip
            port = port_of(listener)
        self.addCleanup(stop_process, proc)
        assert proc.stdout is not None
        self.assertEqual(proc.stdout.readline().decode(), f"PORT {port}\n")
        return proc, port

    def client(self, *args: str) -> subprocess.Popen[bytes]:
        """client.py with a pipe for commands on its stdin."""
        argv = [sys.executable, str(BENCHMARKS / "client.py"), *args, "--timeout", "30"]
        return self.start(argv, stdin=subprocess.PIPE)

    def event(self, proc: subprocess.Popen[bytes], name: str) -> dict[str, Any]:
        """The next JSON line, which must be event ``name``."""
        assert proc.stdout is not None
        msg = json.loads(proc.stdout.readline())
        self.assertEqual(msg.get("event"), name, msg)
        return msg  # type: ignore[no-any-return]

    def command(self, proc: subprocess.Popen[bytes], line: str) -> None:
        """One command on the client's stdin."""
        stdin: IO[bytes] | None = proc.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def test_bulk_many_counts_every_byte_of_every_session(self) -> None:
        """Three raw sessions open (ready), start together on go, and each gets exactly its
        ServerInit plus --bytes (done); they stay open until close."""
        _, port = self.backend("blast", blast_bytes=MiB)
        proc = self.client("bulk-many", "--raw", "--ports", str(port), "--tokens", "b",
                           "--streams", "3", "--bytes", str(MiB))  # fmt: skip
        self.assertEqual(self.event(proc, "ready")["opened"], 3)
        self.command(proc, "go")
        done = self.event(proc, "done")
        self.assertEqual((done["complete"], done["bytes"]), (3, 3 * MiB))
        self.assertFalse(done["stopped_early"])
        self.assertEqual(done["errors"], {})
        self.command(proc, "close")
        self.assertEqual(self.event(proc, "result")["sessions"], 3)
        self.assertEqual(proc.wait(10), 0)

    def test_bulk_many_stopped_early_counts_what_arrived(self) -> None:
        """A background load is stopped on command before its bytes are all there."""
        _, port = self.backend("blast", blast_bytes=64 * 2**30)
        proc = self.client("bulk-many", "--raw", "--ports", str(port), "--tokens", "b",
                           "--streams", "2", "--bytes", str(64 * 2**30))  # fmt: skip
        self.event(proc, "ready")
        self.command(proc, "go")
        self.command(proc, "stop")
        done = self.event(proc, "done")
        self.assertTrue(done["stopped_early"])
        self.assertEqual(done["complete"], 0)
        self.assertLess(done["bytes"], 2 * 64 * 2**30)
        self.command(proc, "close")
        self.event(proc, "result")

    def test_idle_reports_when_each_session_closed(self) -> None:
        """Held raw sessions answer a round trip; when their server goes, `closes` gives
        the moment each one closed."""
        backend, port = self.backend("echo")
        proc = self.client("idle", "--raw", "--ports", str(port), "--tokens", "e",
                           "--sessions", "4", "--close-wait", "5")  # fmt: skip
        self.assertEqual(self.event(proc, "ready")["opened"], 4)
        self.command(proc, "check")
        self.assertEqual(self.event(proc, "checked")["alive"], 4)
        backend.kill()
        self.command(proc, "closes")
        closes = self.event(proc, "closes")
        self.assertEqual((len(closes["closed_at"]), closes["still_open"]), (4, 0))
        self.command(proc, "close")
        self.event(proc, "result")

    def test_paced_round_trips_keep_their_rate(self) -> None:
        """Two sessions at 40 messages a second for 0.5 s send about 40 round trips, not
        as many as they could."""
        _, port = self.backend("echo")
        proc = self.client("latency", "--raw", "--ports", str(port), "--tokens", "e",
                           "--streams", "2", "--rate", "40", "--duration", "0.5",
                           "--count", "10000", "--warmup", "2")  # fmt: skip
        result = self.event(proc, "result")
        self.assertGreaterEqual(result["round_trips"], 20)
        self.assertLessEqual(result["round_trips"], 2 * 40 * 0.5 + 4)
