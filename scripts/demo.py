"""
``make demo``: a console in the browser in one command. Starts a local Xvnc desktop (no VNC
password, reachable from this machine only), issues a token for it into a temporary token
file, runs ``twistd -n vncmux`` in front of it and prints the URL to open. Ctrl-C (or
SIGTERM) stops the proxy and the desktop and removes the temporary files.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from tests.processes import LOOPBACK, Xvnc, spawn_vncmux, start_xvnc, stop_process
from vncmux.firstrun import NOVNC_PLACES, choose_web

#: The programs the demo runs, with the Debian package that has each.
NEEDED = {"Xvnc": "tigervnc-standalone-server"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--port", type=int, default=6080, help="console port on 127.0.0.1 (0: any free one)"
    )
    port_wanted = parser.parse_args(argv).port
    missing = [f"{tool} ({package})" for tool, package in NEEDED.items() if not shutil.which(tool)]
    if missing:
        print(f"demo: not installed: {', '.join(missing)}; apt-get install them", file=sys.stderr)
        return 1
    try:
        listener = socket.create_server((LOOPBACK, port_wanted), backlog=128)
    except OSError as e:
        print(
            f"demo: cannot listen on {LOOPBACK}:{port_wanted} ({e.strerror}); is `make run`"
            " running? `make demo DEMO_PORT=N` picks another port",
            file=sys.stderr,
        )
        return 1
    port = listener.getsockname()[1]
    web = choose_web(None, True, NOVNC_PLACES)
    if web.path is None:
        print(f"demo: {web.why}", file=sys.stderr)

    # Ctrl-C and SIGTERM end the demo through the cleanup below (SIGINT too when the shell
    # that started it in the background had it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="vncmux-demo-"))
    xvnc: Xvnc | None = None
    proxy: subprocess.Popen[bytes] | None = None
    try:
        xvnc = start_xvnc(workdir, geometry="1280x800", desktop="vncmux demo")
        if shutil.which("xsetroot"):
            subprocess.run(["xsetroot", "-solid", "#2060c0"], env=xvnc.env(), timeout=5)
        tokens = workdir / "tokens"
        url = _issue_token(tokens, xvnc.port, f"http://{LOOPBACK}:{port}/vnc_lite.html")
        # Ctrl-C closes open consoles at once (1001) instead of letting them drain, and
        # waits for their browsers' answer well within stop_process's patience.
        proxy = spawn_vncmux(
            ["--tokens", f"file:{tokens}", "--metrics", "none",
             "--drain-timeout", "0", "--close-timeout", "2"],
            listener,
        )  # fmt: skip
        listener.close()
        print(f"demo: Xvnc display {xvnc.display_name} on {LOOPBACK}:{xvnc.port}", flush=True)
        print(f"demo: token file {tokens}", flush=True)
        print(f"demo: open {url}", flush=True)
        print("demo: Ctrl-C stops the demo", flush=True)
        status = proxy.wait()
        print(f"demo: twistd exited with status {status}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut this short
            signal.signal(signum, signal.SIG_IGN)
        listener.close()
        stopped = []
        if proxy is not None:
            stopped.append(f"twistd exit status {stop_process(proxy)}")
        if xvnc is not None:
            xvnc.stop()
            stopped.append(f"Xvnc exit status {xvnc.process.returncode}")
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"demo: stopped ({', '.join(stopped)})", flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _issue_token(tokens: Path, vnc_port: int, page: str) -> str:
    """Add a token for the desktop with ``vncmux token add``; the URL it prints."""
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "vncmux.cli",
            "token",
            "add",
            "--tokens",
            f"file:{tokens}",
            "--host",
            LOOPBACK,
            "--port",
            str(vnc_port),
            "--base-url",
            page,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return added.stdout.split("url: ", 1)[1].split()[0]


if __name__ == "__main__":
    sys.exit(main())
