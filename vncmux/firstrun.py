"""
What a first run needs to show a console: a noVNC to serve when ``--web`` is not given, and,
once the listeners are up, the URLs to open and the one command that adds a token.

A proxy on its embedded defaults otherwise answers 404 on its port and says nothing of what
to do next; these lines are the hint.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from vncmux.issuing import DEFAULT_BASE_URL, access_url
from vncmux.novadb import SOURCE_PREFIX
from vncmux.service import Listener
from vncmux.tokens import RedisConfig
from vncmux.web import NOVNC_PAGE, is_novnc_core


@dataclass(frozen=True)
class NovncPlace:
    """A directory where noVNC may be installed, and what to call it in the log."""

    path: str
    label: str


#: Where a proxy started without ``--web`` looks for noVNC, in this order: the working
#: directory's npm package first (someone put it there for this proxy), then Debian's.
NOVNC_PLACES = (
    NovncPlace("node_modules/@novnc/novnc", "the npm package @novnc/novnc"),
    NovncPlace("/usr/share/novnc", "Debian's novnc"),
)


@dataclass(frozen=True)
class WebChoice:
    """The directory the console listener serves (C{None}: nothing) and why, for the log."""

    path: str | None
    why: str


def choose_web(given: str | None, search: bool, places: Sequence[NovncPlace]) -> WebChoice:
    """
    ``--web DIR`` as given; without it (C{search}), the first of C{places} holding noVNC's
    pages or its core; ``--web none`` (C{given} None, no C{search}) serves nothing.
    """
    elsewhere = "--web DIR serves another directory, --web none serves nothing"
    if given is not None:
        return WebChoice(given, f"serving --web {given}{_core_note(given)}")
    if not search:
        return WebChoice(None, "--web none: plain HTTP requests get 404")
    for place in places:
        if _has_novnc(place.path):
            return WebChoice(
                place.path,
                f"serving {place.label} from {place.path}{_core_note(place.path)} ({elsewhere})",
            )
    looked = ", ".join(place.path for place in places)
    return WebChoice(
        None,
        f"no noVNC found ({looked}): plain HTTP requests get 404; install Debian's novnc"
        " (apt-get install novnc) or the npm package (npm install @novnc/novnc), or give"
        " --web DIR",
    )


def _has_novnc(path: str) -> bool:
    return os.path.isfile(os.path.join(path, NOVNC_PAGE)) or is_novnc_core(path)


def _core_note(path: str) -> str:
    return " under vncmux's own page (noVNC's core, no vnc.html)" if is_novnc_core(path) else ""


def token_command(tokens: str, base_url: str | None) -> str | None:
    """
    The command that adds a token this proxy accepts, or C{None} when tokens come from
    nova's database (nova issues them). A URL with a Redis or Sentinel password is shown
    without its secrets (the password as ``***``).
    """
    if tokens.startswith(SOURCE_PREFIX):
        return None
    shown = tokens
    if "://" in tokens and not tokens.startswith("file:"):
        redis = RedisConfig.from_url(tokens)
        if redis.password is not None or redis.sentinel_password is not None:
            shown = redis.redacted_url()
    words = [
        _vncmux_script(),
        "token",
        "add",
        "--tokens",
        shown,
        "--host",
        "HOST",
        "--port",
        "PORT",
    ]
    if base_url is not None:
        words += ["--base-url", base_url]
    command = " ".join(words)
    return f"{command} (*** is the store's password)" if shown != tokens else command


def _vncmux_script() -> str:
    """``vncmux`` if that is the one beside this interpreter, else its path (a virtualenv
    that is not activated)."""
    local = Path(sys.executable).parent / "vncmux"
    found = shutil.which("vncmux")
    if not local.exists() or (found is not None and Path(found) == local):
        return "vncmux"
    try:
        return str(local.relative_to(Path.cwd()))
    except ValueError:
        return str(local)


def http_url(port: IListeningPort, secure: bool) -> str:
    """The root URL of a listening port, from this machine (a wildcard address is opened
    on the loopback address)."""
    address = port.getHost()
    if not isinstance(address, IPv4Address | IPv6Address):
        return str(address)
    host = address.host
    if isinstance(address, IPv6Address):
        host = f"[{'::1' if host == '::' else host}]"
    elif host == "0.0.0.0":
        host = "127.0.0.1"
    return f"{'https' if secure else 'http'}://{host}:{address.port}/"


class StartupHints(Service):
    """Logs, once the listeners are up, where to point a browser and how to add a token."""

    _log = Logger()

    def __init__(
        self,
        console: Listener,
        metrics: Listener | None,
        web: WebChoice,
        tokens: str,
    ) -> None:
        self._console = console
        self._metrics = metrics
        self._web = web
        self._tokens = tokens

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self._log.info("noVNC: {why}", why=self._web.why)
        listeners = [self._console, *([self._metrics] if self._metrics else [])]
        gatherResults([listener.listening() for listener in listeners]).addCallback(self._tell)

    def _tell(self, ports: list[Any]) -> None:
        console_url = http_url(ports[0], self._console.tls is not None)
        self._log.info(
            "console listener: {url} (WebSocket {ws}websockify?token=TOKEN)",
            url=console_url,
            ws=console_url.replace("http", "ws", 1),
        )
        if self._metrics is not None:
            metrics_url = http_url(ports[1], self._metrics.tls is not None)
            self._log.info("metrics: {url}metrics", url=metrics_url)
        page = f"{console_url}{NOVNC_PAGE}"
        if self._web.path is not None:
            self._log.info("noVNC page: {url}", url=access_url(page, "TOKEN"))
        command = token_command(self._tokens, None if page == DEFAULT_BASE_URL else page)
        if command is None:
            self._log.info("tokens: issued by nova (openstack console url show SERVER)")
        else:
            self._log.info("add a token (it prints the URL to open): {command}", command=command)
