"""
Helpers for tests, benchmarks and the demo that run vncmux and VNC servers as real processes
(not part of the installed package).

Every server gets a listening socket that the caller created on a free loopback port and passes
in, so nothing picks a fixed port and nothing polls for readiness: connections made before the
server calls ``accept()`` wait in the socket's backlog.

- L{loopback_listener} and L{reserved_port} make the sockets;
- L{spawn}, L{spawn_with_listener} and L{spawn_vncmux} start a program with its listeners as
  fds 3, 4, ..., the systemd socket-activation convention (``LISTEN_FDS``, ``LISTEN_PID``,
  ``LISTEN_FDNAMES``) that Twisted's ``systemd:domain=INET:index=N`` endpoint reads;
- L{first_answer} tells that a spawned server is up by one request it answers;
- L{start_xvnc} starts TigerVNC's ``Xvnc`` on a listener (its ``-inetd`` mode accepts a
  listening socket) and waits for the display number it reports through ``-displayfd``;
- L{start_xspice} starts Xorg with the spiceqxl driver (Debian's ``xserver-xspice``), a
  SPICE server on a free loopback port, and waits for its display the same way;
- L{stop_process} ends a process group started by these helpers and reaps it, escalating
  from SIGTERM to SIGKILL;
- L{raise_nofile} lets a load generator (and its children) open as many sockets as allowed.

Readings of ``/proc`` (process trees, CPU time, memory) are in L{tests.procfs}. This module
imports no reactor and nothing outside the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

LOOPBACK = "127.0.0.1"
SYSTEMD_LISTEN_ENDPOINT = "systemd:domain=INET:index=0"

# Runs in the child between fork and the real program (same pid after the exec):
# - asks the kernel for SIGTERM when the process that spawned it dies, so nothing outlives a
#   test run that was killed (prctl PR_SET_PDEATHSIG survives exec), and gives up at once if
#   that process is already gone;
# - with listeners: moves them to fds 3, 4, ... (by way of fds above every one of them, so
#   that none is overwritten before it moved) and sets systemd's socket-activation variables,
#   with LISTEN_FDNAMES as well (systemd sets it since version 227; Twisted ignores
#   LISTEN_FDS without it).
_TRAMPOLINE = """\
import fcntl, os, sys
parent, fds, names, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, 15, 0, 0, 0)
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(70)
if fds:
    sources = [int(fd) for fd in fds.split(",")]
    floor = max([*sources, 3 + len(sources)]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in sources]
    for fd in sources:
        os.close(fd)
    for index, fd in enumerate(moved):
        os.dup2(fd, 3 + index)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(sources))
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDNAMES"] = names
os.execvp(argv[0], argv)
"""
_Output = int | IO[bytes] | None
_Input = int | IO[bytes] | socket.socket | None


class ProcessStartError(RuntimeError):
    """A helper process exited or stayed silent instead of reporting that it was ready."""


def loopback_listener(backlog: int = 128, port: int = 0) -> socket.socket:
    """
    A TCP socket listening on 127.0.0.1: on a free port (its port is C{getsockname()[1]}),
    or on C{port} again, for a server restarted where its clients expect it. It sets
    C{SO_REUSEADDR} as Twisted's and asyncio's listeners do: a listener can be made again on
    the port while connections accepted by an earlier one still linger.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def reserved_port() -> socket.socket:
    """
    A socket bound to a free port of 127.0.0.1 that does not listen.

    While it stays open no other program can take the port and every connection to it is
    refused at once: a backend that is down, without any race.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def port_of(sock: socket.socket) -> int:
    """The local port of a bound socket."""
    return int(sock.getsockname()[1])


def is_listening(port: int, host: str = LOOPBACK) -> bool:
    """Whether a TCP connection to C{host:port} is accepted (the connection is closed again)."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def first_answer(port: int, request: bytes, timeout: float) -> bytes:
    """
    Send C{request} to a server on a loopback listener and read its answer to the end: it
    comes once the server accepts (until then the connection waits in the backlog), so it
    tells that a spawned server is up without polling.
    """
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def raise_nofile(need: int = 0) -> int:
    """
    Raise this process's soft RLIMIT_NOFILE to its hard limit, and the hard limit to C{need}
    when that is higher and allowed (root); children inherit both. Returns the soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need > hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def spawn(
    argv: Sequence[str],
    *,
    stdin: _Input = subprocess.DEVNULL,
    stdout: _Output = None,
    stderr: _Output = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pass_fds: Sequence[int] = (),
    listeners: Mapping[str, socket.socket] | None = None,
) -> subprocess.Popen[bytes]:
    """
    Start C{argv} in a session of its own (so L{stop_process} ends it with everything it
    forked), with no inherited descriptor but the standard ones and C{pass_fds}. It gets
    SIGTERM if the calling thread dies first (Linux's parent-death signal follows the thread
    that forked: spawn long-lived processes from the main thread).

    C{listeners} (name to socket, in order) become the program's fds 3, 4, ..., announced as
    systemd does it: C{LISTEN_FDS}, C{LISTEN_PID} (the program's pid) and C{LISTEN_FDNAMES}
    (the names, colon-separated); Twisted's C{systemd:domain=INET:index=N} endpoint takes
    the Nth. The caller may close its own copies of the listeners as soon as this returns.
    """
    fds = [sock.fileno() for sock in (listeners or {}).values()]
    return subprocess.Popen(
        trampoline_argv(argv, fds, ":".join(listeners or {})),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=dict(os.environ if env is None else env),
        cwd=cwd,
        pass_fds=[*pass_fds, *fds],
        start_new_session=True,
    )


def trampoline_argv(
    argv: Sequence[str], fds: Sequence[int] = (), names: str = "listener"
) -> list[str]:
    """
    C{argv} run through the trampoline that L{spawn} uses, also for callers that start the
    process themselves (Twisted's C{spawnProcess}): it dies with the calling process, and
    the child's descriptors C{fds} become its systemd socket-activation fds 3, 4, ...
    (C{names}: their names, colon-separated).
    """
    trampoline = [sys.executable, "-I", "-c", _TRAMPOLINE, str(os.getpid())]
    return [*trampoline, ",".join(map(str, fds)), names, *argv]


def systemd_endpoint(index: int = 0, family: socket.AddressFamily = socket.AF_INET) -> str:
    """
    The Twisted endpoint string of the C{index}th listener L{spawn} passed (from 0), a TCP
    socket (C{AF_INET}) or a Unix one (C{AF_UNIX}).
    """
    domain = {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}[family]
    return f"systemd:domain={domain}:index={index}"


def spawn_with_listener(
    argv: Sequence[str],
    listener: socket.socket,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdout: _Output = None,
    stderr: _Output = None,
    name: str = "listener",
) -> subprocess.Popen[bytes]:
    """L{spawn} C{argv} with C{listener} as its fd 3 (systemd socket activation)."""
    return spawn(argv, stdout=stdout, stderr=stderr, env=env, cwd=cwd, listeners={name: listener})


def twistd_command() -> list[str]:
    """The C{twistd} beside the running interpreter (a virtualenv's), else the one on C{PATH}."""
    local = Path(sys.executable).parent / "twistd"
    if local.exists():
        return [str(local)]
    found = shutil.which("twistd")
    if found is None:
        raise FileNotFoundError("twistd is not installed (pip install Twisted)")
    return [found]


def vncmux_command(
    args: Sequence[str], *, metrics_family: socket.AddressFamily | None = None
) -> list[str]:
    """
    C{twistd -n --pidfile= vncmux --listen systemd:domain=INET:index=0 ARGS...}: vncmux in
    the foreground on the first listener L{spawn} passes; with C{metrics_family}, its
    metrics endpoint on the second, a socket of that family (put no C{--metrics} in C{args}
    then).
    """
    argv = [*twistd_command(), "-n", "--pidfile=", "vncmux", "--listen", SYSTEMD_LISTEN_ENDPOINT]
    if metrics_family is not None:
        argv += ["--metrics", systemd_endpoint(1, metrics_family)]
    return [*argv, *args]


def spawn_vncmux(
    args: Sequence[str],
    listener: socket.socket,
    *,
    metrics_listener: socket.socket | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdout: _Output = None,
    stderr: _Output = None,
) -> subprocess.Popen[bytes]:
    """
    Run L{vncmux_command} serving on C{listener}, and its metrics (and admin API) on
    C{metrics_listener}, a TCP or a Unix listening socket.

    Connections to the listeners wait in their backlogs until vncmux accepts them, so the
    caller needs no readiness check: the first request is answered once the proxy is up.
    """
    listeners = {"listener": listener}
    metrics_family = None
    if metrics_listener is not None:
        listeners["metrics"] = metrics_listener
        metrics_family = metrics_listener.family
    return spawn(
        vncmux_command(args, metrics_family=metrics_family),
        stdout=stdout, stderr=stderr, env=env, cwd=cwd, listeners=listeners,
    )  # fmt: skip


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """
    End a process started in its own session by these helpers, and reap it.

    SIGTERM goes to its whole process group; after C{timeout} seconds SIGKILL follows. Any
    member of the group still alive once the leader is reaped (a forked worker) gets SIGKILL.
    @return: the leader's exit status (negative: the signal that ended it).
    """
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        _signal_group(proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only then
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    _signal_group(proc.pid, signal.SIGKILL)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return int(proc.returncode)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Xvnc:
    """A running TigerVNC server: its process, X display number and RFB port on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    display: int
    port: int
    password: str | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def display_name(self) -> str:
        """The value of C{DISPLAY} for X clients of this server."""
        return f":{self.display}"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for X clients of this server (C{DISPLAY} set, C{XAUTHORITY} unset)."""
        env = dict(os.environ if base is None else base)
        env["DISPLAY"] = self.display_name
        env.pop("XAUTHORITY", None)
        return env

    def x_files(self) -> list[Path]:
        """The lock file and socket the X server keeps under /tmp for its display."""
        return [Path(f"/tmp/.X{self.display}-lock"), Path(f"/tmp/.X11-unix/X{self.display}")]

    def stop(self, timeout: float = 5.0) -> None:
        """
        Stop the server and reap it. A server that had to be killed cannot remove its own X
        lock file and socket, so they are removed here.
        """
        status = stop_process(self.process, timeout)
        if status == -signal.SIGKILL:
            for path in self.x_files():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def start_xvnc(
    workdir: Path,
    *,
    password: str | None = None,
    security_types: str | None = None,
    geometry: str = "640x400",
    desktop: str = "vncmux",
    extra_args: Sequence[str] = (),
    timeout: float = 10.0,
) -> Xvnc:
    """
    Start TigerVNC's C{Xvnc} serving RFB on a fresh loopback listener, with no authentication
    or, given C{password}, VNC authentication (password file made by C{vncpasswd -f} in
    C{workdir}). C{security_types} replaces that choice (Xvnc's C{-SecurityTypes}, e.g.
    C{X509None} with C{-X509Cert}/C{-X509Key} in C{extra_args}); the password file is still
    made when C{password} is given.

    Xvnc takes the listening socket as its standard input (C{-inetd}) and picks a free X
    display itself, which it writes to a pipe once it is ready (C{-displayfd}); this returns
    then, or raises L{ProcessStartError} after C{timeout} seconds.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if password is None:
        security = ["-SecurityTypes", "None"]
    else:
        password_file = workdir / f"passwd-{os.getpid()}-{time.monotonic_ns()}"
        encoded = subprocess.run(
            ["vncpasswd", "-f"],
            input=password.encode() + b"\n",
            capture_output=True,
            check=True,
            timeout=timeout,
        ).stdout
        password_file.write_bytes(encoded)
        password_file.chmod(0o600)
        files.append(password_file)
        security = ["-SecurityTypes", "VncAuth", "-PasswordFile", str(password_file)]
    if security_types is not None:
        security[1] = security_types

    read_end, write_end = os.pipe()
    # Xvnc's -inetd moves its standard input to fd 3: keep the display pipe well above that.
    high_write_end = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(write_end)
    listener = loopback_listener()
    port = port_of(listener)
    try:
        argv = [
            "Xvnc",
            "-displayfd",
            str(high_write_end),
            "-geometry",
            geometry,
            "-depth",
            "24",
            "-desktop",
            desktop,
            *security,
            *extra_args,
            "-inetd",
        ]
        process = spawn(
            argv,
            stdin=listener,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(high_write_end,),
        )
    finally:
        os.close(high_write_end)
        listener.close()
    try:
        display = int(_read_line(read_end, timeout, process, "Xvnc"))
    except BaseException:
        stop_process(process)
        raise
    finally:
        os.close(read_end)
    return Xvnc(process, display, port, password, files)


class Xspice(Xvnc):
    """A running Xorg whose spiceqxl driver serves SPICE (not RFB) on C{port} of 127.0.0.1."""


#: Xorg's configuration for Xspice. Debian's stock file (/etc/X11/spiceqxl.xorg.conf) makes
#: Xorg crash: its buffers are too small, and without QXL_NUM_HEADS no output is connected,
#: so Xorg has no mode (both seen on Debian 12).
_XSPICE_CONF = """\
Section "Device"
    Identifier "XSPICE"
    Driver "spiceqxl"
    Option "SpiceAddr" "{address}"
    Option "SpicePort" "{port}"
    Option "SpiceDisableTicketing" "True"
    Option "FrameBufferSize" "16"
    Option "SurfaceBufferSize" "64"
    Option "CommandBufferSize" "128"
EndSection
Section "InputDevice"
    Identifier "XSPICE POINTER"
    Driver "xspice pointer"
EndSection
Section "InputDevice"
    Identifier "XSPICE KEYBOARD"
    Driver "xspice keyboard"
EndSection
Section "Monitor"
    Identifier "Configured Monitor"
EndSection
Section "Screen"
    Identifier "XSPICE Screen"
    Monitor "Configured Monitor"
    Device "XSPICE"
    DefaultDepth 24
EndSection
Section "ServerLayout"
    Identifier "XSPICE"
    Screen "XSPICE Screen"
    InputDevice "XSPICE KEYBOARD"
    InputDevice "XSPICE POINTER"
EndSection
Section "ServerFlags"
    Option "AutoAddDevices" "False"
EndSection
"""


def start_xspice(workdir: Path, *, timeout: float = 10.0) -> Xspice:
    """
    Start Xorg with the spiceqxl driver (what Debian's C{Xspice} script runs; the script
    itself ignores SIGTERM, so it is not used), SPICE on a free loopback port without a
    password, and wait for the display number Xorg reports through C{-displayfd}: the SPICE
    server listens by then (the driver starts it while the screen is set up).

    SPICE cannot take a listening socket, so its port is picked free just before the start.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(reserved_port()) as probe:
        port = port_of(probe)
    config = workdir / "xspice.conf"
    config.write_text(_XSPICE_CONF.format(address=LOOPBACK, port=port))
    read_end, write_end = os.pipe()
    env = dict(os.environ, QXL_NUM_HEADS="1")
    argv = [
        "Xorg", "-config", str(config), "-noreset", "-nolisten", "tcp",
        "-logfile", str(workdir / "xspice.log"), "-displayfd", str(write_end),
    ]  # fmt: skip
    try:
        process = spawn(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            pass_fds=(write_end,),
        )
    finally:
        os.close(write_end)
    try:
        display = int(_read_line(read_end, timeout, process, "Xorg (spiceqxl)"))
    except BaseException:
        stop_process(process)
        raise
    finally:
        os.close(read_end)
    return Xspice(process, display, port, None, [config])


def _read_line(fd: int, timeout: float, process: subprocess.Popen[bytes], what: str) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not ready:
            raise ProcessStartError(f"{what} reported nothing within {timeout} s")
        chunk = os.read(fd, 64)
        if not chunk:
            raise ProcessStartError(
                f"{what} exited with status {process.wait(timeout)} before it was ready"
            )
        data += chunk
    return data.decode("ascii").strip()


__all__ = [
    "LOOPBACK",
    "SYSTEMD_LISTEN_ENDPOINT",
    "ProcessStartError",
    "Xspice",
    "Xvnc",
    "first_answer",
    "is_listening",
    "loopback_listener",
    "port_of",
    "raise_nofile",
    "reserved_port",
    "spawn",
    "spawn_vncmux",
    "spawn_with_listener",
    "start_xspice",
    "start_xvnc",
    "stop_process",
    "systemd_endpoint",
    "trampoline_argv",
    "twistd_command",
    "vncmux_command",
]
