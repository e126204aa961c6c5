"""
Real consoles end to end: noVNC in headless Chromium, through the proxy, to real Xvnc servers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import GEOMETRY, Console, Consoles, E2ERun, ExpiryCase, Proxy
from tests.e2e.helpers import (
    FULL_STATUS,
    LITE_CANVAS,
    REJECTED,
    XEventLog,
    full_url,
    lite_url,
    sockets,
    wait_for_close,
    wait_for_pixel,
    wait_for_text,
)

if TYPE_CHECKING:
    from playwright.sync_api import Dialog, Page

OpenPage = Callable[[str], "Page"]

# A point of the desktop away from the xev window of the input test.
PROBE = (GEOMETRY[0] - 40, GEOMETRY[1] - 40)
XEV_GEOMETRY = "200x120+20+20"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "console.png"


def open_console(open_page: OpenPage, proxy: Proxy, console: Console) -> Page:
    """Open C{vnc_lite.html} for the console (password in the URL) and wait for its picture."""
    params = {} if console.password is None else {"password": console.password}
    page = open_page(lite_url(proxy.base_url, console.token, **params))
    wait_for_pixel(page, LITE_CANVAS, PROBE, console.colour)
    return page


def test_plain_console_shows_its_desktop(
    open_page: OpenPage, proxy: Proxy, consoles: Consoles, e2e_run: E2ERun
) -> None:
    """vnc_lite.html with the token of the server without authentication draws that server's
    colour and says it is connected. The page is also the quickstart's screenshot."""
    page = open_console(open_page, proxy, consoles.plain)
    (record,) = sockets(page)
    assert record["opened"] and record["close"] is None
    assert page.text_content("#status") == "Connected to vncmux-e2e-plain"
    screenshot = page.screenshot(path=str(e2e_run.directory / "console.png"))
    if proxy.kind == "vncmux":
        _update_if_changed(DOCS_SCREENSHOT, screenshot)


def _update_if_changed(path: Path, data: bytes) -> None:
    if not path.exists() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_password_console_asks_and_shows_its_desktop(
    open_page: OpenPage, proxy: Proxy, consoles: Consoles
) -> None:
    """For the server with a VNC password, vnc_lite.html asks for the password; once it is
    typed in, the page draws that server's colour (not the other server's)."""
    console = consoles.secured
    prompts: list[str] = []

    def answer(dialog: Dialog) -> None:
        prompts.append(dialog.message)
        dialog.accept(console.password)

    page = open_page("about:blank")
    page.on("dialog", answer)
    page.goto(lite_url(proxy.base_url, console.token))
    wait_for_pixel(page, LITE_CANVAS, PROBE, console.colour)
    assert prompts == ["Password Required:"]
    assert console.colour != consoles.plain.colour


def test_click_and_key_reach_the_vnc_server(
    open_page: OpenPage, proxy: Proxy, consoles: Consoles
) -> None:
    """A click on the noVNC canvas and a key typed in it arrive at the VNC server as X events
    at the same desktop coordinates (seen by an xev window on the server's display)."""
    console = consoles.plain
    xev = XEventLog.start(console.server, XEV_GEOMETRY)
    try:
        page = open_console(open_page, proxy, console)
        box = page.locator(LITE_CANVAS).bounding_box()
        assert box is not None
        # aim at the middle of desktop pixel (70, 50): the canvas may sit at a fractional offset
        page.mouse.click(box["x"] + 70.5, box["y"] + 50.5)
        press = xev.expect("ButtonPress", r"root:\(70,50\)")
        assert "button 1," in press.text
        xev.expect("ButtonRelease", r"root:\(70,50\)")
        page.keyboard.press("q")
        xev.expect("KeyPress", r"\(keysym 0x71, q\)")
        xev.expect("KeyRelease", r"\(keysym 0x71, q\)")
    finally:
        xev.stop()


REFUSALS = {
    "unknown token": (4401, "invalid token"),
    "unreachable backend": (4502, "console unreachable"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_console_says_why_and_proxy_goes_on(
    request: pytest.FixtureRequest,
    open_page: OpenPage,
    proxy: Proxy,
    consoles: Consoles,
    case: str,
) -> None:
    """For an unknown token and for a backend where nothing listens, noVNC's vnc.html shows
    "New connection has been rejected with reason: <reason>", the WebSocket (which did open)
    closes with the code of docs/protocol.md, and the next good session still works."""
    if not proxy.follows_refusal_contract:
        request.applymarker(
            pytest.mark.xfail(
                strict=True, reason=f"{proxy.kind} closes without an RFB security failure"
            )
        )
    code, reason = REFUSALS[case]
    token = consoles.unknown_token if case == "unknown token" else consoles.unreachable_token
    page = open_page(full_url(proxy.base_url, token))
    record = wait_for_close(page)
    assert record["opened"], "a refused session completes the WebSocket upgrade"
    assert (record["close"]["code"], record["close"]["reason"]) == (code, reason)
    wait_for_text(page, FULL_STATUS, REJECTED + reason)
    open_console(open_page, proxy, consoles.plain)


def test_expired_token_says_why_and_proxy_goes_on(
    request: pytest.FixtureRequest, open_page: OpenPage, expiry_case: ExpiryCase
) -> None:
    """For a token whose expiry time has passed, vnc.html shows "New connection has been
    rejected with reason: token expired", the WebSocket closes with 4403, and a good token on
    the same proxy still opens its console."""
    proxy = expiry_case.proxy
    if not proxy.follows_refusal_contract:
        request.applymarker(
            pytest.mark.xfail(strict=True, reason=f"{proxy.kind} has no token expiry")
        )
    page = open_page(full_url(proxy.base_url, expiry_case.expired_token))
    record = wait_for_close(page)
    assert record["opened"], "a refused session completes the WebSocket upgrade"
    assert (record["close"]["code"], record["close"]["reason"]) == (4403, "token expired")
    wait_for_text(page, FULL_STATUS, REJECTED + "token expired")
    open_console(open_page, proxy, expiry_case.good)


def test_three_sessions_at_once(open_page: OpenPage, proxy: Proxy, consoles: Consoles) -> None:
    """Three browser sessions run at the same time, two of them on the same token: each draws
    its own server's colour and all three WebSockets are open together."""
    chosen = (consoles.plain, consoles.secured, consoles.plain)
    pages = [open_console(open_page, proxy, console) for console in chosen]
    for page, console in zip(pages, chosen, strict=True):
        wait_for_pixel(page, LITE_CANVAS, PROBE, console.colour)
        (record,) = sockets(page)
        assert record["opened"] and record["close"] is None, record
