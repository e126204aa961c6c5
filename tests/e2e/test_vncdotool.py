"""
A second real client without a browser: vncdotool, through the proxy over WebSocket.

vncdotool speaks RFB over TCP only, so it connects to a small WebSocket-to-TCP shim
(``wsshim.py``) that opens the proxy's WebSocket with the console's token.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import GEOMETRY, Console, Consoles, E2ERun, Proxy
from tests.e2e.helpers import STAGE_TIMEOUT_S
from tests.processes import LOOPBACK, loopback_listener, port_of, spawn, stop_process

SHIM = Path(__file__).with_name("wsshim.py")
VNCDO = Path(sys.executable).parent / "vncdo"


@dataclass
class Shim:
    """A running ``wsshim.py``: RFB clients connect to C{port}; its log says how the
    WebSockets closed."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path


@pytest.fixture
def shim(
    e2e_run: E2ERun, proxy: Proxy, request: pytest.FixtureRequest
) -> Iterator[Callable[[Console], Shim]]:
    """Starts a shim to the proxy's WebSocket for a console's token; stopped after the test."""
    started: list[Shim] = []

    def start(console: Console) -> Shim:
        listener = loopback_listener()
        log = e2e_run.directory / f"wsshim-{request.node.name}-{len(started)}.log"
        url = proxy.console_ws_url(console.token)
        try:
            with log.open("wb") as out:
                process = spawn(
                    [sys.executable, str(SHIM), url],
                    stdin=listener,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        finally:
            port = port_of(listener)
            listener.close()
        e2e_run.process_groups.append(process.pid)
        e2e_run.ports.append(port)
        started.append(Shim(process, port, log))
        return started[-1]

    yield start
    for running in started:
        stop_process(running.process)
        print(f"--- {running.log.name} ---\n{running.log.read_text()}")


@pytest.mark.parametrize("name", ["plain", "secured"])
def test_vncdotool_captures_a_screenshot_through_the_proxy(
    e2e_run: E2ERun,
    consoles: Consoles,
    shim: Callable[[Console], Shim],
    name: str,
) -> None:
    """vncdotool, a Twisted RFB client, captures the console's desktop through the proxy's
    WebSocket (giving the VNC password where there is one): a full-size picture in the
    server's colour."""
    console = consoles.plain if name == "plain" else consoles.secured
    running = shim(console)
    capture = e2e_run.directory / f"vncdo-{name}.png"
    password = [] if console.password is None else ["--password", console.password]
    subprocess.run(
        [str(VNCDO), "--server", f"{LOOPBACK}::{running.port}", *password, "capture", str(capture)],
        check=True,
        timeout=STAGE_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    with Image.open(capture) as image:
        assert image.size == GEOMETRY
        rgb = image.convert("RGB")
        corners = {rgb.getpixel((x, y)) for x in (0, GEOMETRY[0] - 1) for y in (0, GEOMETRY[1] - 1)}
        assert corners == {console.colour}
