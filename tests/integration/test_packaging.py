"""
The packages as a user gets them: the sdist and the wheel built by ``python -m build``, the
wheel installed (not editable) into a fresh virtualenv, and the installed ``twistd vncmux``
and ``vncmux`` run from a directory without the sources. Built and installed once per test
session (about 15 seconds).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.blocking_ws import has_payload, read_until, split_upgrade, upgrade_request
from tests.conformance.wsframes import frame
from tests.processes import (
    LOOPBACK,
    SYSTEMD_LISTEN_ENDPOINT,
    loopback_listener,
    port_of,
    spawn_with_listener,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[2]
WAIT = 10.0
GREETING = b"RFB 003.008\n"
#: Twisted's own way to rebuild the plugin cache after an install (its plugin howto).
REBUILD_PLUGIN_CACHE = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"


@dataclass
class Installed:
    """The built distributions and the virtualenv the wheel went into."""

    sdist: Path
    wheel: Path
    venv: Path
    #: An empty directory to run the installed commands in (no sources on sys.path).
    elsewhere: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run an installed command in C{elsewhere}; its output (both streams) and status."""
        return subprocess.run(
            argv,
            cwd=self.elsewhere,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    @property
    def plugins(self) -> Path:
        """The installed twisted/plugins directory, where the wheel put vncmux_plugin.py."""
        found = list(self.venv.glob("lib/python*/site-packages/twisted/plugins"))
        assert len(found) == 1, found
        return found[0]


def _clean_env() -> dict[str, str]:
    """This environment without anything that could lead Python to the source tree."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _check(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Build the sdist and (from it) the wheel, and install the wheel into a fresh venv."""
    base = tmp_path_factory.mktemp("packaging")
    dist = base / "dist"
    _check([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], base)
    (sdist,) = dist.glob("vncmux-*.tar.gz")
    (wheel,) = dist.glob("vncmux-*.whl")
    venv = base / "venv"
    _check([sys.executable, "-m", "venv", str(venv)], base)
    _check([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], base)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    yield Installed(sdist, wheel, venv, elsewhere)


def test_distributions_hold_the_product(installed: Installed) -> None:
    """The wheel holds the package, its page over noVNC's core and the plugin file, but no
    __init__.py under twisted/ (it would hide Twisted's own plugins) and no tests; the sdist
    is the whole project (the wheel was built from it), tests and docs included."""
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for needed in ("vncmux/tap.py", "vncmux/pages/core.html", "twisted/plugins/vncmux_plugin.py"):
        assert needed in names
    assert not [n for n in names if n.startswith("twisted/") and n.endswith("__init__.py")]
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    assert "vncmux/testing.py" not in names  # test scaffolding stays in tests/
    with tarfile.open(installed.sdist) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {
        "setup.py", "Makefile", "README.md", "vncmux/pages/core.html", "docs/quickstart.md",
        "etc/tokens", "scripts/demo.py", "tests/support.py", "tests/e2e/pages/classic_core.html",
    } <= members  # fmt: skip
    assert not [name for name in members if "__pycache__" in name or "node_modules" in name]


def test_installed_commands(installed: Installed) -> None:
    """The installed vncmux is the wheel's (not the source tree's), and `twistd vncmux
    --help` and `vncmux token --help` work from anywhere."""
    where = installed.run(installed.bin("python"), "-c", "import vncmux; print(vncmux.__file__)")
    assert where.stdout.strip().startswith(str(installed.venv)), where
    twistd = installed.run(installed.bin("twistd"), "vncmux", "--help")
    assert twistd.returncode == 0, twistd.stderr
    assert "relays noVNC WebSocket sessions" in twistd.stdout
    cli = installed.run(installed.bin("vncmux"), "token", "--help")
    assert cli.returncode == 0, cli.stderr
    assert "issue a token" in cli.stdout


def test_stale_plugin_cache_is_harmless(installed: Installed) -> None:
    """A dropin.cache written before vncmux's plugin file was there (Twisted installed
    first) does not hide it: twistd finds vncmux and rewrites the cache, and Twisted's
    rebuild command leaves a cache that names it."""
    plugin = installed.plugins / "vncmux_plugin.py"
    away = installed.elsewhere / "vncmux_plugin.py"
    cache = installed.plugins / "dropin.cache"
    plugin.rename(away)
    try:
        installed.run(installed.bin("python"), "-c", REBUILD_PLUGIN_CACHE)
        assert b"vncmux_plugin" not in cache.read_bytes()
    finally:
        away.rename(plugin)
    listed = installed.run(installed.bin("twistd"), "--help")
    assert "vncmux" in listed.stdout, listed
    assert b"vncmux_plugin" in cache.read_bytes()
    rebuilt = installed.run(installed.bin("python"), "-c", REBUILD_PLUGIN_CACHE)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert b"vncmux_plugin" in cache.read_bytes()


def test_installed_proxy_relays(installed: Installed) -> None:
    """The installed `twistd -n vncmux` relays a session: the VNC server's greeting reaches
    the WebSocket client, and bytes go through both ways."""
    vnc = socket.create_server((LOOPBACK, 0))
    vnc.settimeout(WAIT)
    tokens = installed.elsewhere / "tokens"
    tokens.write_text(f"packaged: {LOOPBACK}:{vnc.getsockname()[1]}\n")
    listener = loopback_listener()
    proxy = spawn_with_listener(
        [installed.bin("twistd"), "-n", "--pidfile=", "vncmux",
         "--listen", SYSTEMD_LISTEN_ENDPOINT, "--tokens", f"file:{tokens}",
         "--metrics", "none", "--web", "none"],
        listener,
        env=_clean_env(),
        cwd=installed.elsewhere,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    port = port_of(listener)
    listener.close()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=WAIT) as client:
            client.sendall(upgrade_request(port, "/websockify?token=packaged"))
            backend, _ = vnc.accept()
            with backend:
                backend.settimeout(WAIT)
                backend.sendall(GREETING)
                greeted = read_until(client, has_payload(len(GREETING)))
                assert split_upgrade(greeted)[1] == GREETING
                client.sendall(frame(b"ping"))
                assert read_until(backend, lambda data: len(data) >= 4) == b"ping"
                backend.sendall(b"pong")
                whole = has_payload(len(GREETING) + 4)
                greeted += read_until(client, lambda more: whole(greeted + more))
                assert split_upgrade(greeted)[1] == GREETING + b"pong"
    finally:
        vnc.close()
        stop_process(proxy)
