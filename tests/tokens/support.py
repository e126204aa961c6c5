"""Helpers shared by the token store tests: tokens, records, log lines, a real Redis."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent

from tests.redis_server import RedisServer, start_redis
from vncmux.tokens import RedisConfig, RedisTokenStore, TokenRecord, hash_token

TOKEN = "s3cr3t-T0ken_abcdefghijklmnopqrstuvwxyz012345"
OTHER = "another-secret-token-9876543210zyxwvutsrqponm"


def make_record(token: str, host: str = "10.0.0.5", port: int = 5900, **fields: Any) -> TokenRecord:
    """A record for C{token}, at a default target unless told."""
    return TokenRecord(token_hash=hash_token(token), host=host, port=port, **fields)


def log_messages(observer: EventLoggingObserver) -> list[str]:
    """The formatted text of every event C{observer} saw."""
    return [formatEvent(event) for event in observer]


class Inbox:
    """Collects revocation messages; C{next()} is a Deferred for the next one."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._waiting: list[Deferred[str]] = []

    def put(self, message: str) -> None:
        self.messages.append(message)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(message)

    def next(self) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self._waiting.append(d)
        return d


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """
    Run as ``nobody`` for a moment when the tests run as root, for whom every file is
    readable: only then does a mode-000 file fail to open.
    """
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


class RedisStoreMixin:
    """Starts a real redis-server and a RedisTokenStore on the real reactor for one test."""

    timeout = 30

    def start_server(self, *extra_args: str) -> RedisServer:
        return start_redis(self, extra_args)

    def redis_store(self, server: RedisServer, query: str = "", **kwargs: Any) -> RedisTokenStore:
        store = RedisTokenStore(
            RedisConfig.from_url(server.url(query=query)), reactor, reactor=reactor, **kwargs
        )
        store.startService()
        self.addCleanup(store.stopService)  # type: ignore[attr-defined]
        return store


hostnames = st.from_regex(
    r"\A[a-z0-9]([a-z0-9-]{0,12}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,12}[a-z0-9])?){0,3}\Z"
)
hosts = st.one_of(
    hostnames,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.integers(min_value=1, max_value=65535)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
record_objects = st.dictionaries(
    st.sampled_from(
        ["host", "port", "instance_uuid", "issued_at", "expires_at", "max_sessions",
         "single_use", "password", "console_type"]
    ),
    st.one_of(json_values, hosts, ports.map(str)),
)  # fmt: skip
