"""
Helpers for the end-to-end tests: noVNC URLs, reading a noVNC page (canvas pixels, status
text, the WebSockets it opened) and recording X input events on a VNC server's display.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from tests.processes import Xvnc, spawn, stop_process

if TYPE_CHECKING:  # playwright is imported only once the e2e requirements were checked
    from playwright.sync_api import Page

# Each stage (page load, VNC handshake, first frame, an input event reaching the server, the
# refusal of a session) gets this long, so a hung proxy fails a test in seconds.
STAGE_TIMEOUT_S = 10.0
STAGE_TIMEOUT_MS = int(STAGE_TIMEOUT_S * 1000)

LITE_CANVAS = "#screen canvas"
FULL_STATUS = "#noVNC_status"
REJECTED = "New connection has been rejected with reason: "

Rgb = tuple[int, int, int]

# Installed in every page before noVNC loads: wraps window.WebSocket to record, for each socket
# the page opens, whether it opened, its subprotocol and its close event.
RECORD_WEBSOCKETS_JS = """
(() => {
  const Native = window.WebSocket;
  const sockets = [];
  Object.defineProperty(window, "__e2eSockets", { value: sockets });
  // A function returning the native object, not a subclass: noVNC checks that the
  // socket's own prototype carries WebSocket's methods.
  function RecordingWebSocket(...args) {
    const socket = new Native(...args);
    const entry = { url: String(args[0]), opened: false, protocol: null, close: null };
    sockets.push(entry);
    socket.addEventListener("open", () => {
      entry.opened = true;
      entry.protocol = socket.protocol;
    });
    socket.addEventListener("close", (e) => {
      entry.close = { code: e.code, reason: e.reason, wasClean: e.wasClean };
    });
    return socket;
  }
  RecordingWebSocket.prototype = Native.prototype;
  for (const name of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) {
    RecordingWebSocket[name] = Native[name];
  }
  window.WebSocket = RecordingWebSocket;
})();
"""

_PIXEL_JS = """
([selector, x, y]) => {
  const canvas = document.querySelector(selector);
  if (!canvas || canvas.width <= x || canvas.height <= y) return null;
  const d = canvas.getContext("2d").getImageData(x, y, 1, 1).data;
  return [d[0], d[1], d[2]];
}
"""

_PIXEL_IS_JS = """
([selector, x, y, rgb]) => {
  const canvas = document.querySelector(selector);
  if (!canvas || canvas.width <= x || canvas.height <= y) return false;
  const d = canvas.getContext("2d").getImageData(x, y, 1, 1).data;
  return d[0] === rgb[0] && d[1] === rgb[1] && d[2] === rgb[2];
}
"""


def rgb_hex(rgb: Rgb) -> str:
    """C{#rrggbb}, as C{xsetroot -solid} takes it."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def console_path(token: str) -> str:
    """The WebSocket path noVNC opens for C{token}."""
    return f"websockify?token={token}"


def lite_url(base: str, token: str, **params: str) -> str:
    """C{vnc_lite.html} for C{token}: the access URL a control plane hands out."""
    query = urlencode({"path": console_path(token), **params})
    return f"{base}/vnc_lite.html?{query}"


def full_url(base: str, token: str, **params: str) -> str:
    """noVNC's full client C{vnc.html}, connecting at once."""
    query = urlencode({"autoconnect": "1", "path": console_path(token), **params})
    return f"{base}/vnc.html?{query}"


def sockets(page: Page) -> list[dict[str, Any]]:
    """What L{RECORD_WEBSOCKETS_JS} saw: one dict per WebSocket the page opened."""
    return list(page.evaluate("() => window.__e2eSockets"))


def pixel(page: Page, selector: str, x: int, y: int) -> Rgb | None:
    """The colour of one canvas pixel, or C{None} while there is no such canvas."""
    value = page.evaluate(_PIXEL_JS, [selector, x, y])
    return None if value is None else (value[0], value[1], value[2])


def describe(page: Page) -> str:
    """The state of a noVNC page, for assertion messages."""
    status = page.evaluate(
        "() => (document.getElementById('noVNC_status') || document.getElementById('status'))"
        "?.textContent ?? null"
    )
    return f"url={page.url} status={status!r} sockets={sockets(page)!r}"


def wait_for_pixel(page: Page, selector: str, point: tuple[int, int], rgb: Rgb) -> None:
    """Wait (one stage at most) until the canvas pixel at C{point} has colour C{rgb}."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    x, y = point
    try:
        page.wait_for_function(
            _PIXEL_IS_JS, arg=[selector, x, y, list(rgb)], timeout=STAGE_TIMEOUT_MS
        )
    except PlaywrightTimeout:
        seen = pixel(page, selector, x, y)
        raise AssertionError(
            f"canvas pixel {point} is {seen}, not {rgb} after {STAGE_TIMEOUT_S} s; "
            + describe(page)
        ) from None


def wait_for_close(page: Page) -> dict[str, Any]:
    """Wait (one stage at most) until the page's first WebSocket has closed; its record."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "() => window.__e2eSockets.length > 0 && window.__e2eSockets[0].close !== null",
            timeout=STAGE_TIMEOUT_MS,
        )
    except PlaywrightTimeout:
        raise AssertionError(
            f"the WebSocket did not close within {STAGE_TIMEOUT_S} s; " + describe(page)
        ) from None
    return sockets(page)[0]


def wait_for_text(page: Page, selector: str, text: str) -> None:
    """Wait (one stage at most) until the element's text contains C{text}."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "([sel, text]) => (document.querySelector(sel)?.textContent ?? '').includes(text)",
            arg=[selector, text],
            timeout=STAGE_TIMEOUT_MS,
        )
    except PlaywrightTimeout:
        raise AssertionError(
            f"{selector} never said {text!r} within {STAGE_TIMEOUT_S} s; " + describe(page)
        ) from None


@dataclass
class XEvent:
    """One event as C{xev} printed it: its name (C{ButtonPress}) and its full text."""

    name: str
    text: str


class XEventLog:
    """
    An C{xev} window on a VNC server's display, recording the input events the X server
    delivers to it: proof that a click or key sent by a VNC client reached the server.

    C{xev} selects the events when it creates its window and prints C{MapNotify} once the
    window is mapped, so L{start} returns only when events can no longer be missed. xev
    flushes its output once per event (each event starts with a blank line and a line
    C{"<Name> event, ..."}), so a thread reading its output turns every chunk it reads into
    complete L{XEvent}s; L{expect} waits for the next one that matches.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self._events: queue.Queue[XEvent | None] = queue.Queue()
        self.seen: list[XEvent] = []
        self._reader = threading.Thread(target=self._read, name="xev-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, server: Xvnc, geometry: str) -> XEventLog:
        """Open an C{xev} window with C{geometry} (C{WxH+X+Y}) and wait until it is mapped."""
        process = spawn(
            ["xev", "-geometry", geometry,
             "-event", "structure", "-event", "button", "-event", "keyboard"],
            env=server.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log = cls(process)
        try:
            log.expect("MapNotify")
        except BaseException:
            log.stop()
            raise
        return log

    def _read(self) -> None:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            for text in re.split(r"\n\s*\n", chunk.decode("utf-8", "replace")):
                if text.strip():
                    self._events.put(XEvent(text.split(None, 1)[0], text.strip()))
        self._events.put(None)

    def expect(self, name: str, pattern: str = "") -> XEvent:
        """
        Wait (one stage at most) for the next event called C{name} whose text matches the
        regular expression C{pattern}; events before it are kept in L{seen}.
        """
        deadline = time.monotonic() + STAGE_TIMEOUT_S
        while True:
            try:
                event = self._events.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise AssertionError(
                    f"no {name} matching {pattern!r} within {STAGE_TIMEOUT_S} s; xev saw:\n"
                    + "\n".join(e.text for e in self.seen)
                ) from None
            if event is None:
                raise AssertionError(f"xev exited before a {name}; it saw {self.seen}")
            self.seen.append(event)
            if event.name == name and re.search(pattern, event.text):
                return event

    def stop(self) -> None:
        """End C{xev} and its reader thread."""
        self._process.terminate()
        try:
            self._process.wait(STAGE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._reader.join(STAGE_TIMEOUT_S)  # it ends at EOF on the dead process's output
        stop_process(self._process)
