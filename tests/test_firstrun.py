"""A first run: the noVNC found without --web, and the start-up lines naming what to open."""

from __future__ import annotations

import os

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from vncmux.firstrun import NovncPlace, choose_web, token_command
from vncmux.tap import Options, build_service


def novnc_dir(base: str, name: str, *files: str) -> str:
    """A directory holding empty C{files} (paths relative to it)."""
    path = os.path.join(base, name)
    for file in files:
        os.makedirs(os.path.dirname(os.path.join(path, file)), exist_ok=True)
        open(os.path.join(path, file), "w").close()
    return path


class ChooseWebTests(SynchronousTestCase):
    """What the console listener serves for each --web, and the reason logged for it."""

    def setUp(self) -> None:
        base = self.mktemp()
        self.debian = novnc_dir(base, "debian", "vnc.html", "vnc_lite.html", "core/rfb.js")
        self.npm = novnc_dir(base, "npm", "core/rfb.js", "vendor/pako/lib/zlib/inflate.js")
        self.empty = novnc_dir(base, "empty", "README")
        self.places = [
            NovncPlace(os.path.join(base, "missing"), "nothing"),
            NovncPlace(self.npm, "the npm package"),
            NovncPlace(self.debian, "Debian's novnc"),
        ]

    def test_first_place_holding_novnc(self) -> None:
        """Without --web the first place with noVNC's page or core wins, and the log says
        which one, that it is the core under vncmux's page, and how to choose another."""
        chosen = choose_web(None, True, self.places)
        self.assertEqual(chosen.path, self.npm)
        self.assertIn(f"the npm package from {self.npm} under vncmux's own page", chosen.why)
        self.assertIn("--web DIR serves another directory, --web none serves nothing", chosen.why)
        debian = choose_web(None, True, [self.places[0], self.places[2]])
        self.assertEqual(debian.path, self.debian)
        self.assertNotIn("own page", debian.why)

    def test_nothing_found(self) -> None:
        """With noVNC nowhere, nothing is served and the log names where it looked and what
        to install."""
        chosen = choose_web(None, True, [NovncPlace(self.empty, "x")])
        self.assertIsNone(chosen.path)
        self.assertIn(self.empty, chosen.why)
        self.assertIn("apt-get install novnc", chosen.why)
        self.assertIn("npm install @novnc/novnc", chosen.why)

    def test_explicit_web_wins_and_none_serves_nothing(self) -> None:
        """--web DIR is served as given, even where a place holds noVNC; --web none serves
        nothing without looking."""
        self.assertEqual(choose_web(self.empty, False, self.places).path, self.empty)
        nothing = choose_web(None, False, self.places)
        self.assertIsNone(nothing.path)
        self.assertIn("--web none", nothing.why)


class TokenCommandTests(SynchronousTestCase):
    """The command logged at start adds a token to the store this proxy reads."""

    def test_token_file(self) -> None:
        """A token file is named as given; a page other than the default is passed along."""
        command = token_command("file:/tmp/t", "http://127.0.0.1:7000/vnc_lite.html")
        assert command is not None
        self.assertIn("token add --tokens file:/tmp/t --host HOST --port PORT", command)
        self.assertTrue(command.endswith("--base-url http://127.0.0.1:7000/vnc_lite.html"))
        self.assertNotIn("--base-url", token_command("file:/tmp/t", None) or "")

    def test_redis_password_never_shown(self) -> None:
        """A Redis URL's password is replaced by *** (the line says so) and a Sentinel
        password left out; a URL without secrets is given as it is."""
        command = token_command("redis://:s3cret@127.0.0.1:6379/0", None) or ""
        self.assertNotIn("s3cret", command)
        self.assertIn("--tokens redis://:***@127.0.0.1:6379/0 --host", command)
        self.assertTrue(command.endswith("(*** is the store's password)"))
        sentinel = "redis+sentinel://127.0.0.1:26379/main?sentinel_password=t0psecret"
        self.assertNotIn("t0psecret", token_command(sentinel, None) or "")
        plain = token_command("redis://127.0.0.1:6379/2?format=websockify", None) or ""
        self.assertIn("--tokens redis://127.0.0.1:6379/2?format=websockify --host", plain)

    def test_nova_issues_its_own(self) -> None:
        """With nova's database there is no command: nova issues the tokens."""
        self.assertIsNone(token_command("nova:mysql+pymysql://nova@db/nova", None))


class StartupLogTests(SynchronousTestCase):
    """build_service picks the web root and, once listening, logs what to open."""

    def start(self, *args: str, places: list[NovncPlace] | None = None) -> list[str]:
        """Start the service from C{args} on a memory reactor; the lines it logged."""
        tokens = os.path.abspath(self.mktemp())
        open(tokens, "w").close()
        options = Options()
        if places is not None:
            options.novnc_places = places
        options.parseOptions(["--tokens", f"file:{tokens}", *args])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = build_service(options, MemoryReactorClock())
        service.startService()
        self.addCleanup(service.stopService)
        self.web = service.settings.web
        return [e["log_format"].format(**e) for e in events if "firstrun" in e["log_namespace"]]

    def test_found_novnc_and_urls(self) -> None:
        """On the defaults (but the listeners' ports): the noVNC served, the console and
        metrics URLs, the page URL, and the token command with this proxy's store and page."""
        npm = novnc_dir(self.mktemp(), "npm", "core/rfb.js")
        lines = self.start(
            "--listen", "tcp:7080:interface=127.0.0.1", "--metrics", "tcp:7108",
            places=[NovncPlace(npm, "the npm package")],
        )  # fmt: skip
        self.assertEqual(self.web, npm)
        self.assertIn(f"the npm package from {npm}", lines[0])
        self.assertEqual(
            lines[1:4],
            [
                "console listener: http://127.0.0.1:7080/ "
                "(WebSocket ws://127.0.0.1:7080/websockify?token=TOKEN)",
                "metrics: http://127.0.0.1:7108/metrics",
                "noVNC page: http://127.0.0.1:7080/vnc_lite.html?path=websockify%3Ftoken%3DTOKEN",
            ],
        )
        self.assertIn("token add --tokens file:", lines[4])
        self.assertTrue(lines[4].endswith("--base-url http://127.0.0.1:7080/vnc_lite.html"))

    def test_explicit_web_wins(self) -> None:
        """--web DIR is served even when a place holds noVNC."""
        npm = novnc_dir(self.mktemp(), "npm", "core/rfb.js")
        mine = novnc_dir(self.mktemp(), "mine", "index.html")
        lines = self.start("--web", mine, "--metrics", "none", places=[NovncPlace(npm, "npm")])
        self.assertEqual(self.web, mine)
        self.assertEqual(lines[0], f"noVNC: serving --web {mine}")
        self.assertFalse([line for line in lines if line.startswith("metrics")])

    def test_web_none(self) -> None:
        """--web none serves nothing though noVNC is there, and logs no page URL; the
        default listener needs no --base-url in the token command."""
        npm = novnc_dir(self.mktemp(), "npm", "core/rfb.js")
        lines = self.start("--web", "none", places=[NovncPlace(npm, "npm")])
        self.assertIsNone(self.web)
        self.assertIn("--web none", lines[0])
        self.assertFalse([line for line in lines if line.startswith("noVNC page")])
        self.assertNotIn("--base-url", lines[-1])
