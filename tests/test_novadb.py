"""
Nova's token database as a token store (``--tokens nova:URL``) and nova.conf (``--nova-config``).

One lookup contract runs over real MariaDB and PostgreSQL servers (started once per test
session, tests/db_servers.py) and over SQLite, with nova's own table schema; the re-check of
live sessions runs on a task.Clock against the Supervisor, and once end to end on loopback.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactor, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.db_servers import NOVA_PASSWORD, _Server, mariadb, nova_schema, postgresql
from tests.redis_server import free_port
from tests.support import async_test, connect_client, listen_fake_vnc, listen_proxy
from tests.test_supervisor import SupervisorTestCase
from vncmux.events import Observers
from vncmux.handshake import origin_allowed
from vncmux.interfaces import (
    IActivitySink,
    IHashLookup,
    IRevocationFeed,
    ISingleUse,
    ITokenStore,
)
from vncmux.novaconf import read_nova_config
from vncmux.novadb import NovaDatabase, NovaTokenStore
from vncmux.refusals import TOKEN_REVOKED
from vncmux.settings import Limits
from vncmux.supervisor import Supervisor
from vncmux.tap import Options, build_service
from vncmux.tokens import TokenStoreUnavailable, hash_token, open_token_store

TOKEN = "0f1e2d3c-4b5a-4697-8877-665544332211"  # nova's tokens are UUID4s
OTHER = "11111111-2222-4333-8444-555555555555"
INSTANCE = "5a1b2c3d-0000-4000-8000-00000000000a"


def _log_lines(observer: EventLoggingObserver) -> list[str]:
    """Every event as an operator would read it, tracebacks included."""
    lines = []
    for event in observer:
        lines.append(formatEvent(event))
        failure = event.get("log_failure")
        if failure is not None:
            lines.append(failure.getTraceback())
    return lines


# ---------------------------------------------------------------------------------------------
# The URL of nova's [database] connection


class DatabaseUrlTests(SynchronousTestCase):
    """nova's SQLAlchemy URLs become driver arguments; the password never leaks."""

    def test_mysql(self) -> None:
        """nova's usual URL: PyMySQL arguments, bounded waits, a read-only session; devstack's
        SQLAlchemy ``plugin`` option is not passed to the driver."""
        db = NovaDatabase.from_url(
            "mysql+pymysql://nova:p%40ss@db.example:3307/nova_cell1?charset=utf8&plugin=dbcounter"
        )
        self.assertEqual((db.dialect, db.driver), ("mysql", "pymysql"))
        args = db.connect_arguments(2.0)
        self.assertEqual(
            {k: args[k] for k in ("host", "port", "user", "password", "database", "charset")},
            dict(
                host="db.example", port=3307, user="nova", password="p@ss",
                database="nova_cell1", charset="utf8",
            ),
        )  # fmt: skip
        self.assertEqual((args["read_timeout"], args["write_timeout"]), (3.0, 3.0))
        self.assertEqual(args["init_command"], "SET SESSION TRANSACTION READ ONLY")
        self.assertNotIn("plugin", args)

    def test_mysql_variants(self) -> None:
        """``mysql://`` and ``mariadb+…`` use PyMySQL too; the default port is 3306; a unix
        socket and TLS options pass through (``ssl_check_hostname`` is PyMySQL's
        ``ssl_verify_identity``)."""
        for url in ("mysql://nova:pw@db/nova", "mariadb+pymysql://nova:pw@db/nova"):
            args = NovaDatabase.from_url(url).connect_arguments(2.0)
            self.assertEqual((args["host"], args["port"]), ("db", 3306))
        args = NovaDatabase.from_url(
            "mysql+pymysql://nova:pw@/nova?unix_socket=/run/mysqld/mysqld.sock"
            "&ssl_ca=/etc/ssl/ca.pem&ssl_check_hostname=false&read_timeout=7"
        ).connect_arguments(2.0)
        self.assertEqual(args["unix_socket"], "/run/mysqld/mysqld.sock")
        self.assertEqual((args["ssl_ca"], args["ssl_verify_identity"]), ("/etc/ssl/ca.pem", False))
        self.assertEqual(args["read_timeout"], 7.0)

    def test_postgresql(self) -> None:
        """``postgresql+psycopg2://`` uses psycopg 3; libpq options pass through; the session
        is read-only with a statement timeout."""
        db = NovaDatabase.from_url(
            "postgresql+psycopg2://nova:pw@[fd00::5]:5433/nova?sslmode=require"
        )
        self.assertEqual((db.driver, db.host, db.port), ("psycopg", "fd00::5", 5433))
        args = db.connect_arguments(1.5)
        self.assertEqual(
            {k: args[k] for k in ("host", "port", "user", "password", "dbname", "sslmode")},
            dict(host="fd00::5", port=5433, user="nova", password="pw", dbname="nova",
                 sslmode="require"),
        )  # fmt: skip
        self.assertEqual(
            args["options"], "-c default_transaction_read_only=on -c statement_timeout=2500"
        )
        socket_args = NovaDatabase.from_url(
            "postgresql://nova@/nova?host=/var/run/postgresql"
        ).connect_arguments(2.0)
        self.assertEqual(socket_args["host"], "/var/run/postgresql")
        self.assertNotIn("password", socket_args)

    def test_sqlite(self) -> None:
        """Three slashes: a relative path; four: an absolute one; opened read-only."""
        self.assertEqual(NovaDatabase.from_url("sqlite:///nova.sqlite").database, "nova.sqlite")
        db = NovaDatabase.from_url("sqlite:////var/lib/nova/nova.sqlite")
        self.assertEqual(db.database, "/var/lib/nova/nova.sqlite")
        args = db.connect_arguments(2.0)
        self.assertEqual(args["database"], "file:/var/lib/nova/nova.sqlite?mode=ro")
        self.assertTrue(args["uri"])

    def test_redacted(self) -> None:
        """The URL for logs hides the password, also as a ``password=`` option."""
        db = NovaDatabase.from_url("mysql+pymysql://nova:hunter2@db:3306/nova?charset=utf8")
        self.assertEqual(db.redacted_url(), "mysql+pymysql://nova:***@db:3306/nova?charset=utf8")
        db = NovaDatabase.from_url("postgresql://nova@db/nova?password=hunter2")
        self.assertEqual(db.redacted_url(), "postgresql+psycopg://nova@db/nova?password=***")
        self.assertNotIn("hunter2", repr(db))

    def test_refused(self) -> None:
        """Malformed URLs are refused with a reason that never quotes the password."""
        for url in (
            "redis://:hunter2@h/0",
            "mysql+pymysql//nova:hunter2@db/nova",
            "sqlite://",
            "mysql+pymysql://nova:hunter2@db/nova?colour=blue",
            "mysql+pymysql://nova:hunter2@db:99999/nova",
            "mysql+pymysql://nova:hunter2@[fd00::1/nova",
            "mysql+pymysql://nova:hunter2@db/nova?ssl_verify_cert=maybe",
            "sqlite:////nova.sqlite?timeout=5",
        ):
            with self.assertRaises(ValueError, msg=url) as caught:
                NovaDatabase.from_url(url)
            self.assertNotIn("hunter2", str(caught.exception))

    def test_libpq_checks_options(self) -> None:
        """An option libpq does not know is refused when the store is made, not per lookup."""
        db = NovaDatabase.from_url("postgresql://nova:hunter2@db/nova?sslmod=require")
        with self.assertRaises(ValueError) as caught:
            NovaTokenStore(db, Clock())
        self.assertIn("sslmod", str(caught.exception))
        self.assertNotIn("hunter2", str(caught.exception))

    def test_open_token_store(self) -> None:
        """``--tokens nova:URL`` makes a NovaTokenStore with the store timeout and the
        re-check interval; a bad URL is a ValueError."""
        store = open_token_store(
            "nova:sqlite:////var/lib/nova/nova.sqlite",
            Clock(),
            reply_timeout=0.5,
            nova_recheck_interval=3.0,
        )
        assert isinstance(store, NovaTokenStore)
        self.assertEqual((store.max_wait, store.recheck_interval), (0.5, 3.0))
        for interface in (ITokenStore, IRevocationFeed, IHashLookup):
            verifyObject(interface, store)
        with self.assertRaises(ValueError):
            open_token_store("nova:oracle://nova:pw@db/nova", Clock())


# ---------------------------------------------------------------------------------------------
# nova.conf


NOVA_CONF = """\
[DEFAULT]
# oslo.config takes '%' literally
transport_url = rabbit://nova:100%secret@rabbit:5672/
web = /usr/share/novnc
[database]
connection = mysql+pymysql://nova:db%pass@db.example/nova_cell1?charset=utf8
[api_database]
connection = mysql+pymysql://nova:other@db.example/nova_api
[vnc]
enabled = true
novncproxy_host = 192.0.2.10
novncproxy_port = 6081
novncproxy_base_url = https://console.example.com:6081/vnc_lite.html
auth_schemes = vencrypt,none
vencrypt_ca_certs = /etc/pki/qemu/ca-cert.pem
[console]
allowed_origins = console.example.com, ::1
[consoleauth]
enforce_session_timeout = True
"""


class NovaConfigTests(SynchronousTestCase):
    """nova.conf is read as oslo.config reads it, and applied where vncmux has the feature."""

    def write(self, text: str) -> str:
        fd, path = tempfile.mkstemp(suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.unlink, path)
        return path

    def test_read(self) -> None:
        """The cell database (not the API database), the listener, origins and the options
        recorded for later; '%' is not interpolation."""
        nova = read_nova_config(self.write(NOVA_CONF))
        self.assertEqual(
            nova.database_connection,
            "mysql+pymysql://nova:db%pass@db.example/nova_cell1?charset=utf8",
        )
        self.assertEqual((nova.novncproxy_host, nova.novncproxy_port), ("192.0.2.10", 6081))
        self.assertEqual(nova.allowed_origins, ("console.example.com", "::1"))
        self.assertEqual(nova.auth_schemes, ("vencrypt", "none"))
        self.assertEqual((nova.web, nova.enforce_session_timeout), ("/usr/share/novnc", True))
        self.assertNotIn("db%pass", repr(nova))

    def test_defaults_and_deprecated_names(self) -> None:
        """Without [vnc], nova's defaults (0.0.0.0:6080); options under their deprecated
        group or name still count, the current spelling wins."""
        nova = read_nova_config(self.write("[database]\nconnection = sqlite:////n.db\n"))
        self.assertEqual(nova.listen_endpoint(), "tcp:6080:interface=0.0.0.0")
        self.assertEqual((nova.allowed_origins, nova.auth_schemes), ((), ("none",)))
        nova = read_nova_config(
            self.write(
                "[DEFAULT]\nconsole_allowed_origins = old.example\nnovncproxy_port = 6090\n"
                "novncproxy_host = '::'\n[vnc]\nnovncproxy_port = 6091\n"
            )
        )
        self.assertEqual(nova.allowed_origins, ("old.example",))
        self.assertEqual(nova.listen_endpoint(), "tcp6:6091:interface=\\:\\:")

    def test_listen_endpoints_parse(self) -> None:
        """The endpoint strings made from nova's host and port listen where nova would."""
        for host, port, interface in (("192.0.2.10", 6081, "192.0.2.10"), ("::", 6080, "::")):
            conf = f"[vnc]\nnovncproxy_host = {host}\nnovncproxy_port = {port}\n"
            endpoint = read_nova_config(self.write(conf)).listen_endpoint()
            memory = MemoryReactor()
            serverFromString(memory, endpoint).listen(Factory.forProtocol(Protocol))
            self.assertEqual((memory.tcpServers[0][0], memory.tcpServers[0][3]), (port, interface))

    def test_origins(self) -> None:
        """Nova's allowed host names admit those hosts with any port, with the scheme of
        novncproxy_base_url, and nothing that merely contains them; a name with glob
        characters is taken literally."""
        patterns = read_nova_config(self.write(NOVA_CONF)).origin_patterns()
        for origin in (
            "https://console.example.com",
            "https://CONSOLE.example.com:6081",
            "https://[::1]:6080",
        ):
            self.assertTrue(origin_allowed(origin, "proxy:6081", "https", patterns), origin)
        for origin in (
            "http://console.example.com",
            "https://evil.example.com",
            "https://console.example.com.evil.net",
            "https://xconsole.example.com",
            "https://[::2]:6080",
        ):
            self.assertFalse(origin_allowed(origin, "proxy:6081", "https", patterns), origin)
        either = read_nova_config(
            self.write("[console]\nallowed_origins = console.example.com\n")
        ).origin_patterns()
        for origin in ("http://console.example.com:80", "https://console.example.com"):
            self.assertTrue(origin_allowed(origin, None, "https", either), origin)
        literal = read_nova_config(
            self.write("[console]\nallowed_origins = *.example.com\n")
        ).origin_patterns()
        self.assertFalse(origin_allowed("https://a.example.com", None, "https", literal))

    def test_not_applied(self) -> None:
        """Options vncmux does not honour yet are named, so the operator is told."""
        nova = read_nova_config(
            self.write(
                NOVA_CONF
                + "[spice]\nenabled = true\n[serial_console]\nenabled = true\n"
                + "[DEFAULT]\nssl_only = true\n"
            )
        )
        notes = "\n".join(nova.not_applied())
        self.assertIn("[DEFAULT]", notes)
        self.assertNotIn("[spice]", notes)  # served: nothing to warn about
        self.assertNotIn("[serial_console]", notes)
        self.assertNotIn("auth_schemes", notes)  # the security proxy applies it
        self.assertEqual(read_nova_config(self.write("")).not_applied(), [])

    def test_malformed(self) -> None:
        """A file that is not INI, or a bad port, is a ValueError naming the problem."""
        with self.assertRaises(ValueError):
            read_nova_config(self.write("no section here\n"))
        with self.assertRaises(ValueError) as caught:
            read_nova_config(self.write("[vnc]\nnovncproxy_port = sixty\n"))
        self.assertIn("novncproxy_port", str(caught.exception))

    def test_options(self) -> None:
        """``--nova-config`` sets the token store, the listeners (SPICE HTML5 on [spice]
        html5proxy_host/port when enabled), the origins, the web directory, expiry
        enforcement and the security proxy's schemes and CA bundle; a not-applied option is
        logged without the database password."""
        path = self.write(
            NOVA_CONF
            + "[spice]\nenabled = true\nhtml5proxy_host = 192.0.2.11\nhtml5proxy_port = 6092\n"
            + "[DEFAULT]\nssl_only = true\n"
        )
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        options = Options()
        options.parseOptions(["--nova-config", path, "--allowed-origin", "https://a.example"])
        self.assertEqual(
            options["tokens"],
            "nova:mysql+pymysql://nova:db%pass@db.example/nova_cell1?charset=utf8",
        )
        self.assertEqual(options["listen"], "tcp:6081:interface=192.0.2.10")
        self.assertEqual(options["web"], "/usr/share/novnc")
        self.assertTrue(options["enforce-expiry"])
        self.assertEqual(options["allowed-origin"][0], "https://a.example")
        self.assertIn("https://console.example.com:*", options["allowed-origin"])
        self.assertTrue(options.settings().limits.enforce_expiry)
        lines = _log_lines(logged)
        self.assertTrue(any("[DEFAULT] ssl_only" in line for line in lines), lines)
        self.assertEqual(options["spice-listen"], "tcp:6092:interface=192.0.2.11")
        self.assertEqual(options["auth-schemes"], ("vencrypt", "none"))
        self.assertEqual(options["vencrypt-ca-certs"], "/etc/pki/qemu/ca-cert.pem")
        self.assertIsNone(options["vencrypt-client-cert"])
        self.assertFalse(any("db%pass" in line for line in lines), lines)

    def test_command_line_wins(self) -> None:
        """``--listen``, ``--tokens`` and ``--web`` (also from ``--config``) beat nova.conf."""
        path = self.write(NOVA_CONF)
        options = Options()
        options.parseOptions(
            ["--nova-config", path, "--listen", "tcp:7000", "--tokens=file:/tmp/t", "--web=/w"]
        )
        self.assertEqual(
            (options["listen"], options["tokens"], options["web"]),
            ("tcp:7000", "file:/tmp/t", "/w"),
        )
        ini = self.write(f"[vncmux]\nnova_config = {path}\nlisten = tcp:7001\n")
        options = Options()
        options.parseOptions(["--config", ini])
        self.assertEqual(options["listen"], "tcp:7001")
        self.assertTrue(options["tokens"].startswith("nova:mysql+pymysql://"))

    def test_serial_listener(self) -> None:
        """``[serial_console] enabled`` opens the serial listener on nova's serialproxy host
        and port (6083 by default); without it, or with ``--serial-listen none``, there is
        none; ``--serial-listen`` beats nova.conf; ``--listen`` replaces only the noVNC one."""
        enabled = self.write(
            NOVA_CONF + "[serial_console]\nenabled = true\nserialproxy_host = 192.0.2.11\n"
        )
        options = Options()
        options.parseOptions(["--nova-config", enabled, "--listen", "tcp:7000"])
        self.assertEqual(
            options.settings().listeners,
            (("novnc", "tcp:7000"), ("serial", "tcp:6083:interface=192.0.2.11")),
        )
        for args, serial in (
            (["--nova-config", self.write(NOVA_CONF)], None),
            (["--nova-config", enabled, "--serial-listen", "none"], None),
            (["--nova-config", enabled, "--serial-listen=tcp:7003"], "tcp:7003"),
            (["--serial-listen", "tcp:7004"], "tcp:7004"),
        ):
            options = Options()
            options.parseOptions(args)
            self.assertEqual(options.settings().serial_listen, serial, args)

    def test_make_service(self) -> None:
        """With --nova-config the proxy holds a NovaTokenStore (a child service, stopped
        after the drain) with the configured re-check interval."""
        conf = self.write("[database]\nconnection = sqlite:////var/lib/nova/nova.sqlite\n")
        options = Options()
        options.parseOptions(["--nova-config", conf, "--nova-recheck-interval", "4"])
        service = build_service(options, MemoryReactorClock())
        stores = [child for child in service if isinstance(child, NovaTokenStore)]
        self.assertEqual([store.recheck_interval for store in stores], [4.0])
        self.assertEqual(service.settings.listen, "tcp:6080:interface=0.0.0.0")

    def test_refused(self) -> None:
        """A missing file, or one without [database] connection, stops the start."""
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--nova-config", "/nonexistent/nova.conf"])
        empty = self.write("[vnc]\nnovncproxy_port = 6080\n")
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--nova-config", empty])
        self.assertIn("[database] connection", str(caught.exception))
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--nova-recheck-interval", "0"])


# ---------------------------------------------------------------------------------------------
# One nova database of each kind, with nova's table


class NovaDatabaseFixture:
    """A database holding nova's table, and blocking helpers to write rows as nova does."""

    def __init__(
        self, url: str, dialect: str, admin: Callable[[], Any], server: _Server | None = None
    ) -> None:
        self.url = url
        self.dialect = dialect
        self._admin = admin
        self.server = server
        self.mark = "?" if dialect == "sqlite" else "%s"

    def execute(self, sql: str, arguments: tuple[object, ...] = ()) -> None:
        conn = self._admin()
        try:
            conn.cursor().execute(sql.replace("%s", self.mark), arguments)
            conn.commit()
        finally:
            conn.close()

    def authorize(
        self,
        token: str,
        host: str = "10.0.0.5",
        port: int = 5900,
        expires: float = 0.0,
        console_type: str = "novnc",
        instance_uuid: str = INSTANCE,
        internal_access_path: str | None = None,
    ) -> None:
        """Insert a row as ConsoleAuthToken.authorize does (C{expires}: unix seconds)."""
        expires = expires or reactor.seconds() + 600
        self.execute(
            "INSERT INTO console_auth_tokens (token_hash, console_type, host, port,"
            " internal_access_path, instance_uuid, expires, access_url_base)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                hash_token(token), console_type, host, port, internal_access_path,
                instance_uuid, int(expires), "http://127.0.0.1:6080/vnc_lite.html",
            ),
        )  # fmt: skip

    def delete_instance(self, instance_uuid: str = INSTANCE) -> None:
        """What nova does when an instance is deleted (destroy_all_by_instance)."""
        self.execute("DELETE FROM console_auth_tokens WHERE instance_uuid = %s", (instance_uuid,))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold a lock that makes every read of the table wait until the block ends."""
        conn = self._admin()
        cursor = conn.cursor()
        if self.dialect == "mysql":
            cursor.execute("LOCK TABLES console_auth_tokens WRITE")
        elif self.dialect == "postgresql":
            conn.autocommit = False
            cursor.execute("LOCK TABLE console_auth_tokens IN ACCESS EXCLUSIVE MODE")
        else:
            cursor.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            if self.dialect == "mysql":
                cursor.execute("UNLOCK TABLES")
            else:
                conn.commit()
            conn.close()

    def kill_store_connections(self) -> int:
        """End the server side of every connection of the ``nova`` user (a restart, seen
        from the store); returns how many."""
        conn = self._admin()
        try:
            cursor = conn.cursor()
            if self.dialect == "mysql":
                cursor.execute("SELECT id FROM information_schema.processlist WHERE user = 'nova'")
                ids = [row[0] for row in cursor.fetchall()]
                for connection_id in ids:
                    cursor.execute(f"KILL CONNECTION {int(connection_id)}")
                return len(ids)
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'nova'"
            )
            return len(cursor.fetchall())
        finally:
            conn.close()


class NovaStoreContract:
    """What NovaTokenStore answers, against one kind of real database."""

    timeout = 60
    dialect = ""

    def database(self, tls_port: bool = True) -> NovaDatabaseFixture:
        raise NotImplementedError

    def store(self, url: str, **kwargs: Any) -> NovaTokenStore:
        store = NovaTokenStore(NovaDatabase.from_url(url), reactor, reactor=reactor, **kwargs)
        store.startService()
        self.addCleanup(store.stopService)  # type: ignore[attr-defined]
        return store

    @async_test
    async def test_valid_token(self) -> None:
        """A valid token gives nova's host, port, instance and expiry, as nova's
        console_auth_token_get_valid does."""
        db = self.database()
        expires = reactor.seconds() + 600
        db.authorize(TOKEN, host="10.0.0.7", port=5901, expires=expires)
        record = await self.store(db.url).lookup(TOKEN)
        assert record is not None
        self.assertEqual(  # type: ignore[attr-defined]
            (record.token_hash, record.host, record.port, record.instance_uuid),
            (hash_token(TOKEN), "10.0.0.7", 5901, INSTANCE),
        )
        self.assertEqual(  # type: ignore[attr-defined]
            (record.console_type, record.internal_access_path, record.expires_at),
            ("novnc", "", float(int(expires))),
        )

    @async_test
    async def test_unknown_expired_other_type(self) -> None:
        """An unknown token and an expired one (expires not ahead of now) are None; a token
        of another console type is found with its type, for the listener's gate to judge
        (one store serves every listener)."""
        db = self.database()
        db.authorize(TOKEN, expires=reactor.seconds())
        db.authorize(OTHER, console_type="spice-html5", internal_access_path="/tunnel")
        store = self.store(db.url)
        for token in ("never-issued", TOKEN):
            self.assertIsNone(await store.lookup(token), token)  # type: ignore[attr-defined]
        spice = await store.lookup(OTHER)
        assert spice is not None
        self.assertEqual(  # type: ignore[attr-defined]
            (spice.console_type, spice.internal_access_path), ("spice-html5", "/tunnel")
        )

    @async_test
    async def test_schema_without_tls_port(self) -> None:
        """nova's schema from before ``tls_port`` works the same: only needed columns are read."""
        db = self.database(tls_port=False)
        db.authorize(TOKEN, host="fd00::5", port=5902)
        store = self.store(db.url)
        record = await store.lookup(TOKEN)
        assert record is not None
        self.assertEqual(record.target, "[fd00::5]:5902")  # type: ignore[attr-defined]
        self.assertIsNone(await store.ping())  # type: ignore[attr-defined]

    @async_test
    async def test_lookup_runs_off_the_reactor(self) -> None:
        """While the table is locked a lookup waits in a pool thread and the reactor goes
        on: the lock is released from the reactor, after which the lookup answers. (A
        lookup on the reactor thread could never see that release.)"""
        db = self.database()
        db.authorize(TOKEN)
        store = self.store(db.url, reply_timeout=10.0)
        with db.locked():
            looking = store.lookup(TOKEN)
            self.assertFalse(looking.called)  # type: ignore[attr-defined]
            released: Deferred[None] = Deferred()
            reactor.callLater(0.05, released.callback, None)
            await released
        record = await looking
        self.assertEqual(record.port if record else None, 5900)  # type: ignore[attr-defined]

    @async_test
    async def test_slow_database_is_unavailable(self) -> None:
        """A lookup that gets no answer within the reply timeout fails with
        TokenStoreUnavailable (4503), and the store answers again once the database does."""
        db = self.database()
        db.authorize(TOKEN)
        store = self.store(db.url, reply_timeout=0.3)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        with db.locked():
            failure = None
            try:
                await store.lookup(TOKEN)
            except TokenStoreUnavailable as e:
                failure = e
        self.assertIn("no answer within 0.3 s", str(failure))  # type: ignore[attr-defined]
        self.assertTrue(any("lookup failed" in line for line in _log_lines(logged)))  # type: ignore[attr-defined]
        record = await self.store(db.url).lookup(TOKEN)
        self.assertIsNotNone(record)  # type: ignore[attr-defined]

    @async_test
    async def test_database_down(self) -> None:
        """Nothing listening (or no such file): lookups and pings fail with
        TokenStoreUnavailable, never None, so the user sees 4503 and not 4401."""
        store = self.store(self.unreachable_url())
        for call in (lambda: store.lookup(TOKEN), store.ping):
            try:
                await call()
            except TokenStoreUnavailable:
                continue
            self.fail("no TokenStoreUnavailable")  # type: ignore[attr-defined]

    @async_test
    async def test_missing_table_fails_ping(self) -> None:
        """A database without nova's table (a wrong URL) fails the readiness ping."""
        db = self.database()
        db.execute("DROP TABLE console_auth_tokens")
        try:
            await self.store(db.url).ping()
        except TokenStoreUnavailable:
            return
        self.fail("the ping passed without a table")  # type: ignore[attr-defined]

    @async_test
    async def test_recheck_closes_deleted_instance(self) -> None:
        """End to end on loopback: nova deletes an instance (its token rows); its console
        closes with 4002 within a re-check interval while another instance's stays open."""
        vnc, vnc_port = await listen_fake_vnc(self)
        db = self.database()
        db.authorize(TOKEN, host="127.0.0.1", port=vnc_port)
        db.authorize(OTHER, host="127.0.0.1", port=vnc_port, instance_uuid=str(uuid.uuid4()))
        store = self.store(db.url, recheck_interval=0.1)
        proxy = await listen_proxy(self, store, Limits(idle_timeout=0, ping_interval=0))
        doomed = await connect_client(self, proxy.port, f"/websockify?token={TOKEN}")
        kept = await connect_client(self, proxy.port, f"/websockify?token={OTHER}")
        await doomed.receive(12)
        await kept.receive(12)
        db.delete_instance()
        self.assertEqual(await doomed.closed, (4002, "token revoked"))  # type: ignore[attr-defined]
        kept.send(b"still here")
        await kept.receive(12 + 10)
        self.assertFalse(kept.closed.called)  # type: ignore[attr-defined]
        self.assertEqual(len(proxy.supervisor.sessions), 1)  # type: ignore[attr-defined]

    def unreachable_url(self) -> str:
        raise NotImplementedError


class NovaServerContract(NovaStoreContract):
    """What only a database server has: a password, and connections it can end."""

    @async_test
    async def test_password_never_logged(self) -> None:
        """Neither a refused password, nor a good lookup, nor the store's start puts nova's
        database password into any log line or into the store's repr."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        db = self.database()
        db.authorize(TOKEN)
        good = self.store(db.url)
        self.assertIsNotNone(await good.lookup(TOKEN))  # type: ignore[attr-defined]
        wrong = self.store(db.url.replace("n0va-S3cret", "not-the-pass"))
        try:
            await wrong.lookup(TOKEN)
        except TokenStoreUnavailable as e:
            refusal = str(e)
        else:
            self.fail("a wrong password was accepted")  # type: ignore[attr-defined]
        lines = [*_log_lines(logged), refusal, repr(good), repr(wrong)]
        self.assertTrue(any("lookup failed" in line for line in lines), lines)  # type: ignore[attr-defined]
        for secret in (NOVA_PASSWORD, "n0va-S3cret", "not-the-pass"):
            self.assertFalse(any(secret in line for line in lines), secret)  # type: ignore[attr-defined]

    @async_test
    async def test_reconnects_after_server_side_close(self) -> None:
        """When the server ends the store's connections (a database restart), the next
        lookup connects again and answers, with no error logged."""
        db = self.database()
        db.authorize(TOKEN)
        store = self.store(db.url)
        self.assertIsNotNone(await store.lookup(TOKEN))  # type: ignore[attr-defined]
        self.assertGreater(db.kill_store_connections(), 0)  # type: ignore[attr-defined]
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for _ in range(3):
            self.assertIsNotNone(await store.lookup(TOKEN))  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            [line for line in _log_lines(logged) if "fail" in line.lower()], []
        )


class MariaDBStoreTests(NovaServerContract, TestCase):
    """The contract against a real MariaDB server, through PyMySQL."""

    dialect = "mysql"

    def database(self, tls_port: bool = True) -> NovaDatabaseFixture:
        server = mariadb()
        url = server.new_database(tls_port)
        name = url.rsplit("/", 1)[1].split("?")[0]
        return NovaDatabaseFixture(url, "mysql", lambda: server.admin(name), server)

    def unreachable_url(self) -> str:
        return f"mysql+pymysql://nova:{NOVA_PASSWORD}@127.0.0.1:{free_port()}/nova"


class PostgreSQLStoreTests(NovaServerContract, TestCase):
    """The contract against a real PostgreSQL server, through psycopg 3."""

    dialect = "postgresql"

    def database(self, tls_port: bool = True) -> NovaDatabaseFixture:
        server = postgresql()
        url = server.new_database(tls_port)
        name = url.rsplit("/", 1)[1]
        return NovaDatabaseFixture(url, "postgresql", lambda: server.admin(name), server)

    def unreachable_url(self) -> str:
        return f"postgresql://nova:pw@127.0.0.1:{free_port()}/nova"


class SQLiteStoreTests(NovaStoreContract, TestCase):
    """The contract against an SQLite file, through sqlite3."""

    dialect = "sqlite"

    def database(self, tls_port: bool = True) -> NovaDatabaseFixture:
        directory = tempfile.mkdtemp(prefix="vncmux-nova-sqlite-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "nova.sqlite")
        with sqlite3.connect(path) as conn:
            for statement in nova_schema("sqlite", tls_port):
                conn.execute(statement)
        conn.close()
        return NovaDatabaseFixture(
            f"sqlite:///{path}", "sqlite", lambda: sqlite3.connect(path, isolation_level=None)
        )

    def unreachable_url(self) -> str:
        return "sqlite:////nonexistent/nova.sqlite"


# ---------------------------------------------------------------------------------------------
# The re-check of live sessions, on a Clock


class SynchronousPool:
    """adbapi's C{runInteraction} run at once on an sqlite3 connection, for Clock tests."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.queries = 0
        self.broken = False

    def runInteraction(self, interaction: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.queries += 1
        if self.broken:
            return fail(sqlite3.OperationalError("disk I/O error"))
        cursor = self.connection.cursor()
        try:
            return succeed(interaction(cursor, *args))
        except Exception:
            return fail()
        finally:
            cursor.close()

    def close(self) -> None:
        self.connection.close()


class RecheckTests(SupervisorTestCase):
    """Rows nova deletes end their live sessions with 4002 within one re-check interval."""

    interval = 10.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        connection = sqlite3.connect(":memory:", isolation_level=None)
        for statement in nova_schema("sqlite"):
            connection.execute(statement)
        self.db = connection
        self.pool = SynchronousPool(connection)
        self.store = NovaTokenStore(
            NovaDatabase.from_url("sqlite:////unused"),
            self.clock,
            recheck_interval=self.interval,
            pool=self.pool,
        )
        self.supervisor = Supervisor(
            self.clock,
            Observers(),
            Limits(ping_interval=0, idle_timeout=0),
            revocations=self.store,
        )
        self.store.startService()
        self.supervisor.startService()

    def tearDown(self) -> None:
        self.supervisor.stopService()
        self.store.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer left behind")

    def authorize(self, token: str, instance_uuid: str = INSTANCE, ttl: float = 600) -> Any:
        self.db.execute(
            "INSERT INTO console_auth_tokens (token_hash, console_type, host, port,"
            " instance_uuid, expires) VALUES (?, 'novnc', '10.0.0.5', 5900, ?, ?)",
            (hash_token(token), instance_uuid, int(self.clock.seconds() + ttl)),
        )
        looking = self.store.lookup(token)
        self.clock.advance(0)
        return self.open(self.successResultOf(looking))

    def test_deleted_row_closes_within_interval(self) -> None:
        """A deleted instance's session lives until the next round, then ends with 4002;
        another instance's session goes on."""
        doomed = self.authorize(TOKEN)
        kept = self.authorize(OTHER, instance_uuid="other-instance")
        self.db.execute("DELETE FROM console_auth_tokens WHERE instance_uuid = ?", (INSTANCE,))
        self.clock.advance(self.interval - 1)
        self.assertIsNone(doomed.ending)
        self.clock.advance(1)
        self.assertIs(doomed.ending, TOKEN_REVOKED)
        self.assertEqual(doomed.client.closed, (4002, "token revoked"))
        self.assertIsNone(kept.ending)

    def test_one_query_per_round(self) -> None:
        """Every live token is checked in one query per round, not one per session."""
        for n in range(20):
            self.authorize(f"token-{n}")
        before = self.pool.queries
        self.clock.advance(self.interval)
        self.assertEqual(self.pool.queries - before, 1)
        self.assertEqual(len(self.supervisor.sessions), 20)

    def test_expired_then_purged_is_not_revoked(self) -> None:
        """nova purges rows of expired tokens; as in nova-novncproxy the session goes on
        (``--enforce-expiry`` is what ends sessions at expiry)."""
        session = self.authorize(TOKEN, ttl=15)
        self.clock.pump([self.interval] * 2)  # expired by now, still re-checked
        self.db.execute("DELETE FROM console_auth_tokens WHERE expires <= ?", (20e9,))
        self.clock.pump([self.interval] * 3)
        self.assertIsNone(session.ending)

    def test_database_errors_close_nothing(self) -> None:
        """A round that cannot reach the database closes no session and is logged; the next
        round after the database is back works again."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        session = self.authorize(TOKEN)
        self.pool.broken = True
        self.clock.advance(self.interval)
        self.assertIsNone(session.ending)
        self.assertTrue(any("re-check failed" in line for line in _log_lines(logged)))
        self.pool.broken = False
        self.db.execute("DELETE FROM console_auth_tokens")
        self.clock.advance(self.interval)
        self.assertIs(session.ending, TOKEN_REVOKED)

    def test_takes_no_writes(self) -> None:
        """Nova's rows are read, never written: the store takes no activity write-backs and
        no single-use claims (nova has no column for either)."""
        self.assertFalse(IActivitySink.providedBy(self.store))
        self.assertFalse(ISingleUse.providedBy(self.store))
