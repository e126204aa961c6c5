"""The twistd plugin, its options and config file, and the wiring of the services."""

from __future__ import annotations

import gc
import ipaddress
import os

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from tests.redis_server import make_tls_files
from vncmux import tap
from vncmux.firstrun import StartupHints
from vncmux.fleet import FleetInstance, FleetLimits
from vncmux.hangup import ReloadOnHangup
from vncmux.service import Listener, ProxyService
from vncmux.settings import Limits
from vncmux.supervisor import Supervisor
from vncmux.tap import Options, build_service
from vncmux.tokens import RedisTokenStore
from vncmux.web import WebRoot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class PluginTests(SynchronousTestCase):
    """twistd finds the plugin without importing the server."""

    def test_found(self) -> None:
        """getPlugins(IServiceMaker) lists vncmux, pointing at vncmux.tap."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("vncmux", makers)
        self.assertIs(makers["vncmux"].options, Options)


class TwistdEntryTests(SynchronousTestCase):
    """twistd's entry point, which may tune the whole process (build_service does not)."""

    def test_start_up_objects_frozen(self) -> None:
        """What start-up built, the service included, leaves the garbage collector's
        generations, so that full collections no longer walk it between sessions."""
        self.patch(tap, "tune_process", lambda max_sessions: None)
        self.addCleanup(gc.unfreeze)
        service = tap.makeService(
            parse("--listen", "tcp:0", "--metrics", "none", "--web", "none",
                  "--tokens", f"file:{ROOT}/etc/tokens")
        )  # fmt: skip
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertFalse(any(o is service for o in gc.get_objects()))
        gc.unfreeze()
        self.assertTrue(any(o is service for o in gc.get_objects()))


class OptionsTests(SynchronousTestCase):
    """Command-line options and their defaults."""

    def test_defaults(self) -> None:
        """The defaults are the embedded ones: local listener, example token file."""
        settings = parse().settings()
        self.assertEqual(settings.listen, "tcp:6080:interface=127.0.0.1")
        self.assertEqual(settings.tokens, "file:etc/tokens")
        self.assertEqual(settings.metrics, "tcp:9108:interface=127.0.0.1")
        self.assertIsNone(settings.web)
        self.assertEqual(
            settings.limits,
            Limits(max_sessions=10000, max_sessions_per_token=10, max_sessions_per_client=100),
        )
        self.assertEqual(settings.idle_activity, "input")
        self.assertEqual((settings.max_failed_tokens, settings.tls_min_version), (20, "1.2"))

    def test_longdesc_in_help(self) -> None:
        """--help explains what the proxy does."""
        self.assertIn("relays noVNC WebSocket sessions", str(Options()))

    def test_values(self) -> None:
        """Options are coerced and land in the settings."""
        settings = parse(
            "--listen",
            "tcp:7000",
            "--idle-timeout",
            "60",
            "--max-sessions",
            "5",
            "--enforce-expiry",
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin",
            "https://b.example",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--metrics",
            "none",
            "--idle-activity",
            "any",
            "--allowed-backend",
            "10.0.0.0/8",
            "--allowed-backend",
            "fd00::1",
        ).settings()
        self.assertEqual(settings.listen, "tcp:7000")
        self.assertEqual(settings.limits.idle_timeout, 60.0)
        self.assertEqual(settings.limits.max_sessions, 5)
        self.assertTrue(settings.limits.enforce_expiry)
        self.assertEqual(settings.allowed_origins, ("https://a.example", "https://b.example"))
        self.assertEqual([str(n) for n in settings.trusted_proxies], ["10.0.0.0/8"])
        self.assertIsNone(settings.metrics)
        self.assertEqual(settings.idle_activity, "any")
        self.assertEqual([str(n) for n in settings.allowed_backends], ["10.0.0.0/8", "fd00::1/128"])
        self.assertEqual(parse().settings().allowed_backends, ())

    def test_bad_values(self) -> None:
        """Bad values are usage errors that name the option."""
        for args in (
            ["--idle-timeout", "-1"],
            ["--max-sessions", "many"],
            ["--trusted-proxy", "10.0.0.0/99"],
            ["--idle-activity", "sometimes"],
            ["--connect-timeout", "0"],
            ["--allowed-backend", "10.0.0.0/33"],
            ["--base-url", "javascript:alert(1)//"],
            ["--base-url", "data:text/html,x"],
            ["--base-url", "/vnc.html"],
            ["--tls-min-version", "1.1"],
            ["--auth-schemes", "vencrypt,ra2"],
            ["--auth-schemes", ","],
        ):
            with self.subTest(args=args):
                self.assertRaises(UsageError, parse, *args)


class ConfigFileTests(SynchronousTestCase):
    """--config FILE: an INI [vncmux] section; the command line wins."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_file_values(self) -> None:
        """Values, flags and repeatable options come from the file."""
        path = self.write(
            "[vncmux]\nlisten = tcp:7001\nidle_timeout = 99\nenforce_expiry = yes\n"
            "allowed_origin = https://a.example https://b.example\n"
        )
        settings = parse("--config", path).settings()
        self.assertEqual(settings.listen, "tcp:7001")
        self.assertEqual(settings.limits.idle_timeout, 99.0)
        self.assertTrue(settings.limits.enforce_expiry)
        self.assertEqual(settings.allowed_origins, ("https://a.example", "https://b.example"))

    def test_command_line_wins(self) -> None:
        """An option given on the command line overrides the file."""
        path = self.write("[vncmux]\nlisten = tcp:7001\nmax_sessions = 3\n")
        settings = parse("--listen=tcp:7002", "--config", path).settings()
        self.assertEqual(settings.listen, "tcp:7002")
        self.assertEqual(settings.limits.max_sessions, 3)

    def test_unknown_option(self) -> None:
        """A misspelt option in the file is an error, not silently ignored."""
        path = self.write("[vncmux]\nidle_timout = 5\n")
        e = self.assertRaises(UsageError, parse, "--config", path)
        self.assertIn("idle_timout", str(e))

    def test_missing_file(self) -> None:
        """A missing file is a usage error naming it."""
        self.assertRaises(UsageError, parse, "--config", "/nonexistent/vncmux.ini")

    def test_percent_is_literal(self) -> None:
        """A ``%`` in a value (a percent-encoded Redis password) is taken as written."""
        path = self.write("[vncmux]\ntokens = redis://:p%40ss@127.0.0.1/0\n")
        self.assertEqual(parse("--config", path).settings().tokens, "redis://:p%40ss@127.0.0.1/0")

    def test_bad_files_are_usage_errors(self) -> None:
        """Every kind of unusable file is a UsageError naming the file and never quoting a
        line (lines hold passwords), not a configparser or decoding traceback."""
        for text in [
            b"tokens = redis://:hunter2@h/0\n",  # no section header
            b"[vncmux]\ntokens = redis://:hunter2@h/0\ntokens = x\n",  # given twice
            b"[vncmux]\nhunter2\n",  # not name = value
            b"[vncmux]\n[vncmux]\n",
            b"[other]\ntokens = redis://:hunter2@h/0\n",
            b"[vncmux]\ntokens = \xff\xfehunter2\n",
            b"[vncmux]\nenforce_expiry = hunter2\n",
        ]:
            with self.subTest(text=text):
                path = self.mktemp()
                with open(path, "wb") as f:
                    f.write(text)
                e = self.assertRaises(UsageError, parse, "--config", path)
                self.assertIn(path, str(e))
                self.assertNotIn("hunter2", str(e))
        directory = self.mktemp()
        os.mkdir(directory)
        self.assertIn(directory, str(self.assertRaises(UsageError, parse, "--config", directory)))


class MakeServiceTests(SynchronousTestCase):
    """build_service wires the parts without touching the network."""

    def test_children(self) -> None:
        """A ProxyService holding the console listener and the supervisor."""
        tokens = self.mktemp()
        with open(tokens, "w") as f:
            f.write("demo: 127.0.0.1:5900\n")
        reactor = MemoryReactorClock()
        options = parse("--tokens", f"file:{tokens}", "--listen", "tcp:6999")
        service = build_service(options, reactor)
        self.assertIsInstance(service, ProxyService)
        kinds = {type(child) for child in service}
        self.assertEqual(kinds, {Listener, Supervisor, ReloadOnHangup, StartupHints})
        service.startService()
        self.assertEqual(reactor.tcpServers[0][0], 6999)
        self.successResultOf(service.listener.listening())
        self.assertTrue(service.accepting)
        stopping = service.stopService()
        self.successResultOf(stopping)
        self.assertFalse(service.accepting)

    def test_fleet_with_redis(self) -> None:
        """With a Redis store the proxy joins the fleet: the registry is a service stopped
        before the store (it deletes its keys through it), a session observer, and a shared
        limit of the supervisor at --max-sessions-per-token; --fleet-heartbeat 0 leaves it
        out. Nothing is started, so nothing connects."""
        redis = ("--tokens", "redis://127.0.0.1:1/0", "--max-sessions-per-token", "3")
        service = build_service(parse(*redis, "--fleet-heartbeat", "2"), MemoryReactorClock())
        children = list(service)
        (fleet,) = [child for child in children if isinstance(child, FleetInstance)]
        (store,) = [child for child in children if isinstance(child, RedisTokenStore)]
        self.assertGreater(children.index(fleet), children.index(store))
        self.assertEqual(fleet.heartbeat, 2.0)
        (limits,) = service.console.supervisor.shared_limits
        self.assertIsInstance(limits, FleetLimits)
        self.assertEqual(limits._max_sessions_per_token, 3)
        self.assertIn(fleet, service.console.observers._observers)
        off = build_service(parse(*redis, "--fleet-heartbeat", "0"), MemoryReactorClock())
        self.assertFalse([child for child in off if isinstance(child, FleetInstance)])
        self.assertEqual(off.console.supervisor.shared_limits, ())

    def test_serial_listener(self) -> None:
        """--serial-listen adds a second console listener serving console type 'serial'
        (same TLS floor); the proxy is ready only once both listen, and stopping it stops
        both."""
        tokens = self.mktemp()
        open(tokens, "w").close()
        reactor = MemoryReactorClock()
        options = parse(
            "--tokens", f"file:{tokens}", "--listen", "tcp:6999", "--serial-listen", "tcp:6983",
            "--tls-min-version", "1.3",
        )  # fmt: skip
        service = build_service(options, reactor)
        self.assertEqual(sorted(service.listeners), ["novnc", "serial"])
        serial = service.listeners["serial"]
        self.assertEqual(serial.tls_min_version, "1.3")
        service.listeners["novnc"].startService()
        self.assertFalse(service.accepting)
        serial.startService()
        self.assertTrue(service.accepting)
        self.assertEqual(sorted(port for port, *_ in reactor.tcpServers), [6983, 6999])
        self.assertEqual(
            [factory.kind.console_type for _, factory, *_ in reactor.tcpServers],
            ["novnc", "serial"],
        )
        self.successResultOf(service.stopService())
        self.assertEqual([listener.port for listener in service.listeners.values()], [None, None])

    def test_spice_listener(self) -> None:
        """--spice-listen adds the SPICE HTML5 listener: console type 'spice-html5', serving
        the --spice-web directory (spice-html5's pages) while noVNC's listener serves --web;
        the default stays off ('none' too)."""
        tokens = self.mktemp()
        open(tokens, "w").close()
        reactor = MemoryReactorClock()
        novnc, spice = (os.path.abspath(self.mktemp()) for _ in range(2))
        for directory in (novnc, spice):
            os.makedirs(directory)
        options = parse(
            "--tokens", f"file:{tokens}", "--listen", "tcp:6999", "--spice-listen", "tcp:6982",
            "--web", novnc, "--spice-web", spice,
        )  # fmt: skip
        service = build_service(options, reactor)
        self.assertEqual(sorted(service.listeners), ["novnc", "spice-html5"])
        service.startService()
        factories = {port: factory for port, factory, *_ in reactor.tcpServers}
        self.assertEqual(factories[6982].kind.console_type, "spice-html5")
        roots = {port: factories[port].web.resource for port in (6982, 6999)}
        self.assertIsInstance(roots[6982], WebRoot)
        self.assertEqual([roots[6982].path, roots[6999].path], [spice, novnc])
        self.successResultOf(service.stopService())
        for off in ((), ("--spice-listen", "none")):
            options = parse("--tokens", f"file:{tokens}", *off)
            self.assertEqual(options.settings().listeners, (("novnc", options["listen"]),))

    def test_hangup_reloads_tls(self) -> None:
        """The SIGHUP service reloads the ssl: listener's certificate (the console listener
        and the metrics port); --tls-min-version reaches both listeners."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "new"))
        files = make_tls_files(directory)
        tokens = os.path.join(directory, "tokens")
        open(tokens, "w").close()
        tls = f"privateKey={files['key']}:certKey={files['cert']}"
        options = parse("--tokens", f"file:{tokens}", "--listen", f"ssl:6443:{tls}",
                        "--metrics", f"ssl:9443:{tls}", "--tls-min-version", "1.3")  # fmt: skip
        service = build_service(options, MemoryReactorClock())
        service.startService()
        self.addCleanup(service.stopService)
        listeners = [child for child in service if isinstance(child, Listener)]
        self.assertEqual(len(listeners), 2)
        before = [listener.tls.loaded.certificate for listener in listeners]  # type: ignore[union-attr]
        self.assertEqual({listener.tls_min_version for listener in listeners}, {"1.3"})
        new = make_tls_files(os.path.join(directory, "new"))
        os.replace(new["cert"], files["cert"])
        os.replace(new["key"], files["key"])
        (hangup,) = [child for child in service if isinstance(child, ReloadOnHangup)]
        hangup.reload()
        after = [listener.tls.loaded.certificate for listener in listeners]  # type: ignore[union-attr]
        for old, current in zip(before, after, strict=True):
            self.assertNotEqual(old.serial_number, current.serial_number)

    def test_security_proxy_options(self) -> None:
        """--auth-schemes is a list (case and repeats folded); the VeNCrypt files reach the
        settings; an unreadable CA bundle or a certificate without its key is a usage error."""
        settings = parse("--auth-schemes", "VeNCrypt, none,vencrypt").settings()
        self.assertEqual(settings.auth_schemes, ("vencrypt", "none"))
        self.assertEqual(parse().settings().auth_schemes, ("none",))
        tokens = self.mktemp()
        with open(tokens, "w") as f:
            f.write("demo: 127.0.0.1:5900\n")
        for args in (
            ["--vencrypt-ca-certs", "/nonexistent/ca.pem"],
            ["--vencrypt-ca-certs", tokens, "--vencrypt-client-cert", tokens],
            ["--vencrypt-ca-certs", tokens],  # not PEM
        ):
            with self.subTest(args=args):
                error = self.assertRaises(
                    UsageError,
                    build_service,
                    parse("--tokens", f"file:{tokens}", "--listen", "tcp:0", *args),
                    MemoryReactorClock(),
                )
                self.assertIn("--vencrypt-*", str(error))

    def test_bad_token_source(self) -> None:
        """An unknown --tokens scheme is a usage error."""
        self.assertRaises(
            UsageError, build_service, parse("--tokens", "ldap://x"), MemoryReactorClock()
        )


class SecureDefaultsTests(SynchronousTestCase):
    """The shipped systemd socket does not expose the plain-text console port."""

    def test_socket_unit_binds_loopback(self) -> None:
        """Every ListenStream of etc/vncmux.socket is a loopback address."""
        with open(os.path.join(ROOT, "etc", "vncmux.socket")) as f:
            streams = [
                line.split("=", 1)[1].strip() for line in f if line.startswith("ListenStream=")
            ]
        self.assertTrue(streams)
        for stream in streams:
            host = stream.rpartition(":")[0].strip("[]")
            self.assertTrue(ipaddress.ip_address(host).is_loopback, stream)
