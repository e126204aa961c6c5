"""The in-memory token store: for embedding vncmux in another program, and for tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from vncmux.interfaces import (
    IActivitySink,
    IRevocationFeed,
    ISingleUse,
    ITokenAdmin,
    ITokenStore,
)
from vncmux.tokens.errors import TokenStoreUnavailable
from vncmux.tokens.record import TokenRecord, hash_token


@implementer(ITokenStore, ITokenAdmin, IActivitySink, ISingleUse, IRevocationFeed)
class MemoryTokenStore:
    """
    A token store in a dict, with revocation callbacks and single-use claims: for embedding
    vncmux in another program (one process, no Redis), and for tests.
    """

    def __init__(self, records: dict[str, TokenRecord] | None = None) -> None:
        self._records: dict[str, TokenRecord] = dict(records or {})
        self._used: set[str] = set()
        self._watchers: list[Callable[[str], object]] = []
        self.available = True

    def add(self, token: str, host: str, port: int, **fields: object) -> TokenRecord:
        """Store a record for C{token} at once (a convenience for tests and embedding)."""
        record = TokenRecord(hash_token(token), host, port, **fields)  # type: ignore[arg-type]
        self._records[record.token_hash] = record
        return record

    def _unavailable(self) -> Deferred[Any]:
        return fail(TokenStoreUnavailable("memory store marked unavailable"))

    def lookup(self, token: str) -> Deferred[TokenRecord | None]:
        return self.lookup_hash(hash_token(token))

    def lookup_hash(self, token_hash: str) -> Deferred[TokenRecord | None]:
        if not self.available:
            return self._unavailable()
        return succeed(self._records.get(token_hash))

    def ping(self) -> Deferred[None]:
        return succeed(None) if self.available else self._unavailable()

    def issue(self, record: TokenRecord, token: str) -> Deferred[None]:
        self._records[hash_token(token)] = replace(record, token_hash=hash_token(token))
        return succeed(None)

    def revoke(self, token_hash: str) -> Deferred[bool]:
        found = self._records.pop(token_hash, None) is not None
        self._publish(token_hash)
        return succeed(found)

    def revoke_instance(self, instance_uuid: str) -> Deferred[int]:
        doomed = [h for h, r in self._records.items() if r.instance_uuid == instance_uuid]
        for token_hash in doomed:
            del self._records[token_hash]
        self._publish(f"instance:{instance_uuid}")
        return succeed(len(doomed))

    def _publish(self, message: str) -> None:
        for watcher in self._watchers:
            watcher(message)

    def record_activity(self, updates: Mapping[str, float]) -> Deferred[None]:
        if not self.available:
            return self._unavailable()
        for token_hash, stamp in updates.items():
            record = self._records.get(token_hash)
            if record is not None and (record.last_activity_at or 0.0) < stamp:
                self._records[token_hash] = replace(record, last_activity_at=stamp)
        return succeed(None)

    def claim_use(self, token_hash: str) -> Deferred[bool]:
        """Like Redis: only an existing token can be claimed, and only once."""
        if not self.available:
            return self._unavailable()
        if token_hash not in self._records:
            return succeed(False)
        first = token_hash not in self._used
        self._used.add(token_hash)
        return succeed(first)

    def watch_revocations(
        self,
        on_revoke: Callable[[str], object],
        on_reconnect: Callable[[], object] | None = None,
    ) -> Deferred[None]:
        """Revocations in this process are told at once; there is no connection to lose."""
        self._watchers.append(on_revoke)
        return succeed(None)
