"""SIGHUP reloads a real ``twistd -n vncmux`` instead of ending it (and every console)."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.processes import loopback_listener, port_of, spawn_vncmux, stop_process

WAIT = 10.0


def _get(port: int) -> bytes:
    """A plain GET on the console port: the answer's status line (404 without --web)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return conn.makefile("rb").readline()


class HangupTests(SynchronousTestCase):
    """The process survives SIGHUP, logs the reload and keeps serving."""

    def test_survives_sighup(self) -> None:
        """Two SIGHUPs: each is logged as a reload, the process stays up and answers."""
        tokens = os.path.abspath(self.mktemp())
        with open(tokens, "w") as f:
            f.write("demo: 127.0.0.1:5900\n")
        listener = loopback_listener()
        proc = spawn_vncmux(
            ["--tokens", f"file:{tokens}", "--metrics", "none", "--web", "none"],
            listener,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(stop_process, proc)
        port = port_of(listener)
        listener.close()
        self.assertIn(b" 404 ", _get(port))  # up: every service has started
        output = b""
        for reloads in (1, 2):
            os.kill(proc.pid, signal.SIGHUP)
            output = self._read_until(proc, output, reloads)
            self.assertIsNone(proc.poll(), output.decode(errors="replace"))
            self.assertIn(b" 404 ", _get(port))

    def _read_until(self, proc: subprocess.Popen[bytes], output: bytes, reloads: int) -> bytes:
        """The process's output until it has logged C{reloads} reloads (bounded wait)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + WAIT
        while output.count(b"SIGHUP: reload") < reloads:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
            if not readable:
                self.fail(f"no reload logged within {WAIT} s:\n{output.decode(errors='replace')}")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                self.fail(f"twistd exited:\n{output.decode(errors='replace')}")
            output += chunk
        return output
