"""
The RFB security proxy end to end: noVNC in headless Chromium opens the console of an Xvnc
that wants a VNC password, through vncmux holding that password in the token's record, with
no password prompt; no byte the browser receives holds the password.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import GEOMETRY, Console, Consoles, E2ERun, Proxy, proxy_on_redis
from tests.e2e.helpers import LITE_CANVAS, lite_url, sockets, wait_for_pixel
from tests.processes import LOOPBACK

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Dialog, WebSocket

PROBE = (GEOMETRY[0] - 40, GEOMETRY[1] - 40)


@dataclass
class SecuredCase:
    """A vncmux on a Redis token store whose token for the password console carries the
    password."""

    proxy: Proxy
    token: str
    console: Console


@pytest.fixture(scope="module")
def secured_case(e2e_run: E2ERun, consoles: Consoles, proxy: Proxy) -> Iterator[SecuredCase]:
    """vncmux with a Redis store (a token file has no room for a password) and one record:
    the password console's address and its password."""
    if not proxy.follows_refusal_contract:
        pytest.skip(f"{proxy.kind} has no RFB security proxy")
    from vncmux.tokens import TokenRecord, hash_token

    console = consoles.secured
    token = secrets.token_urlsafe(16)
    record = TokenRecord(
        hash_token(token),
        LOOPBACK,
        console.server.port,
        issued_at=time.time(),
        password=console.password,
    )
    with proxy_on_redis(e2e_run, [record], "proxy-secured") as started:
        yield SecuredCase(started, token, console)


def test_password_console_opens_without_a_prompt(
    browser: BrowserContext, secured_case: SecuredCase
) -> None:
    """vnc_lite.html with the token of the password console draws that console's colour
    without asking for a password: vncmux did VncAuth itself and offered noVNC security type
    None (the second message noVNC got is [1 type: None]). Every byte the browser received
    over the WebSocket is captured: none holds the password, nor does the proxy's log."""
    case = secured_case
    password = case.console.password
    assert password is not None
    prompts: list[str] = []
    received: list[bytes] = []

    def on_dialog(dialog: Dialog) -> None:
        prompts.append(dialog.message)
        dialog.dismiss()

    def on_websocket(ws: WebSocket) -> None:
        ws.on(
            "framereceived",
            lambda payload: received.append(
                payload if isinstance(payload, bytes) else payload.encode()
            ),
        )

    page = browser.new_page()
    try:
        page.on("dialog", on_dialog)
        page.on("websocket", on_websocket)
        page.goto(lite_url(case.proxy.base_url, case.token))
        wait_for_pixel(page, LITE_CANVAS, PROBE, case.console.colour)
        assert prompts == []
        (record,) = sockets(page)
        assert record["opened"] and record["close"] is None
        assert page.text_content("#status") == "Connected to vncmux-e2e-secured"
        assert received[:2] == [b"RFB 003.008\n", b"\x01\x01"]
        stream = b"".join(received)
        assert b"vncmux-e2e-secured" in stream, "ServerInit came through the same WebSocket"
        for form in (password, password[:8]):
            assert form.encode() not in stream
        assert password not in case.proxy.log_text()
    finally:
        page.close()
