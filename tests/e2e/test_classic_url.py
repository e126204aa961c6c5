"""
Issue 10: nova's classic access URL, ``http://HOST:PORT/vnc_auto.html?token=…``, opens the
console with Debian's noVNC 1.3 (whose pages do not carry the page's token into the WebSocket
URL) and with noVNC's core from npm (the latest release, pinned in tests/e2e/npm): vncmux sets
the token as a short-lived cookie when it serves the page, and the upgrade reads it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import GEOMETRY, Consoles, E2ERun, Proxy, start_proxy
from tests.e2e.helpers import (
    LITE_CANVAS,
    lite_url,
    sockets,
    wait_for_close,
    wait_for_pixel,
    wait_for_text,
)
from tests.processes import stop_process

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

OpenPage = Callable[[str], "Page"]

PROBE = (GEOMETRY[0] - 40, GEOMETRY[1] - 40)
FULL_CANVAS = "#noVNC_container canvas"
NPM_NOVNC = Path(__file__).parent / "npm" / "node_modules" / "@novnc" / "novnc"
CORE_PAGE = Path(__file__).parent / "pages" / "classic_core.html"
NPM_HINT = "noVNC from npm is missing: run `make novnc-npm` (needs npm)"


@pytest.fixture(autouse=True)
def _no_cookies_across_tests(browser: BrowserContext) -> Iterator[None]:
    """Cookies belong to a host, not a port: one set here would reach every proxy of the
    run on 127.0.0.1, so each test starts and ends without any."""
    browser.clear_cookies()
    yield
    browser.clear_cookies()


def _websocket_urls(page: Page) -> list[str]:
    return [record["url"] for record in sockets(page)]


def test_debian_novnc_classic_url(open_page: OpenPage, proxy: Proxy, consoles: Consoles) -> None:
    """Debian's vnc_auto.html?token=… (noVNC 1.3's vnc.html): after Connect, noVNC opens
    /websockify without a token and the console's desktop appears."""
    if proxy.kind != "vncmux":
        pytest.skip("the token cookie is vncmux's; websockify does not set it")
    console = consoles.plain
    page = open_page(f"{proxy.base_url}/vnc_auto.html?token={console.token}")
    page.click("#noVNC_connect_button")
    wait_for_pixel(page, FULL_CANVAS, PROBE, console.colour)
    assert _websocket_urls(page) == [f"ws://127.0.0.1:{proxy.port}/websockify"]


@pytest.fixture(scope="session")
def npm_core_proxy(e2e_run: E2ERun, consoles: Consoles) -> Iterator[Proxy]:
    """vncmux serving noVNC's core and vendor directories from npm plus the test's page."""
    if not NPM_NOVNC.joinpath("core", "rfb.js").exists():
        if os.environ.get("CI"):
            pytest.fail(NPM_HINT, pytrace=False)
        pytest.skip(NPM_HINT)
    web = e2e_run.directory / "npm-web"
    for part in ("core", "vendor"):
        shutil.copytree(NPM_NOVNC / part, web / part)
    shutil.copy(CORE_PAGE, web / "vnc_auto.html")
    started = start_proxy(
        e2e_run, "vncmux", f"file:{consoles.tokens_file}", name="proxy-npm", web=web
    )
    yield started
    stop_process(started.process)


def test_npm_novnc_core_classic_url(
    open_page: OpenPage, npm_core_proxy: Proxy, consoles: Consoles
) -> None:
    """noVNC's latest core from npm, in a page that opens /websockify without a token (as
    noVNC 1.3 does), reached by the classic URL: the console's desktop appears."""
    version = NPM_NOVNC.joinpath("package.json").read_text()
    assert '"version": "1.7.' in version, "tests/e2e/npm is not the pinned noVNC"
    console = consoles.plain
    page = open_page(f"{npm_core_proxy.base_url}/vnc_auto.html?token={console.token}")
    wait_for_pixel(page, LITE_CANVAS, PROBE, console.colour)
    wait_for_text(page, "#status", "Connected")
    assert _websocket_urls(page) == [f"ws://127.0.0.1:{npm_core_proxy.port}/websockify"]


def test_classic_url_without_the_cookie_is_refused(
    open_page: OpenPage, npm_core_proxy: Proxy, consoles: Consoles, browser: BrowserContext
) -> None:
    """The same page without ?token= gets no cookie and is refused (4400 bad request):
    the token of the test above came from the cookie, not from anywhere else. (Browsers
    scope cookies by host, not port: an earlier test's cookie is cleared first.)"""
    browser.clear_cookies()
    page = open_page(f"{npm_core_proxy.base_url}/vnc_auto.html")
    record = wait_for_close(page)
    assert record["close"]["code"] == 4400, record
    assert record["close"]["reason"] == "bad request", record


def test_vncmux_page_over_npm_core(
    open_page: OpenPage, npm_core_proxy: Proxy, consoles: Consoles
) -> None:
    """Over noVNC's core without a page (the npm package), vncmux serves its own page as
    vnc_lite.html: an access URL draws the console and names its desktop, and an unknown
    token shows the refusal's reason."""
    console = consoles.plain
    page = open_page(lite_url(npm_core_proxy.base_url, console.token))
    wait_for_pixel(page, LITE_CANVAS, PROBE, console.colour)
    wait_for_text(page, "#status", "Connected to ")
    refused = open_page(lite_url(npm_core_proxy.base_url, consoles.unknown_token))
    wait_for_text(refused, "#status", "Refused: invalid token")
