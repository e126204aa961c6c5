"""
Nova's console tokens, read from nova's own cell database: ``--tokens nova:URL``.

Nova's API (on the compute host) writes one row per console authorization into the table
``console_auth_tokens`` and hands the user an access URL with the raw token; nova-novncproxy
validates it with ``ConsoleAuthToken.validate``: the row whose ``token_hash`` is the SHA-256
hex of the token and whose ``expires`` (unix seconds) is still ahead. This store does the same
query, read-only, in a thread pool (``twisted.enterprise.adbapi``) so that the reactor never
waits on the database: PyMySQL for MySQL/MariaDB (nova's own driver), psycopg 3 for
PostgreSQL, sqlite3 for SQLite.

Nova deletes a token's row when its instance is deleted or moved; nothing tells a proxy. The
store therefore asks the supervisor to re-check its live sessions every ``recheck_interval``
seconds (L{NovaTokenStore.watch_revocations}); a session whose row is gone ends with 4002.
Nova's compute hosts also purge rows once they have *expired*, and nova-novncproxy keeps such
sessions open (unless ``enforce_session_timeout``, vncmux's ``--enforce-expiry``): a row that
vanished after its token expired is therefore not taken for a revocation.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vncmux.interfaces import IRevocationFeed, ITokenStore
from vncmux.tokens.errors import TokenStoreUnavailable
from vncmux.tokens.open import NOVA_SOURCE_PREFIX as SOURCE_PREFIX
from vncmux.tokens.record import TokenRecord, hash_token, token_id_of
from vncmux.tokens.targets import BadTarget, check_target, format_target

TABLE = "console_auth_tokens"
#: Seconds between re-checks of live sessions against the table (``--nova-recheck-interval``).
DEFAULT_RECHECK_INTERVAL = 10.0
DEFAULT_REPLY_TIMEOUT = 2.0
#: Database connections (and threads) per proxy process at most.
DEFAULT_MAX_CONNECTIONS = 4
#: Seconds the driver's own timeouts add to the store's deadline: they only free the thread.
_DRIVER_MARGIN = 1.0
#: Token hashes per re-check query.
_RECHECK_BATCH = 500
#: Only what vncmux needs: nova's schemas before and after ``tls_port`` both have these.
_COLUMNS = "token_hash, host, port, internal_access_path, instance_uuid, console_type, expires"

_DRIVERS = {"mysql": "pymysql", "postgresql": "psycopg", "sqlite": "sqlite3"}
_DIALECTS = {"mysql": "mysql", "mariadb": "mysql", "postgresql": "postgresql", "sqlite": "sqlite"}
_DEFAULT_PORTS = {"mysql": 3306, "postgresql": 5432}
_INSTALL_HINT = {
    "pymysql": "PyMySQL is not installed: pip install 'vncmux[nova]'",
    "psycopg": "psycopg is not installed: pip install 'vncmux[nova]'",
}
#: Query options of SQLAlchemy itself (devstack adds ``plugin=dbcounter``): not for drivers.
_SQLALCHEMY_OPTIONS = frozenset({"plugin"})
_MYSQL_OPTIONS = frozenset(
    {
        "charset",
        "unix_socket",
        "read_default_file",
        "read_default_group",
        "connect_timeout",
        "read_timeout",
        "write_timeout",
        "ssl_ca",
        "ssl_cert",
        "ssl_key",
        "ssl_verify_cert",
        "ssl_check_hostname",
        "ssl_disabled",
    }
)
_MYSQL_BOOLEANS = frozenset({"ssl_verify_cert", "ssl_check_hostname", "ssl_disabled"})
_MYSQL_SECONDS = frozenset({"connect_timeout", "read_timeout", "write_timeout"})


@dataclass(frozen=True, slots=True)
class NovaDatabase:
    """
    Nova's cell database, from its ``[database] connection`` URL (SQLAlchemy's form):
    ``mysql+pymysql://user:pass@host:port/nova?charset=utf8``, ``mysql://…``,
    ``postgresql://…``, ``postgresql+psycopg2://…``, ``sqlite:///relative`` or
    ``sqlite:////absolute``. The driver named after ``+`` is not used: vncmux brings its own.
    The password never appears in C{repr}, in logs or in errors.
    """

    dialect: str
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str | None = None
    #: The URL's query options, minus SQLAlchemy's own.
    options: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_url(cls, url: str) -> NovaDatabase:
        """Parse a URL; C{ValueError} (never quoting it: it holds a password) when wrong."""
        scheme, sep, rest = url.strip().partition("://")
        dialect = _DIALECTS.get(scheme.lower().partition("+")[0])
        if not sep or dialect is None:
            raise ValueError(
                "a nova database URL starts with mysql+pymysql://, mysql://, postgresql://"
                " or sqlite:///"
            )
        rest, _, query = rest.partition("?")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise ValueError("the database URL query is not name=value&…") from None
        options = {k: v for k, v in pairs if k not in _SQLALCHEMY_OPTIONS}
        if dialect == "sqlite":
            if rest.startswith("/") and len(rest) > 1:
                return cls(dialect, database=unquote(rest[1:]), options=_only(options, frozenset()))
            raise ValueError("an SQLite URL names a file: sqlite:///relative or sqlite:////abs")
        netloc, _, path = rest.partition("/")
        userinfo, at, hostport = netloc.rpartition("@")
        user = password = None
        if at:
            name, colon, secret = userinfo.partition(":")
            user = unquote(name) or None
            password = unquote(secret) if colon else None
        host, port = _split_host(unquote(hostport))
        if dialect == "mysql":
            _mysql_options(options)  # refuse a bad value now, not at every lookup
        return cls(dialect, host, port, user, password, unquote(path) or None, options)

    @property
    def driver(self) -> str:
        """The DB-API module vncmux connects with."""
        return _DRIVERS[self.dialect]

    def redacted_url(self) -> str:
        """The URL for logs: the password (also a ``password=`` option) shown as ``***``."""
        if self.dialect == "sqlite":
            return f"sqlite:///{self.database}"
        auth = ""
        if self.user is not None or self.password is not None:
            secret = ":***" if self.password is not None else ""
            auth = f"{quote(self.user or '', safe='')}{secret}@"
        host = format_target(self.host or "", self.port) if self.port else (self.host or "")
        if self.host and ":" in self.host and not self.port:
            host = f"[{self.host}]"
        query = "&".join(
            f"{k}={'***' if k == 'password' else quote(v, safe='/')}"
            for k, v in self.options.items()
        )
        scheme = f"{self.dialect}+{self.driver}"
        return f"{scheme}://{auth}{host}/{self.database or ''}" + (f"?{query}" if query else "")

    def connect_arguments(self, reply_timeout: float) -> dict[str, Any]:
        """
        Keyword arguments of the driver's C{connect}: every wait of a connection is bounded
        (so a stuck database holds a pool thread only that long), and the session is
        read-only where the database can say so. The driver's bounds are a second longer
        than C{reply_timeout}, the store's own deadline, which is what the user is told.
        """
        reply_timeout += _DRIVER_MARGIN
        if self.dialect == "sqlite":
            return dict(
                database=f"file:{quote(self.database or '')}?mode=ro",
                uri=True,
                timeout=reply_timeout,
                check_same_thread=False,  # adbapi closes every connection from one thread
            )
        whole_seconds = max(2, math.ceil(reply_timeout))  # libpq's minimum is 2
        if self.dialect == "mysql":
            mysql: dict[str, Any] = dict(
                host=self.host or "localhost",
                port=self.port or _DEFAULT_PORTS["mysql"],
                user=self.user,
                password=self.password or "",
                database=self.database,
                connect_timeout=whole_seconds,
                read_timeout=reply_timeout,
                write_timeout=reply_timeout,
                init_command="SET SESSION TRANSACTION READ ONLY",
            )
            mysql.update(_mysql_options(self.options))
            return mysql
        settings = (
            f"-c default_transaction_read_only=on"
            f" -c statement_timeout={math.ceil(reply_timeout * 1000)}"
        )
        postgres: dict[str, Any] = dict(
            connect_timeout=whole_seconds, tcp_user_timeout=math.ceil(reply_timeout * 1000)
        )
        for name, value in (
            ("host", self.host),
            ("port", self.port),
            ("user", self.user),
            ("password", self.password),
            ("dbname", self.database),
        ):
            if value is not None:
                postgres[name] = value
        postgres.update(self.options)
        postgres["options"] = f"{postgres.get('options', '')} {settings}".strip()
        return postgres

    def placeholder(self) -> str:
        """The driver's parameter marker (PyMySQL and psycopg: ``%s``; sqlite3: ``?``)."""
        return "?" if self.dialect == "sqlite" else "%s"

    def load_driver(self) -> Any:
        """Import the driver, or C{ValueError} saying which extra to install."""
        try:
            module = importlib.import_module(self.driver)
        except ImportError:
            raise ValueError(_INSTALL_HINT.get(self.driver, f"{self.driver} missing")) from None
        if self.dialect == "postgresql":
            try:  # libpq knows its option names: catch a typo now, not at every lookup
                module.conninfo.make_conninfo(**self.connect_arguments(DEFAULT_REPLY_TIMEOUT))
            except module.Error as e:
                raise ValueError(f"the database URL has an option libpq refuses: {e}") from None
        return module


def _split_host(text: str) -> tuple[str | None, int | None]:
    if not text:
        return None, None
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError("the database URL has a malformed [IPv6] host")
        port_text = port_text[1:]
    else:
        host, _, port_text = text.partition(":")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("the database URL's port is not a number from 1 to 65535")
    return host, int(port_text)


def _mysql_options(options: Mapping[str, str]) -> dict[str, Any]:
    """The URL's MySQL options as PyMySQL arguments."""
    converted: dict[str, Any] = {}
    for name, value in _only(dict(options), _MYSQL_OPTIONS).items():
        if name in _MYSQL_BOOLEANS:
            key = "ssl_verify_identity" if name == "ssl_check_hostname" else name
            converted[key] = _boolean(name, value)
        elif name in _MYSQL_SECONDS:
            converted[name] = _positive(name, value)
        else:
            converted[name] = value
    return converted


def _only(options: dict[str, str], known: frozenset[str]) -> dict[str, str]:
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ValueError(f"unknown database URL options {unknown} (known here: {allowed})")
    return options


def _boolean(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"database URL option {name} is not a boolean")


def _positive(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise ValueError(f"database URL option {name} is not a positive number of seconds")
    return seconds


class _ForgivingConnection(adbapi.Connection):
    """adbapi's pooled connection, without the tracebacks of a failed rollback."""

    #: The driver's connection: adbapi (unannotated) starts it as None, then connects at once.
    _connection: Any

    def rollback(self) -> None:
        """
        adbapi logs two tracebacks when the rollback after a failed query fails too (the
        server went away); here the broken connection is just dropped, the next call on
        this thread connects again, and the query's own error is what is reported.
        (``_connection`` and ``_pool`` are adbapi.Connection's own attributes: the test
        ``test_reconnects_after_server_side_close`` fails if adbapi renames them.)
        """
        try:
            self._connection.rollback()
        except Exception:
            self._pool.disconnect(self._connection)


@implementer(ITokenStore, IRevocationFeed)
class NovaTokenStore(Service):
    """
    Nova's ``console_auth_tokens`` as a read-only token store and revocation feed (by
    re-checks). It takes no activity and no single-use claims: nova's table has no column
    for activity, and nova's tokens are reusable until they expire.

    L{lookup} answers as nova's ``console_auth_token_get_valid`` does: a record of any
    console type (one store serves every listener; each listener's gate admits only its own
    type), or C{None} for a token that is unknown or expired. Every call fails with
    L{TokenStoreUnavailable} when the database errs or does not answer within
    C{reply_timeout} seconds of C{clock}.

    A service: C{startService} opens the thread pool (at most C{max_connections} database
    connections, opened on first use), C{stopService} closes it. C{pool} replaces the
    adbapi pool (anything with C{runInteraction} and C{close}), for tests.
    """

    _log = Logger()
    name = "token-store"

    def __init__(
        self,
        database: NovaDatabase,
        clock: IReactorTime,
        *,
        reactor: Any = None,
        recheck_interval: float = DEFAULT_RECHECK_INTERVAL,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool: Any = None,
    ) -> None:
        if not recheck_interval > 0:
            raise ValueError("the re-check interval must be positive")
        self.database = database
        self.recheck_interval = recheck_interval
        self.reply_timeout = reply_timeout
        self._driver = database.load_driver()
        self._clock = clock
        self._reactor = reactor
        self._max_connections = max_connections
        self._pool = pool
        self._own_pool = pool is None
        self._rechecks: list[Callable[[], object]] = []
        self._recheck_loop: LoopingCall | None = None
        self._batch: dict[str, list[Deferred[TokenRecord | None]]] = {}
        self._batch_call: Any = None
        # Records handed out recently, by hash, in two generations swapped at each re-check
        # round: what a live session's token looked like before nova purged its row.
        self._seen: dict[str, TokenRecord] = {}
        self._seen_before: dict[str, TokenRecord] = {}
        mark = database.placeholder()
        self._lookup_sql = (
            f"SELECT {_COLUMNS} FROM {TABLE} WHERE token_hash = {mark} AND expires > {mark}"
        )
        self._ping_sql = f"SELECT token_hash FROM {TABLE} WHERE 1 = 0"

    def __repr__(self) -> str:
        return f"<NovaTokenStore {self.database.redacted_url()}>"

    @property
    def max_wait(self) -> float:
        """The longest any call waits: compare with the WebSocket open-handshake timeout."""
        return self.reply_timeout

    # service

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        if self._own_pool:
            self._pool = adbapi.ConnectionPool(
                self.database.driver,
                cp_min=1,
                cp_max=self._max_connections,
                cp_reactor=self._threads_reactor(),
                cp_noisy=False,
                **self.database.connect_arguments(self.reply_timeout),
            )
            self._pool.connectionFactory = _ForgivingConnection
        self._log.info(
            "token store: nova database {url}, live sessions re-checked every {interval:g} s",
            url=self.database.redacted_url(),
            interval=self.recheck_interval,
        )
        if self._rechecks:
            self._start_rechecks()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        if self._recheck_loop is not None and self._recheck_loop.running:
            self._recheck_loop.stop()
        self._recheck_loop = None
        if self._batch_call is not None and self._batch_call.active():
            self._batch_call.cancel()
        self._batch_call = None
        batch, self._batch = self._batch, {}
        for waiters in batch.values():
            for waiter in waiters:
                waiter.errback(TokenStoreUnavailable("the nova token store is stopping"))
        if self._own_pool and self._pool is not None:
            self._pool.close()
            self._pool = None

    # ITokenStore

    def lookup(self, token: str) -> Deferred[TokenRecord | None]:
        token_hash = hash_token(token)
        now = math.floor(self._clock.seconds())  # nova compares with whole seconds too
        arguments = (token_hash, now)
        found = self._run("lookup", _about(token_hash), self._lookup_sql, arguments)
        return found.addCallback(self._one_record)

    def ping(self) -> Deferred[None]:
        return self._run("ping", "", self._ping_sql, ()).addCallback(lambda _: None)

    # IRevocationFeed

    def lookup_hash(self, token_hash: str) -> Deferred[TokenRecord | None]:
        """
        The row of C{token_hash} whatever its expiry or console type, for re-checks. Calls
        made in one reactor turn (a whole re-check round) share one query per 500 hashes.
        A row gone after its token expired (nova's purge) answers with the record last seen.
        """
        waiter: Deferred[TokenRecord | None] = Deferred()
        self._batch.setdefault(token_hash, []).append(waiter)
        if self._batch_call is None:
            self._batch_call = self._clock.callLater(0, self._run_batch)
        return waiter

    def watch_revocations(
        self,
        on_revoke: Callable[[str], object],
        on_reconnect: Callable[[], object] | None = None,
    ) -> Deferred[None]:
        """
        Nova announces no revocations, so C{on_revoke} is never called; C{on_reconnect} (the
        supervisor's re-check of its live sessions) is called every C{recheck_interval}
        seconds instead, the next round only once the previous one has finished.
        """
        if on_reconnect is not None:
            self._rechecks.append(on_reconnect)
            if self.running and self._recheck_loop is None:
                self._start_rechecks()
        return succeed(None)

    # internals

    def _threads_reactor(self) -> Any:
        if self._reactor is not None:
            return self._reactor
        if IReactorThreads.providedBy(self._clock):
            return self._clock
        from twisted.internet import reactor  # the thread pool reports back through it

        return reactor

    def _run(
        self, what: str, subject: str, sql: str, arguments: Sequence[object]
    ) -> Deferred[list[tuple[Any, ...]]]:
        """
        One query in the pool, retried once on a fresh connection when the driver reports a
        broken one (the database restarted since the last call on that thread); bounded by
        C{reply_timeout}; every failure becomes L{TokenStoreUnavailable} and one log line.
        """
        if self._pool is None:
            return fail(TokenStoreUnavailable("the nova token store is not running"))
        broken = (self._driver.OperationalError, self._driver.InterfaceError)

        def query() -> Deferred[list[tuple[Any, ...]]]:
            return self._pool.runInteraction(_fetch_all, sql, arguments)  # type: ignore[no-any-return]

        def again(failure: Failure) -> Deferred[list[tuple[Any, ...]]]:
            failure.trap(*broken)
            return query()

        running = maybeDeferred(query)
        running.addErrback(again)
        running.addTimeout(self.reply_timeout, self._clock)
        running.addErrback(self._unavailable, what, subject)
        return running

    def _unavailable(self, failure: Failure, what: str, subject: str) -> None:
        if failure.check(TimeoutError):
            why = f"no answer within {self.reply_timeout:g} s"
        elif failure.check(CancelledError):
            why = "cancelled"
        else:
            message = failure.getErrorMessage().strip().splitlines()
            why = f"{type(failure.value).__name__}: {message[0] if message else ''}"
        if self.database.password:
            why = why.replace(self.database.password, "***")
        self._log.warn(
            "token store: {what} failed{subject}: {why}",
            what=what,
            subject=f" for {subject}" if subject else "",
            why=why,
        )
        raise TokenStoreUnavailable(f"nova database {what}: {why}")

    def _one_record(self, rows: list[tuple[Any, ...]]) -> TokenRecord | None:
        if not rows:
            return None
        record = self._record(rows[0])
        if self._recheck_loop is not None:
            self._seen[record.token_hash] = record
        return record

    def _record(self, row: tuple[Any, ...]) -> TokenRecord:
        token_hash, host, port, path, instance_uuid, console_type, expires = row
        try:
            host, port = check_target(str(host), port)
            expires_at = float(expires)
        except (BadTarget, TypeError, ValueError) as e:
            self._log.warn(
                "token store: the nova row of {token} is unusable: {why}",
                token=_about(token_hash),
                why=str(e),
            )
            raise TokenStoreUnavailable(f"nova row of {_about(token_hash)}: {e}") from None
        return TokenRecord(
            token_hash=token_hash,
            host=host,
            port=port,
            instance_uuid=instance_uuid or "",
            console_type=console_type,
            internal_access_path=path or "",
            expires_at=expires_at,
        )

    def _run_batch(self) -> None:
        self._batch_call = None
        batch, self._batch = self._batch, {}
        hashes = list(batch)
        for start in range(0, len(hashes), _RECHECK_BATCH):
            chunk = hashes[start : start + _RECHECK_BATCH]
            marks = ", ".join([self.database.placeholder()] * len(chunk))
            sql = f"SELECT {_COLUMNS} FROM {TABLE} WHERE token_hash IN ({marks})"
            found = self._run("re-check", f"{len(chunk)} tokens", sql, chunk)
            records = found.addCallback(self._records_by_hash)
            records.addBoth(self._answer, {h: batch[h] for h in chunk})

    def _records_by_hash(self, rows: list[tuple[Any, ...]]) -> dict[str, TokenRecord]:
        return {record.token_hash: record for record in map(self._record, rows)}

    def _answer(
        self,
        result: dict[str, TokenRecord] | Failure,
        waiters: dict[str, list[Deferred[TokenRecord | None]]],
    ) -> None:
        now = self._clock.seconds()
        for token_hash, deferreds in waiters.items():
            answer: TokenRecord | Failure | None
            if isinstance(result, Failure):
                answer = result
            else:
                answer = result.get(token_hash)
                if answer is None:
                    last = self._seen.get(token_hash) or self._seen_before.get(token_hash)
                    if last is not None and last.expired(now):
                        answer = last  # purged after expiry: not a revocation
                if answer is not None:
                    self._seen[token_hash] = answer
            for deferred in deferreds:
                if isinstance(answer, Failure):
                    deferred.errback(answer)
                else:
                    deferred.callback(answer)
        if isinstance(result, Failure):
            result.trap(TokenStoreUnavailable)  # told to every waiter; nothing left to log

    def _start_rechecks(self) -> None:
        self._recheck_loop = LoopingCall(self._recheck_round)
        self._recheck_loop.clock = self._clock
        self._recheck_loop.start(self.recheck_interval, now=False)

    def _recheck_round(self) -> Deferred[None]:
        self._seen_before, self._seen = self._seen, {}
        rounds = [maybeDeferred(recheck) for recheck in self._rechecks]

        def failed(failure: Failure) -> None:  # the loop must go on whatever happened
            self._log.failure("token store: a re-check of live sessions failed", failure)

        return gatherResults(rounds, consumeErrors=True).addCallbacks(lambda _: None, failed)


def _fetch_all(transaction: Any, sql: str, arguments: Sequence[object]) -> list[tuple[Any, ...]]:
    transaction.execute(sql, tuple(arguments))
    return [tuple(row) for row in transaction.fetchall()]


def _about(token_hash: str) -> str:
    return f"token {token_id_of(token_hash)}"


__all__ = [
    "DEFAULT_RECHECK_INTERVAL",
    "SOURCE_PREFIX",
    "TABLE",
    "NovaDatabase",
    "NovaTokenStore",
]
