"""A first run on real sockets: vncmux's page over noVNC's core, and ``make demo`` end to end."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.blocking_ws import exchange, has_payload, read_until, split_upgrade, upgrade_request
from tests.conformance.wsframes import CLOSE, close_payload, frame, parse_server_frames
from tests.processes import spawn, stop_process
from tests.procfs import descendants
from tests.support import async_test, listen_proxy, parse_response, raw_request
from vncmux.firstrun import NOVNC_PLACES, choose_web
from vncmux.tokens import MemoryTokenStore
from vncmux.web import CORE_PAGE

ROOT = Path(__file__).resolve().parents[2]
WAIT = 15.0
GREETING = b"RFB 003.008\n"


def get(target: str) -> bytes:
    """A plain GET of C{target} that closes the connection after the answer."""
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()


class CorePageTests(TestCase):
    """A --web directory with noVNC's core and no page (the npm package) gets vncmux's page."""

    @async_test
    async def test_page_over_core(self) -> None:
        """/, vnc.html and vnc_lite.html are vncmux's page, which imports ./core/rfb.js;
        the core's files are served as they are; a page opened with ?token= sets the
        token cookie as noVNC's own pages do."""
        npm = Path(self.mktemp()) / "novnc"
        (npm / "core").mkdir(parents=True)
        (npm / "core" / "rfb.js").write_text("export default class RFB {}\n")
        proxy = await listen_proxy(self, MemoryTokenStore(), web=str(npm))
        page = Path(CORE_PAGE).read_bytes()
        self.assertIn(b'import RFB from "./core/rfb.js"', page)
        for target in ("/", "/vnc.html", "/vnc_lite.html?path=websockify%3Ftoken%3Dt"):
            answer = parse_response(await raw_request(proxy.port, get(target)))
            self.assertEqual((answer.status, answer.body), (200, page), target)
            self.assertIn("text/html", answer.headers["content-type"])
        core = parse_response(await raw_request(proxy.port, get("/core/rfb.js")))
        self.assertEqual(core.body, b"export default class RFB {}\n")
        classic = parse_response(await raw_request(proxy.port, get("/vnc_lite.html?token=abc")))
        self.assertIn("token=abc", classic.headers["set-cookie"])


def _need(test: SynchronousTestCase) -> None:
    """Skip (fail under CI) without Xvnc or a noVNC to serve."""
    missing = []
    if shutil.which("Xvnc") is None:
        missing.append("Xvnc (tigervnc-standalone-server)")
    if choose_web(None, True, NOVNC_PLACES).path is None:
        missing.append("noVNC (novnc)")
    if missing:
        message = f"make demo needs {', '.join(missing)}"
        if os.environ.get("CI"):
            test.fail(message)
        test.skipTest(message)


class DemoTests(SynchronousTestCase):
    """``make demo`` (scripts/demo.py): from nothing to a console URL, and back to nothing."""

    def test_demo_serves_a_console_and_stops_on_ctrl_c(self) -> None:
        """The printed URL's page is served and its token opens a WebSocket that relays the
        real Xvnc's RFB greeting; SIGINT closes that console with 1001, stops the proxy and
        Xvnc (no SIGKILL needed) and removes the token file and the X server's files."""
        _need(self)
        demo = spawn(
            [sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.addCleanup(stop_process, demo)
        said = self._read_until(demo, "demo: Ctrl-C stops the demo")
        url = urlsplit(said["demo: open"])
        display = int(said["demo: Xvnc display"].split()[0].lstrip(":"))
        tokens = Path(said["demo: token file"])
        port = url.port
        assert port is not None
        children = descendants(demo.pid)
        self.assertTrue(children)

        page = exchange(port, get(f"{url.path}?{url.query}"))
        self.assertTrue(page.startswith(b"HTTP/1.1 200 "), page[:80])
        ws_path = "/" + unquote(url.query.removeprefix("path="))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            client.sendall(upgrade_request(port, ws_path))
            answer = read_until(client, has_payload(len(GREETING)))
            self.assertEqual(split_upgrade(answer)[1], GREETING)

            os.kill(demo.pid, signal.SIGINT)  # with the console still open
            answer += read_until(client, lambda more: _close_code(answer + more) is not None)
            self.assertEqual(_close_code(answer), 1001)
            client.sendall(frame(close_payload(1001), CLOSE))  # as a browser answers it
            self.assertEqual(demo.wait(WAIT), 0)
        said = self._read_until(demo, "demo: stopped")
        # twistd ends itself with the SIGTERM it shut down on (-15); -9 would mean killed.
        self.assertEqual(said["demo: stopped"], "(twistd exit status -15, Xvnc exit status 0)")
        self.assertEqual([pid for pid in children if Path(f"/proc/{pid}").exists()], [])
        self.assertFalse(tokens.parent.exists())
        for leftover in (f"/tmp/.X{display}-lock", f"/tmp/.X11-unix/X{display}"):
            self.assertFalse(os.path.exists(leftover), leftover)

    def _read_until(self, proc: subprocess.Popen[bytes], last: str) -> dict[str, str]:
        """The demo's ``demo: KEY VALUE`` lines up to C{last}, by key (bounded wait)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + WAIT
        output = b""
        while last.encode() not in output:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
            chunk = os.read(proc.stdout.fileno(), 65536) if readable else b""
            if not chunk:
                self.fail(f"no {last!r} within {WAIT} s:\n{output.decode(errors='replace')}")
            output += chunk
        said = {}
        for line in output.decode().splitlines():
            for key in ("demo: open", "demo: Xvnc display", "demo: token file", "demo: stopped"):
                if line.startswith(key + " "):
                    said[key] = line[len(key) + 1 :]
        return said


def _close_code(answer: bytes) -> int | None:
    """The code of the close frame after the upgrade's answer, if one arrived whole."""
    try:
        frames = parse_server_frames(answer.partition(b"\r\n\r\n")[2])
    except AssertionError:  # a frame not complete yet
        return None
    return next((f.close_code for f in frames if f.opcode == CLOSE), None)
