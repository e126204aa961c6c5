"""
The helpers that tests and benchmarks share for real processes (``tests/processes.py``,
``tests/procfs.py``): listeners handed over by systemd socket activation, and how a proxy's
process tree is counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from unittest import TestCase

from tests.processes import (
    first_answer,
    loopback_listener,
    port_of,
    spawn,
    spawn_vncmux,
    stop_process,
)
from tests.procfs import group_members, process_tree

#: Answers one connection on each listener it got (fds 3, 4, ...) with the listener's name
#: and what systemd's variables said.
_ANSWER_EACH_LISTENER = """\
import os, socket
names = os.environ["LISTEN_FDNAMES"].split(":")
count = int(os.environ["LISTEN_FDS"])
assert int(os.environ["LISTEN_PID"]) == os.getpid()
for index, name in enumerate(names):
    with socket.socket(fileno=3 + index) as listener:
        conn, _ = listener.accept()
        conn.sendall(f"{name} {count}".encode())
        conn.close()
"""


class SocketActivationTests(TestCase):
    """spawn() hands over any number of listeners as fds 3, 4, ... with systemd's variables."""

    def test_each_listener_reaches_the_program_under_its_name(self) -> None:
        """Two listeners: each is served by the child under its own name, in order; the
        caller closed its copies first, so only the child can have answered."""
        with loopback_listener() as first, loopback_listener() as second:
            proc = spawn([sys.executable, "-c", _ANSWER_EACH_LISTENER],
                         listeners={"web": first, "metrics": second})  # fmt: skip
            ports = port_of(first), port_of(second)
        self.addCleanup(stop_process, proc)
        self.assertEqual(first_answer(ports[0], b"", 10.0), b"web 2")
        self.assertEqual(first_answer(ports[1], b"", 10.0), b"metrics 2")
        self.assertEqual(proc.wait(10.0), 0)

    def test_vncmux_serves_its_metrics_on_a_second_listener(self) -> None:
        """vncmux (as run.py's vncmux-metrics kind starts it) answers on both listeners it
        was handed: the console port and /healthz of its metrics endpoint."""
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        tokens = os.path.join(directory.name, "tokens")
        with open(tokens, "w") as f:
            f.write("demo: 127.0.0.1:5900\n")
        with loopback_listener() as listener, loopback_listener() as metrics:
            proc = spawn_vncmux(["--tokens", f"file:{tokens}", "--web", "none"], listener,
                                metrics_listener=metrics, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
            ports = port_of(listener), port_of(metrics)
        self.addCleanup(stop_process, proc)
        console = first_answer(ports[0], b"GET / HTTP/1.0\r\n\r\n", 30.0)
        self.assertIn(b" 404 ", console.split(b"\r\n", 1)[0])
        health = first_answer(ports[1], b"GET /healthz HTTP/1.0\r\n\r\n", 30.0)
        self.assertIn(b" 200 ", health.split(b"\r\n", 1)[0])


class ProcessTreeTests(TestCase):
    """What the benchmarks count as one proxy's processes (its CPU time and memory)."""

    def test_descendants_in_a_group_of_their_own_count(self) -> None:
        """A child that started a new session (a worker that left the proxy's process group)
        is still counted with the proxy; an unrelated process is not."""
        script = (
            "import subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(30)\n"
        )
        leader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                  start_new_session=True)  # fmt: skip
        self.addCleanup(leader.wait)
        self.addCleanup(leader.kill)
        assert leader.stdout is not None
        grandchild = int(leader.stdout.readline())
        self.addCleanup(lambda: subprocess.run(["kill", str(grandchild)], check=False))
        other = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(other.wait)
        self.addCleanup(other.kill)
        self.assertEqual(process_tree(leader.pid), sorted([leader.pid, grandchild]))
        self.assertEqual(group_members(leader.pid), [leader.pid])

    def test_a_zombie_counts_only_when_asked(self) -> None:
        """A child that exited but is not reaped yet is no live member of its group, but
        still one of the processes a stop must wait for."""
        zombie = subprocess.Popen(["true"], start_new_session=True)
        self.addCleanup(zombie.wait)
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
        self.assertEqual(group_members(zombie.pid), [])
        self.assertEqual(group_members(zombie.pid, zombies=True), [zombie.pid])
