"""
Fixtures of the end-to-end tests: real VNC servers, the proxy under test and a headless
Chromium, each started once for the whole e2e run, and a final check that everything they
started is gone again.

The proxy is vncmux (``twistd -n vncmux``) unless ``VNCMUX_E2E_PROXY=websockify`` asks for
websockify with the same token file, the reference that proves the harness itself; the tests
of vncmux's own refusal contract are then expected to fail.

Nothing here sleeps or polls: every server gets a listening socket made on a free loopback
port before it starts (connections wait in its backlog until it accepts them), Xvnc reports
its display through ``-displayfd``, and every wait has a deadline of one stage
(``helpers.STAGE_TIMEOUT_S``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.helpers import (
    RECORD_WEBSOCKETS_JS,
    STAGE_TIMEOUT_MS,
    STAGE_TIMEOUT_S,
    Rgb,
    console_path,
    rgb_hex,
)
from tests.processes import (
    LOOPBACK,
    Xvnc,
    is_listening,
    loopback_listener,
    port_of,
    reserved_port,
    spawn,
    spawn_vncmux,
    start_xvnc,
    stop_process,
)
from tests.procfs import descendants, group_members, is_alive

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

    from vncmux.tokens import TokenRecord

NOVNC_DIR = Path("/usr/share/novnc")
# Debian packages that provide the commands the e2e tests run.
SYSTEM_TOOLS = {
    "Xvnc": "tigervnc-standalone-server",
    "vncpasswd": "tigervnc-tools",
    "xsetroot": "x11-xserver-utils",
    "xev": "x11-utils",
    "chromium": "chromium",
}
PYTHON_MODULES = ("playwright", "vncdotool", "autobahn")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GEOMETRY = (640, 400)
PROXY_KINDS = ("vncmux", "websockify")


@functools.cache
def missing_requirements() -> str | None:
    """One line naming what to install for the e2e tests, or C{None} when all is there."""
    packages = [package for tool, package in SYSTEM_TOOLS.items() if shutil.which(tool) is None]
    if not (NOVNC_DIR / "vnc_lite.html").exists():
        packages.append("novnc")
    modules = [name for name in PYTHON_MODULES if importlib.util.find_spec(name) is None]
    needs = []
    if packages:
        needs.append(f"apt-get install {' '.join(packages)} (or run scripts/install-system-deps)")
    if modules:
        needs.append(f"pip install -e '.[test]' (for {', '.join(modules)})")
    return None if not needs else "e2e tests need: " + "; ".join(needs)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip the e2e tests when a tool is missing, with one line saying what to install; under
    CI (the C{CI} environment variable set) fail instead, so nothing is skipped silently.

    A hook rather than a fixture, so that pytest folds all the skips into one summary line.
    """
    missing = missing_requirements()
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(missing, pytrace=False)
    pytest.skip(missing)


@dataclass
class E2ERun:
    """The e2e run's private directory and everything it started, for the final check."""

    directory: Path
    process_groups: list[int] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    x_files: list[Path] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)

    def leftovers(self) -> list[str]:
        """What is still alive or still on disk; empty once everything was cleaned up."""
        found = []
        for pgid in self.process_groups:
            found += [f"process {pid} of group {pgid}" for pid in group_members(pgid)]
        found += [f"process {pid}" for pid in self.processes if is_alive(pid)]
        found += [f"listener on {LOOPBACK}:{port}" for port in self.ports if is_listening(port)]
        found += [f"X file {path}" for path in self.x_files if path.exists()]
        return found


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ERun]:
    """The private directory of the e2e run. Torn down after every fixture that started
    something, it asserts that no process, listening port or X lock file is left."""
    run = E2ERun(tmp_path_factory.mktemp("e2e"))
    yield run
    leftovers = run.leftovers()
    for pgid in run.process_groups:  # never leave them running, even when the check fails
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    assert not leftovers, f"the e2e run left behind: {leftovers}"


@dataclass
class Console:
    """A VNC server behind the proxy: its token, the colour it paints, its password."""

    name: str
    server: Xvnc
    token: str
    colour: Rgb
    password: str | None = None


@dataclass
class Consoles:
    """The consoles of the run plus the tokens that must be refused."""

    plain: Console
    secured: Console
    unreachable_token: str
    unknown_token: str
    tokens_file: Path

    def __iter__(self) -> Iterator[Console]:
        return iter((self.plain, self.secured))


def _start_console(run: E2ERun, name: str, colour: Rgb, password: str | None = None) -> Console:
    server = start_xvnc(
        run.directory / name,
        password=password,
        geometry="x".join(map(str, GEOMETRY)),
        desktop=f"vncmux-e2e-{name}",
        timeout=STAGE_TIMEOUT_S,
    )
    run.process_groups.append(server.process.pid)
    run.ports.append(server.port)
    run.x_files += server.x_files()
    subprocess.run(
        ["xsetroot", "-solid", rgb_hex(colour)],
        env=server.env(),
        check=True,
        timeout=STAGE_TIMEOUT_S,
    )
    return Console(name, server, secrets.token_urlsafe(16), colour, password)


@pytest.fixture(scope="session")
def consoles(e2e_run: E2ERun) -> Iterator[Consoles]:
    """Two Xvnc servers, one without authentication painting blue and one with a VNC
    password painting orange, and a token file mapping a token to each of them and one to
    a port where nothing listens."""
    started: list[Console] = []
    unreachable = reserved_port()
    try:
        started.append(_start_console(e2e_run, "plain", (0x20, 0x60, 0xC0)))
        started.append(_start_console(e2e_run, "secured", (0xE0, 0x80, 0x20), "s3cret-pw"))
        plain, secured = started
        unreachable_token = secrets.token_urlsafe(16)
        tokens_file = e2e_run.directory / "tokens"
        tokens_file.write_text(
            f"{plain.token}: {LOOPBACK}:{plain.server.port}\n"
            f"{secured.token}: {LOOPBACK}:{secured.server.port}\n"
            f"{unreachable_token}: {LOOPBACK}:{port_of(unreachable)}\n"
        )
        yield Consoles(plain, secured, unreachable_token, secrets.token_urlsafe(16), tokens_file)
    finally:
        unreachable.close()
        for console in started:
            console.server.stop()


@dataclass
class Proxy:
    """The proxy under test, serving noVNC and the consoles on C{base_url}."""

    kind: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        """Where the browser loads noVNC from."""
        return f"http://{LOOPBACK}:{self.port}"

    def console_ws_url(self, token: str) -> str:
        """The WebSocket URL noVNC opens for C{token}."""
        return f"ws://{LOOPBACK}:{self.port}/{console_path(token)}"

    @property
    def follows_refusal_contract(self) -> bool:
        """Whether the proxy refuses as docs/protocol.md says (vncmux does, websockify
        closes without a reason)."""
        return self.kind == "vncmux"

    def log_text(self, start: int = 0) -> str:
        """The proxy's output from byte C{start} on."""
        with self.log.open("rb") as f:
            f.seek(start)
            return f.read().decode("utf-8", "replace")


def proxy_kind() -> str:
    """The proxy the e2e tests run against: C{VNCMUX_E2E_PROXY}, by default vncmux."""
    kind = os.environ.get("VNCMUX_E2E_PROXY", "vncmux")
    if kind not in PROXY_KINDS:
        raise pytest.UsageError(f"VNCMUX_E2E_PROXY must be one of {PROXY_KINDS}, not {kind!r}")
    return kind


def start_proxy(
    run: E2ERun, kind: str, tokens: str, name: str = "proxy", web: Path = NOVNC_DIR
) -> Proxy:
    """Start vncmux (C{tokens} is its C{--tokens} source) or websockify (C{tokens} is a
    token file) on a fresh loopback listener, serving C{web}; its output goes to a log in
    the run directory.
    """
    listener = loopback_listener()
    log = run.directory / f"{name}.log"
    try:
        with log.open("wb") as out:
            if kind == "vncmux":
                process = spawn_vncmux(
                    ["--tokens", tokens, "--web", str(web), "--metrics", "none"],
                    listener,
                    cwd=run.directory,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            else:
                websockify = str(Path(sys.executable).parent / "websockify")
                process = spawn(
                    [websockify, "--inetd", "--web", str(web),
                     "--token-plugin", "TokenFile", "--token-source", tokens],
                    stdin=listener,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=run.directory,
                )  # fmt: skip
    finally:
        port = port_of(listener)
        listener.close()
    run.process_groups.append(process.pid)
    run.ports.append(port)
    return Proxy(kind, port, process, log)


@pytest.fixture(scope="session")
def proxy(e2e_run: E2ERun, consoles: Consoles) -> Iterator[Proxy]:
    """The proxy under test with the consoles' token file and noVNC from C{--web}."""
    kind = proxy_kind()
    tokens = f"file:{consoles.tokens_file}" if kind == "vncmux" else str(consoles.tokens_file)
    started = start_proxy(e2e_run, kind, tokens)
    yield started
    stop_process(started.process)


@pytest.fixture(autouse=True)
def _proxy_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail at once when the proxy is no longer running, and print what it logged during the
    test (pytest shows it when the test fails)."""
    if "proxy" not in request.fixturenames:
        yield
        return
    proxy: Proxy = request.getfixturevalue("proxy")
    if proxy.process.poll() is not None:
        pytest.fail(
            f"{proxy.kind} exited with status {proxy.process.returncode}; its log ends:\n"
            + proxy.log_text()[-3000:]
        )
    start = proxy.log.stat().st_size
    yield
    print(f"--- {proxy.kind} log during this test ---\n{proxy.log_text(start)}")


@dataclass
class ExpiryCase:
    """A proxy that knows an expired token, and a good token on the same proxy."""

    proxy: Proxy
    expired_token: str
    good: Console


@pytest.fixture(scope="session")
def expiry_case(e2e_run: E2ERun, consoles: Consoles, proxy: Proxy) -> Iterator[ExpiryCase]:
    """
    A token whose C{expires_at} has passed. A token file has no expiry, so for vncmux this is
    a second vncmux on a Redis token store (a redis-server started here) holding an expired
    record and a good one, both for the plain console. websockify (which has no expiry
    either) gets a token it does not know.
    """
    if not proxy.follows_refusal_contract:
        yield ExpiryCase(proxy, secrets.token_urlsafe(16), consoles.plain)
        return
    from vncmux.tokens import TokenRecord, hash_token

    plain = consoles.plain
    expired_token, good_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    now = time.time()
    records = [
        TokenRecord(
            hash_token(token), LOOPBACK, plain.server.port, issued_at=now - 120, expires_at=at
        )
        for token, at in ((expired_token, now - 60), (good_token, now + 3600))
    ]
    with proxy_on_redis(e2e_run, records, "proxy-redis") as started:
        yield ExpiryCase(
            started,
            expired_token,
            Console("plain-via-redis", plain.server, good_token, plain.colour),
        )


@contextlib.contextmanager
def proxy_on_redis(e2e_run: E2ERun, records: list[TokenRecord], name: str) -> Iterator[Proxy]:
    """
    vncmux on a Redis token store (a redis-server started here, failing the test under CI
    when there is none) holding C{records}; its log is printed when it stops.
    """
    from tests.redis_server import INSTALL_HINT, RedisServer, find_redis_server
    from vncmux.tokens import token_key

    binary = find_redis_server()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT, pytrace=False)
        pytest.skip(INSTALL_HINT)
    redis = RedisServer(binary)
    try:
        redis.start()
        assert redis.process is not None
        e2e_run.processes.append(redis.process.pid)
        e2e_run.ports.append(redis.port)
        client = redis.client()
        for record in records:
            client.hset(token_key(record.token_hash), mapping=record.to_fields())
        client.close()
        started = start_proxy(e2e_run, "vncmux", redis.url(), name=name)
        try:
            yield started
        finally:
            stop_process(started.process)
            print(f"--- {name} log ---\n{started.log_text()}")
    finally:
        redis.cleanup()


@pytest.fixture(scope="session")
def browser(e2e_run: E2ERun) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh profile in the run directory; every page
    records its WebSockets (L{helpers.RECORD_WEBSOCKETS_JS})."""
    from playwright.sync_api import sync_playwright

    before = set(descendants(os.getpid()))
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(e2e_run.directory / "chromium-profile"),
            executable_path=shutil.which("chromium"),
            args=CHROMIUM_ARGS,
            viewport={"width": 800, "height": 520},
            timeout=STAGE_TIMEOUT_MS,
        )
        # The Playwright driver and Chromium; Chromium leads its own process group, which
        # its renderers join, so the final check covers those too.
        for pid in descendants(os.getpid()):
            if pid not in before:
                e2e_run.processes.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    if os.getpgid(pid) == pid:
                        e2e_run.process_groups.append(pid)
        try:
            context.set_default_timeout(STAGE_TIMEOUT_MS)
            context.add_init_script(RECORD_WEBSOCKETS_JS)
            yield context
        finally:
            context.close()


@pytest.fixture
def open_page(browser: BrowserContext) -> Iterator[Callable[[str], Page]]:
    """Opens pages at a URL; they are closed after the test, and their console messages are
    printed (shown when the test fails)."""
    pages: list[tuple[Page, list[str]]] = []

    def open_url(url: str) -> Page:
        page = browser.new_page()
        messages: list[str] = []
        page.on("console", lambda message: messages.append(f"{message.type}: {message.text}"))
        pages.append((page, messages))
        page.goto(url)
        return page

    yield open_url
    for page, messages in pages:
        print(f"--- browser console of {page.url} ---", *messages, sep="\n")
        page.close()
