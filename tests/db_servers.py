"""
Real MariaDB and PostgreSQL servers for tests, one of each per test session, on free loopback
ports in temporary directories, with nova's ``console_auth_tokens`` schema created by the
tests themselves (L{create_schema}).

Each server is started on first use and stopped when the interpreter exits. Readiness is the
server's own ``READY=1`` (systemd's notify protocol, which both speak when ``NOTIFY_SOCKET`` is
set) or its "ready" log line. PostgreSQL refuses to run as root: as root, ``initdb`` and the
server run as the ``postgres`` user (else ``nobody``) through ``setpriv``, which execs in
place, so the process that the test terminates is the server itself.

A missing server binary skips the tests, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any
from unittest import SkipTest

from tests.redis_server import STOP_TIMEOUT, drain_output, free_port, notify_socket, wait_ready

#: The password of the ``nova`` database user: tests check that it appears in no log line.
NOVA_PASSWORD = "n0va-S3cret%pass"
_PORT_ATTEMPTS = 3


def nova_schema(dialect: str, tls_port: bool = True) -> list[str]:
    """
    The DDL of nova's ``console_auth_tokens`` (nova/db/main/models.py, ConsoleAuthToken with
    NovaBase's timestamps), with or without the ``tls_port`` column of newer releases.
    """
    id_column = {
        "mysql": "id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY",
        "postgresql": "id SERIAL NOT NULL PRIMARY KEY",
        "sqlite": "id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT",
    }[dialect]
    timestamp = "TIMESTAMP" if dialect == "postgresql" else "DATETIME"
    columns = [
        f"created_at {timestamp} NULL",
        f"updated_at {timestamp} NULL",
        id_column,
        "token_hash VARCHAR(255) NOT NULL",
        "console_type VARCHAR(255) NOT NULL",
        "host VARCHAR(255) NOT NULL",
        "port INTEGER NOT NULL",
        *(["tls_port INTEGER NULL"] if tls_port else []),
        "internal_access_path VARCHAR(255) NULL",
        "instance_uuid VARCHAR(36) NOT NULL",
        "expires INTEGER NOT NULL",
        "access_url_base VARCHAR(255) NULL",
        "CONSTRAINT uniq_console_auth_tokens0token_hash UNIQUE (token_hash)",
    ]
    suffix = " ENGINE=InnoDB DEFAULT CHARSET=utf8" if dialect == "mysql" else ""
    table = "CREATE TABLE console_auth_tokens (\n  " + ",\n  ".join(columns) + f"\n){suffix}"
    indexes = [
        ("console_auth_tokens_instance_uuid_idx", "instance_uuid"),
        ("console_auth_tokens_host_expires_idx", "host, expires"),
        ("console_auth_tokens_token_hash_instance_uuid_idx", "token_hash, instance_uuid"),
    ]
    return [table] + [f"CREATE INDEX {n} ON console_auth_tokens ({c})" for n, c in indexes]


class _Server:
    """A database server process in its own temporary directory."""

    name = ""
    ready_marker = b""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix=f"vncmux-{self.name}-")
        os.chmod(self.directory, 0o755)
        self.log_path = os.path.join(self.directory, "server.log")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._drain: subprocess.Popen[bytes] | None = None
        self._databases = 0

    def start(self) -> None:
        self.initialize()
        for _ in range(_PORT_ATTEMPTS):
            port = free_port()
            if self._start_on(port):
                self.port = port
                self.prepare()
                return
        raise RuntimeError(f"{self.name} could not bind a free port in {_PORT_ATTEMPTS} tries")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.wait(STOP_TIMEOUT)
        shutil.rmtree(self.directory, ignore_errors=True)

    def new_database(self, tls_port: bool = True) -> str:
        """A fresh database with nova's table; returns nova's ``[database] connection``."""
        self._databases += 1
        name = f"nova{self._databases}"
        self.create_database(name, nova_schema(self.dialect, tls_port))
        return self.url(name)

    def _start_on(self, port: int) -> bool:
        with notify_socket(self.directory) as (notify_path, notify):
            process = subprocess.Popen(
                self.command(port),
                env=dict(os.environ, NOTIFY_SOCKET=notify_path),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
            try:
                output = wait_ready(process, notify, self.ready_marker, self.name)
            except BaseException:
                if process.poll() is None:
                    process.kill()
                process.wait()
                raise
            if output is None:
                return False
            self._drain = drain_output(process, output, self.log_path)
            self.process = process
            return True

    # per database

    dialect = ""

    def initialize(self) -> None:
        raise NotImplementedError

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create the ``nova`` user, as a nova deployment has it."""
        raise NotImplementedError

    def create_database(self, name: str, statements: list[str]) -> None:
        raise NotImplementedError

    def url(self, database: str) -> str:
        raise NotImplementedError

    def admin(self, database: str) -> Any:
        """A blocking DB-API connection (autocommit) as the superuser, for set-up."""
        raise NotImplementedError


class MariaDBServer(_Server):
    name = "mariadb"
    dialect = "mysql"
    ready_marker = b"ready for connections"

    def __init__(self, mariadbd: str, install_db: str) -> None:
        super().__init__()
        self.mariadbd = mariadbd
        self.install_db = install_db
        self.data = os.path.join(self.directory, "data")
        self.tmp = os.path.join(self.directory, "tmp")  # parallel installs must not share one
        self.socket_path = os.path.join(self.directory, "mysqld.sock")
        self.user = pwd.getpwuid(os.getuid()).pw_name

    def initialize(self) -> None:
        os.mkdir(self.tmp)
        subprocess.run(
            [
                self.install_db,
                "--no-defaults",
                f"--datadir={self.data}",
                f"--tmpdir={self.tmp}",
                f"--user={self.user}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )

    def command(self, port: int) -> list[str]:
        return [
            self.mariadbd,
            "--no-defaults",
            f"--datadir={self.data}",
            f"--tmpdir={self.tmp}",
            f"--socket={self.socket_path}",
            f"--pid-file={os.path.join(self.directory, 'mysqld.pid')}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--user={self.user}",
            "--skip-log-bin",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=16M",
            "--innodb-flush-log-at-trx-commit=0",
        ]

    def admin(self, database: str = "") -> Any:
        import pymysql

        return pymysql.connect(
            unix_socket=self.socket_path, user="root", database=database or None, autocommit=True
        )

    def prepare(self) -> None:
        with self.admin() as conn, conn.cursor() as cursor:
            cursor.execute("CREATE USER 'nova'@'%%' IDENTIFIED BY %s", (NOVA_PASSWORD,))

    def create_database(self, name: str, statements: list[str]) -> None:
        with self.admin() as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name} CHARACTER SET utf8")
            cursor.execute(f"GRANT ALL PRIVILEGES ON {name}.* TO 'nova'@'%'")
            cursor.execute(f"USE {name}")
            for statement in statements:
                cursor.execute(statement)

    def url(self, database: str) -> str:
        secret = NOVA_PASSWORD.replace("%", "%25")
        return f"mysql+pymysql://nova:{secret}@127.0.0.1:{self.port}/{database}?charset=utf8"


class PostgreSQLServer(_Server):
    name = "postgresql"
    dialect = "postgresql"
    ready_marker = b"database system is ready to accept connections"

    def __init__(self, bindir: str) -> None:
        super().__init__()
        self.bindir = bindir
        self.data = os.path.join(self.directory, "data")
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            account = _account("postgres") or _account("nobody")
            assert account is not None, "no postgres or nobody account to run PostgreSQL as"
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            self.as_user = [
                shutil.which("setpriv") or "setpriv",
                f"--reuid={account.pw_uid}",
                f"--regid={account.pw_gid}",
                "--clear-groups",
            ]

    def initialize(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                os.path.join(self.bindir, "initdb"),
                "-D",
                self.data,
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.directory,
            timeout=60,
        )

    def command(self, port: int) -> list[str]:
        return [
            *self.as_user,
            os.path.join(self.bindir, "postgres"),
            "-D", self.data,
            "-k", self.directory,
            "-p", str(port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "synchronous_commit=off",
        ]  # fmt: skip

    def admin(self, database: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(
            host=self.directory, port=self.port, user="postgres", dbname=database, autocommit=True
        )

    def prepare(self) -> None:
        from psycopg import sql

        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE nova LOGIN PASSWORD {}").format(sql.Literal(NOVA_PASSWORD))
            )

    def create_database(self, name: str, statements: list[str]) -> None:
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER nova")
        with self.admin(name) as conn:
            for statement in statements:
                conn.execute(statement)
            conn.execute("GRANT SELECT ON console_auth_tokens TO nova")

    def url(self, database: str) -> str:
        secret = NOVA_PASSWORD.replace("%", "%25")
        return f"postgresql://nova:{secret}@127.0.0.1:{self.port}/{database}"


def _account(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _find_mariadb() -> tuple[str, str] | None:
    mariadbd = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/sbin")
    install_db = shutil.which("mariadb-install-db")
    return (mariadbd, install_db) if mariadbd and install_db else None


def _find_postgresql() -> str | None:
    """The newest ``/usr/lib/postgresql/N/bin`` (Debian keeps them off PATH), else PATH."""
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    candidates.sort(key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return os.path.dirname(candidates[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


_started: dict[str, _Server | BaseException] = {}


def _session_server(
    kind: str, find: Callable[[], Any], make: Callable[[Any], _Server], hint: str
) -> _Server:
    """The one server of C{kind} in this test session, started on first use."""
    if kind not in _started:
        found = find()
        if found is None:
            if os.environ.get("CI"):
                raise AssertionError(hint)
            raise SkipTest(hint)
        server = make(found)
        try:
            server.start()
        except BaseException as e:
            server.stop()
            _started[kind] = e
        else:
            atexit.register(server.stop)
            _started[kind] = server
    started = _started[kind]
    if isinstance(started, BaseException):
        raise RuntimeError(f"{kind} did not start: {started}")
    return started


def mariadb() -> MariaDBServer:
    """The session's MariaDB server."""
    return _session_server(  # type: ignore[return-value]
        "mariadb",
        _find_mariadb,
        lambda found: MariaDBServer(*found),
        "mariadbd or mariadb-install-db not found: apt-get install mariadb-server",
    )


def postgresql() -> PostgreSQLServer:
    """The session's PostgreSQL server."""
    return _session_server(  # type: ignore[return-value]
        "postgresql",
        _find_postgresql,
        PostgreSQLServer,
        "PostgreSQL's initdb not found: apt-get install postgresql",
    )
