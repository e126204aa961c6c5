"""``vncmux token add|show|revoke`` against a token file and against a real Redis."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import ResolvingClock
from tests.redis_server import start_redis
from vncmux.cli import NO_REVOCATION_CHANNEL, parse_arguments, run
from vncmux.issuing import DEFAULT_BASE_URL
from vncmux.tokens import FileTokenStore, hash_token, token_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = re.compile(r"^url: (?P<url>\S+)$", re.M)
TOKEN_LINE = re.compile(r"^token: (?P<token>\S+)$", re.M)


def _token(out: str) -> str:
    match = TOKEN_LINE.search(out)
    assert match, out
    return match["token"]


class DashTokenTests(SynchronousTestCase):
    """Tokens from elsewhere may start with '-' (vncmux's own never do)."""

    def test_show_token_starting_with_dash(self) -> None:
        """A token that starts with '-' (from elsewhere) can still be named after ``--``."""
        options = parse_arguments(["token", "show", "--tokens", "file:x", "--", "-abc"])
        self.assertEqual(options.token, "-abc")


class UsageTests(SynchronousTestCase):
    """Usage errors exit with status 2 before anything is touched."""

    def assertUsageError(self, *argv: str) -> None:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            exit = self.assertRaises(SystemExit, parse_arguments, list(argv))
        self.assertEqual(exit.code, 2, err.getvalue())
        self.assertIn("usage:", err.getvalue())

    def test_bracketed_host(self) -> None:
        """A bracketed IPv6 --host loses its brackets (they come back in the target)."""
        options = parse_arguments(["token", "add", "--host", "[fd00::9]", "--port", "5909"])
        self.assertEqual((options.host, options.port), ("fd00::9", 5909))

    def test_usage_errors(self) -> None:
        """Missing or malformed arguments are usage errors."""
        self.assertUsageError()
        self.assertUsageError("token")
        self.assertUsageError("token", "add", "--port", "5900")
        self.assertUsageError("token", "add", "--host", "h", "--port", "0")
        self.assertUsageError("token", "add", "--host", "h", "--port", "x")
        self.assertUsageError("token", "add", "--host", "a b", "--port", "1")
        for host in ["[fd00::1", "fd00::1]", "h]", "[[fd00::1]]", "[h]", ""]:
            with self.subTest(host=host):
                self.assertUsageError("token", "add", "--host", host, "--port", "1")
        self.assertUsageError("token", "add", "--host", "h", "--port", "1", "--instance", "a b")
        self.assertUsageError("token", "add", "--host", "h", "--port", "1", "--instance", "")
        self.assertUsageError("token", "revoke", "--instance", "a b")
        self.assertUsageError("token", "add", "--host", "h", "--port", "1", "--ttl", "-5")
        self.assertUsageError("token", "add", "--host", "h", "--port", "1", "--max-sessions", "0")
        self.assertUsageError("token", "revoke")
        self.assertUsageError("token", "revoke", "t", "--instance", "i")
        self.assertUsageError("token", "show")
        self.assertUsageError("token", "add", "--host", "h", "--port", "1",
                              "--base-url", "javascript:alert(1)//")  # fmt: skip
        self.assertUsageError("token", "add", "--host", "h", "--port", "1", "--base-url", "/x")
        self.assertUsageError("token", "add", "--host", "h", "--port", "1",
                              "--allowed-backend", "10.0.0.0/33")  # fmt: skip


class CliFileStoreTests(SynchronousTestCase):
    """The CLI on a token file (synchronous: a file store answers at once)."""

    def setUp(self) -> None:
        self.clock = ResolvingClock({"h": ["10.0.0.1"], "metadata.example": ["169.254.169.254"]})
        self.clock.advance(1_700_000_000)
        self.path = self.mktemp()
        with open(self.path, "w") as f:
            f.write("# tokens\n")
        self.source = f"file:{self.path}"

    def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = self.successResultOf(run(list(argv), self.clock, out, err))
        return code, out.getvalue(), err.getvalue()

    def test_add_show_revoke(self) -> None:
        """add prints a token and its URL; show finds it; revoke removes it; show then fails."""
        code, out, err = self.cli("token", "add", "--host", "fd00::9", "--port", "5909",
                                  "--tokens", self.source)  # fmt: skip
        self.assertEqual((code, err), (0, ""))
        token = _token(out)
        self.assertEqual(len(token), 43)
        url = URL.search(out)["url"]  # type: ignore[index]
        self.assertEqual(
            url, f"http://127.0.0.1:6080/vnc_lite.html?path=websockify%3Ftoken%3D{token}"
        )
        self.assertIn(f"token_id: {hash_token(token)[:12]}", out)
        with open(self.path) as f:
            self.assertIn(f"{token}: [fd00::9]:5909\n", f.read())

        code, out, err = self.cli("token", "show", token, "--tokens", self.source)
        self.assertEqual(code, 0, err)
        shown = json.loads(out)
        self.assertEqual(shown["token_id"], hash_token(token)[:12])
        self.assertEqual((shown["host"], shown["port"]), ("fd00::9", 5909))
        self.assertNotIn("password", shown)
        self.assertNotIn(token, out)

        code, out, err = self.cli("token", "revoke", token, "--tokens", self.source)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"revoked token {hash_token(token)[:12]}\n{NO_REVOCATION_CHANNEL}\n")
        self.assertIn("sessions already open", NO_REVOCATION_CHANNEL)
        code, out, err = self.cli("token", "show", token, "--tokens", self.source)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("not found", err)
        self.assertEqual(self.cli("token", "revoke", token, "--tokens", self.source)[0], 1)

    def test_base_url(self) -> None:
        """--base-url replaces the page of the access URL."""
        base = "https://c.example/vnc.html"
        code, out, _ = self.cli(
            "token",
            "add",
            "--host",
            "h",
            "--port",
            "1",
            "--tokens",
            self.source,
            "--base-url",
            base,
        )
        self.assertEqual(code, 0)
        self.assertIn(
            f"url: https://c.example/vnc.html?path=websockify%3Ftoken%3D{_token(out)}\n", out
        )

    def test_file_store_limits(self) -> None:
        """A token file refuses what it cannot keep, with exit code 1 and a clear message."""
        code, out, err = self.cli("token", "add", "--host", "h", "--port", "1", "--ttl", "60",
                                  "--tokens", self.source)  # fmt: skip
        self.assertEqual((code, out), (1, ""))
        self.assertIn("redis://", err)
        code, out, err = self.cli("token", "add", "--host", "h", "--port", "1",
                                  "--console-type", "serial", "--tokens", self.source)  # fmt: skip
        self.assertEqual((code, out), (1, ""))
        self.assertIn("console_type", err)
        code, _, err = self.cli("token", "revoke", "--instance", "i-1", "--tokens", self.source)
        self.assertEqual(code, 1)
        self.assertIn("no instances", err)

    def test_bad_source(self) -> None:
        """An unknown --tokens value is a usage error (2) that does not echo credentials."""
        code, _, err = self.cli("token", "show", "t", "--tokens", "mysql://u:hunter2@h/db")
        self.assertEqual(code, 2)
        self.assertIn("file:PATH", err)
        self.assertNotIn("hunter2", err)

    def test_missing_file(self) -> None:
        """show on a missing token file fails with 1 and names the file."""
        missing = self.mktemp()
        code, _, err = self.cli("token", "show", "t", "--tokens", f"file:{missing}")
        self.assertEqual(code, 1)
        self.assertIn(missing, err)

    def test_config_file(self) -> None:
        """``tokens =`` in the [vncmux] section of --config is used; --tokens beats it."""
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f"[vncmux]\ntokens = {self.source}\n")
        code, out, _ = self.cli("token", "add", "--host", "h", "--port", "2", "--config", config)
        self.assertEqual(code, 0)
        with open(self.path) as f:
            self.assertIn(f"{_token(out)}: h:2", f.read())
        other = self.mktemp()
        code, _, _ = self.cli("token", "add", "--host", "h", "--port", "3", "--config", config,
                              "--tokens", f"file:{other}")  # fmt: skip
        self.assertEqual(code, 0)
        self.assertTrue(os.path.exists(other))
        code, _, err = self.cli("token", "show", "t", "--config", self.mktemp())
        self.assertEqual(code, 2)
        self.assertIn("config file", err)

    def test_config_file_as_twistd_reads_it(self) -> None:
        """The CLI reads --config with the proxy's reader: ``%`` is literal and a broken file
        is a usage error (2) that quotes no line."""
        tokens = self.mktemp() + "-100%"
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f"[vncmux]\ntokens = file:{tokens}\n")
        code, out, err = self.cli("token", "add", "--host", "h", "--port", "2", "--config", config)
        self.assertEqual(code, 0, err)
        with open(tokens) as f:
            self.assertIn(f"{_token(out)}: h:2", f.read())
        broken = self.mktemp()
        with open(broken, "w") as f:
            f.write("tokens = redis://:hunter2@h/0\n")
        code, _, err = self.cli("token", "show", "t", "--config", broken)
        self.assertEqual(code, 2)
        self.assertIn(broken, err)
        self.assertNotIn("hunter2", err)

    def test_links_and_loose_modes(self) -> None:
        """add refuses a planted token-file link with a clear error (exit 1) and warns about
        a group-writable token file."""
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory, 0o755)
        victim = os.path.join(directory, "victim")
        link = os.path.join(directory, "tokens")
        os.symlink(victim, link)
        code, out, err = self.cli("token", "add", "--host", "h", "--port", "2",
                                  "--tokens", f"file:{link}")  # fmt: skip
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"{link} is a symbolic link", err)
        self.assertFalse(os.path.exists(victim))
        os.chmod(self.path, 0o666)
        code, _, err = self.cli("token", "add", "--host", "h", "--port", "2",
                                "--tokens", self.source)  # fmt: skip
        self.assertEqual(code, 0)
        self.assertIn(f"{os.path.abspath(self.path)} is writable by group and others", err)

    def test_backend_policy(self) -> None:
        """add refuses what the proxy would refuse (exit 1, nothing written): link-local
        addresses by default, and with --allowed-backend (or the config file's
        allowed_backend) anything outside it; an explicit entry allows metadata addresses."""
        for args, why in [
            (["--host", "169.254.169.254", "--port", "80"], "link-local"),
            (["--host", "metadata.example", "--port", "80"], "link-local"),
            (["--host", "192.0.2.1", "--port", "1", "--allowed-backend", "10.0.0.0/8"],
             "outside --allowed-backend"),
        ]:  # fmt: skip
            code, out, err = self.cli("token", "add", *args, "--tokens", self.source)
            self.assertEqual((code, out), (1, ""), args)
            self.assertIn(f"backend not allowed: backend {args[1]}", err)
            self.assertIn(why, err)
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f"[vncmux]\ntokens = {self.source}\nallowed_backend = 10.0.0.0/8 fd00::/8\n")
        code, _, err = self.cli("token", "add", "--host", "192.0.2.1", "--port", "1",
                                "--config", config)  # fmt: skip
        self.assertEqual(code, 1)
        self.assertIn("outside --allowed-backend", err)
        with open(self.path) as f:
            self.assertEqual(f.read(), "# tokens\n")
        self.assertEqual(self.cli("token", "add", "--host", "h", "--port", "1",
                                  "--config", config)[0], 0)  # fmt: skip
        code, _, err = self.cli("token", "add", "--host", "169.254.169.254", "--port", "80",
                                "--allowed-backend", "169.254.169.254/32",
                                "--tokens", self.source)  # fmt: skip
        self.assertEqual(code, 0, err)

    def test_default_source(self) -> None:
        """Without --tokens or --config the store is file:etc/tokens in the current directory."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "etc"))
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        code, out, _ = self.cli("token", "add", "--host", "h", "--port", "4")
        self.assertEqual(code, 0)
        with open(os.path.join(directory, "etc", "tokens")) as f:
            self.assertEqual(f.read(), f"{_token(out)}: h:4\n")

    def test_shipped_example_file(self) -> None:
        """The repository's etc/tokens parses cleanly and opens the demo console."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        store = FileTokenStore(os.path.join(REPO, "etc", "tokens"), self.clock)
        record = self.successResultOf(store.lookup("demo"))
        self.assertEqual(record.target, "127.0.0.1:5900")
        self.assertEqual(len(log), 0)


class ConsoleScriptTests(SynchronousTestCase):
    """``main()`` as a process: the exit codes a shell sees."""

    def vncmux(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vncmux.cli", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )

    def test_exit_codes(self) -> None:
        """0 on success, 1 when not found, 2 on a usage error."""
        source = f"file:{os.path.abspath(self.mktemp())}"
        added = self.vncmux("token", "add", "--host", "h", "--port", "5", "--tokens", source)
        self.assertEqual(added.returncode, 0, added.stderr)
        self.assertIn("url: http://127.0.0.1:6080/vnc_lite.html?path=websockify%3Ftoken%3D",
                      added.stdout)  # fmt: skip
        missing = self.vncmux("token", "show", "nope", "--tokens", source)
        self.assertEqual(missing.returncode, 1)
        self.assertIn("not found", missing.stderr)
        usage = self.vncmux("token", "add", "--port", "5", "--tokens", source)
        self.assertEqual(usage.returncode, 2)


class CliRedisTests(TestCase):
    """The CLI against a real redis-server."""

    timeout = 30

    def setUp(self) -> None:
        self.server = start_redis(self)
        self.redis = self.server.client()
        self.addCleanup(self.redis.close)

    @inlineCallbacks
    def cli(self, *argv: str, source: str | None = None) -> Any:
        out, err = io.StringIO(), io.StringIO()
        source = source or self.server.url()
        code = yield run([*argv, "--tokens", source], reactor, out, err)
        return code, out.getvalue(), err.getvalue()

    @inlineCallbacks
    def test_add_show_revoke(self) -> Any:
        """Every option reaches the record; show never prints the password; revoke works."""
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("hunter2\n")
        code, out, err = yield self.cli(
            "token", "add", "--host", "10.1.2.3", "--port", "5901", "--ttl", "600",
            "--instance", "i-1", "--single-use", "--max-sessions", "2",
            "--password-file", secret, "--console-type", "serial",
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        token = _token(out)
        self.assertEqual(self.redis.hget(token_key(hash_token(token)), "password"), "hunter2")
        self.assertGreater(self.redis.ttl(token_key(hash_token(token))), 600)

        code, out, err = yield self.cli("token", "show", token)
        self.assertEqual(code, 0, err)
        self.assertNotIn("hunter2", out + err)
        shown = json.loads(out)
        self.assertNotIn("password", shown)
        self.assertIs(shown["has_password"], True)
        self.assertEqual(shown["token_id"], hash_token(token)[:12])
        self.assertEqual(shown["expires_at"] - shown["issued_at"], 600)
        self.assertEqual(
            (shown["instance_uuid"], shown["single_use"], shown["max_sessions"]), ("i-1", True, 2)
        )
        self.assertEqual(shown["console_type"], "serial")
        self.assertEqual(shown["access_url"], DEFAULT_BASE_URL)

        code, out, _ = yield self.cli("token", "revoke", token)
        self.assertEqual((code, out), (0, f"revoked token {hash_token(token)[:12]}\n"))
        code, out, err = yield self.cli("token", "show", token)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("not found", err)

    @inlineCallbacks
    def test_add_with_vncpasswd_file(self) -> Any:
        """--password-file takes a file written by TigerVNC's vncpasswd: the record holds
        the password itself (the proxy needs it for VncAuth); show and the output never
        print it."""
        if shutil.which("vncpasswd") is None:
            if os.environ.get("CI"):
                self.fail("vncpasswd (tigervnc-tools) is required under CI")
            self.skipTest("vncpasswd not installed")
        secret = self.mktemp()
        with open(secret, "wb") as f:
            f.write(
                subprocess.run(
                    ["vncpasswd", "-f"], input=b"Tr0ub4dor\n", capture_output=True, check=True
                ).stdout
            )
        code, out, err = yield self.cli(
            "token", "add", "--host", "10.1.2.3", "--port", "5901", "--password-file", secret
        )
        self.assertEqual(code, 0, err)
        token = _token(out)
        self.assertEqual(self.redis.hget(token_key(hash_token(token)), "password"), "Tr0ub4do")
        code, out, err = yield self.cli("token", "show", token)
        self.assertNotIn("Tr0ub4do", out + err)
        self.assertIs(json.loads(out)["has_password"], True)

    @inlineCallbacks
    def test_revoke_instance(self) -> Any:
        """revoke --instance revokes every token of the instance, then finds none."""
        for port in ("5901", "5902"):
            code, _, _ = yield self.cli(
                "token", "add", "--host", "h", "--port", port, "--instance", "i-7"
            )
            self.assertEqual(code, 0)
        code, out, _ = yield self.cli("token", "revoke", "--instance", "i-7")
        self.assertEqual((code, out), (0, "revoked 2 token(s)\n"))
        code, _, err = yield self.cli("token", "revoke", "--instance", "i-7")
        self.assertEqual(code, 1)
        self.assertIn("no tokens", err)

    @inlineCallbacks
    def test_redis_down(self) -> Any:
        """With Redis down the CLI gives up after the reply timeout with exit code 1."""
        self.server.stop()
        code, out, err = yield self.cli(
            "token",
            "add",
            "--host",
            "h",
            "--port",
            "1",
            source=self.server.url(query="reply_timeout=0.3"),
        )
        self.assertEqual((code, out), (1, ""))
        self.assertIn("token store unavailable", err)
