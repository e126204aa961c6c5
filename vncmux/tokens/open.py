"""L{open_token_store}: the one place that turns a ``--tokens`` value into a token store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime

from vncmux.tokens.file import FileTokenStore
from vncmux.tokens.redis.config import (
    DEFAULT_REPLY_TIMEOUT,
    SCHEMES,
    SENTINEL_TLS_SCHEMES,
    RedisConfig,
)
from vncmux.tokens.redis.store import RedisTokenStore

if TYPE_CHECKING:
    from vncmux.novadb import NovaTokenStore

#: ``--tokens nova:URL``: nova's own database (vncmux.novadb).
NOVA_SOURCE_PREFIX = "nova:"


def open_token_store(
    source: str,
    clock: IReactorTime,
    *,
    connect_timeout: float | None = None,
    reply_timeout: float | None = None,
    reactor: Any = None,
    nova_recheck_interval: float | None = None,
) -> FileTokenStore | RedisTokenStore | NovaTokenStore:
    """
    The token store a ``--tokens`` value names: ``file:PATH`` (relative to the current
    directory), ``redis://…``, ``rediss://…``, ``redis+sentinel://…`` or ``nova:URL`` (nova's
    ``[database] connection`` URL). Redis and nova stores are IServices: start them (e.g.
    C{setServiceParent}) before use; C{nova_recheck_interval} of C{None} is the nova store's
    default. C{ValueError} for anything else.
    """
    if source.startswith("file:"):
        path = source[len("file:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("file: needs a path, e.g. file:etc/tokens")
        return FileTokenStore(path, clock)
    if source.startswith(NOVA_SOURCE_PREFIX):
        # Here, not at the top: novadb imports this package (records, targets), so a module
        # import either way round would break whichever of the two is imported first.
        from vncmux.novadb import DEFAULT_RECHECK_INTERVAL, NovaDatabase, NovaTokenStore

        return NovaTokenStore(
            NovaDatabase.from_url(source[len(NOVA_SOURCE_PREFIX) :]),
            clock,
            reactor=reactor,
            reply_timeout=reply_timeout or DEFAULT_REPLY_TIMEOUT,
            recheck_interval=(
                DEFAULT_RECHECK_INTERVAL if nova_recheck_interval is None else nova_recheck_interval
            ),
        )
    scheme = source.partition("://")[0].lower() if "://" in source else ""
    if scheme in SCHEMES or scheme in SENTINEL_TLS_SCHEMES:
        config = RedisConfig.from_url(
            source, connect_timeout=connect_timeout, reply_timeout=reply_timeout
        )
        return RedisTokenStore(config, clock, reactor=reactor)
    shown = f"{scheme}://…" if scheme else "this value"
    raise ValueError(
        f"unknown token source ({shown}): use file:PATH, redis://[:password@]host:port/db,"
        " rediss://…, redis+sentinel://h1:p1,h2:p2/master or nova:DATABASE_URL"
    )
