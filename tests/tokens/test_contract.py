"""
The one contract every token store honours (memory, file, Redis), and the backchannel
contract of the stores shared by live sessions (memory, Redis).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.tokens.support import OTHER, TOKEN, Inbox, RedisStoreMixin, make_record
from vncmux.interfaces import (
    IActivitySink,
    IHashLookup,
    IRevocationFeed,
    ISingleUse,
    ITokenAdmin,
    ITokenStore,
)
from vncmux.tokens import (
    FileTokenStore,
    MemoryTokenStore,
    RedisTokenStore,
    UnsupportedOperation,
    hash_token,
)


class TokenStoreContract:
    """ITokenStore + ITokenAdmin behaviour shared by every store; subclasses say what they keep."""

    #: The store keeps expiry, instance, limits and password (a token file does not).
    rich_records = True

    def make_store(self) -> Any:
        raise NotImplementedError

    def test_provides_interfaces(self) -> None:
        """The store provides ITokenStore and ITokenAdmin, checked with verifyObject."""
        store = self.make_store()
        verifyObject(ITokenStore, store)
        verifyObject(ITokenAdmin, store)

    @inlineCallbacks
    def test_unknown_token(self) -> Any:
        """An unknown token is C{None}, not an error."""
        store = self.make_store()
        self.assertIsNone((yield store.lookup("no-such-token")))

    @inlineCallbacks
    def test_issue_then_lookup(self) -> Any:
        """An issued token looks up to its target, named by the hash of the token."""
        store = self.make_store()
        yield store.issue(make_record(TOKEN), TOKEN)
        found = yield store.lookup(TOKEN)
        self.assertEqual((found.host, found.port), ("10.0.0.5", 5900))
        self.assertEqual(found.token_hash, hash_token(TOKEN))
        self.assertEqual(found.token_id, hash_token(TOKEN)[:12])
        self.assertIsNone((yield store.lookup(OTHER)))

    @inlineCallbacks
    def test_ipv6_target(self) -> Any:
        """An IPv6 backend round-trips without brackets in C{host}."""
        store = self.make_store()
        yield store.issue(make_record(TOKEN, host="fd00::5", port=5901), TOKEN)
        found = yield store.lookup(TOKEN)
        self.assertEqual(
            (found.host, found.port, found.target), ("fd00::5", 5901, "[fd00::5]:5901")
        )

    @inlineCallbacks
    def test_revoke(self) -> Any:
        """Revoking deletes the record once; other tokens stay."""
        store = self.make_store()
        yield store.issue(make_record(TOKEN), TOKEN)
        yield store.issue(make_record(OTHER, port=5902), OTHER)
        self.assertIs((yield store.revoke(hash_token(TOKEN))), True)
        self.assertIsNone((yield store.lookup(TOKEN)))
        self.assertIs((yield store.revoke(hash_token(TOKEN))), False)
        self.assertEqual((yield store.lookup(OTHER)).port, 5902)

    @inlineCallbacks
    def test_ping(self) -> Any:
        """A healthy store answers a ping with C{None}."""
        store = self.make_store()
        self.assertIsNone((yield store.ping()))

    @inlineCallbacks
    def test_rich_record_round_trip(self) -> Any:
        """Expiry, instance, limits and password survive (or are refused with a clear error)."""
        store = self.make_store()
        record = make_record(
            TOKEN,
            instance_uuid="3f1c2b9e-0000-4000-8000-000000000001",
            issued_at=1000.0,
            expires_at=10**10,
            max_sessions=2,
            single_use=True,
            password="vnc-pass",
        )
        if not self.rich_records:
            failure = yield self.assertFailure(store.issue(record, TOKEN), UnsupportedOperation)
            self.assertIn("redis://", str(failure))
            return
        yield store.issue(record, TOKEN)
        self.assertEqual((yield store.lookup(TOKEN)), record)

    @inlineCallbacks
    def test_revoke_instance(self) -> Any:
        """Revoking an instance removes all of its tokens and only those."""
        store = self.make_store()
        if not self.rich_records:
            yield self.assertFailure(store.revoke_instance("i-1"), UnsupportedOperation)
            return
        third = "third-secret-token-aaaaaaaaaaaaaaaaaaaaaaaaaa"
        yield store.issue(make_record(TOKEN, instance_uuid="i-1"), TOKEN)
        yield store.issue(make_record(OTHER, instance_uuid="i-1"), OTHER)
        yield store.issue(make_record(third, instance_uuid="i-2"), third)
        self.assertEqual((yield store.revoke_instance("i-1")), 2)
        self.assertIsNone((yield store.lookup(TOKEN)))
        self.assertIsNone((yield store.lookup(OTHER)))
        self.assertIsNotNone((yield store.lookup(third)))
        self.assertEqual((yield store.revoke_instance("i-1")), 0)


class MemoryTokenStoreContractTests(TokenStoreContract, TestCase):
    """The contract against MemoryTokenStore."""

    def make_store(self) -> MemoryTokenStore:
        return MemoryTokenStore()


class FileTokenStoreContractTests(TokenStoreContract, TestCase):
    """The contract against FileTokenStore (a file cannot keep rich records)."""

    rich_records = False

    def make_store(self) -> FileTokenStore:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# tokens\n")
        return FileTokenStore(path, Clock())


class RedisTokenStoreContractTests(RedisStoreMixin, TokenStoreContract, TestCase):
    """The contract against RedisTokenStore and a real redis-server."""

    def make_store(self) -> RedisTokenStore:
        return self.redis_store(self.start_server())


class BackchannelContract:
    """What live sessions write back to and hear from a shared store: the behaviour of
    IActivitySink, ISingleUse and IRevocationFeed (with IHashLookup), shared by every store
    that provides them."""

    def make_store(self) -> Any:
        raise NotImplementedError

    def test_provides_backchannel(self) -> None:
        """The store provides each of the sessions' interfaces, checked with verifyObject."""
        store = self.make_store()
        for interface in (IActivitySink, ISingleUse, IRevocationFeed, IHashLookup):
            verifyObject(interface, store)

    @inlineCallbacks
    def test_lookup_hash(self) -> Any:
        """A record is found by its hash until it is revoked; an unknown hash is C{None}."""
        store = self.make_store()
        yield store.issue(make_record(TOKEN, port=5901), TOKEN)
        self.assertEqual((yield store.lookup_hash(hash_token(TOKEN))).port, 5901)
        self.assertIsNone((yield store.lookup_hash(hash_token(OTHER))))
        yield store.revoke(hash_token(TOKEN))
        self.assertIsNone((yield store.lookup_hash(hash_token(TOKEN))))

    @inlineCallbacks
    def test_claim_use(self) -> Any:
        """The first claim of a token wins, later ones lose; unknown or revoked ones never win."""
        store = self.make_store()
        yield store.issue(make_record(TOKEN, single_use=True), TOKEN)
        yield store.issue(make_record(OTHER, single_use=True), OTHER)
        claims = []
        for _ in range(3):
            claims.append((yield store.claim_use(hash_token(TOKEN))))
        self.assertEqual(claims, [True, False, False])
        self.assertIs((yield store.claim_use(hash_token("never-issued"))), False)
        self.assertIsNone((yield store.lookup("never-issued")), "a claim creates nothing")
        yield store.revoke(hash_token(OTHER))
        self.assertIs((yield store.claim_use(hash_token(OTHER))), False)
        self.assertEqual((yield store.lookup(TOKEN)).port, 5900)

    @inlineCallbacks
    def test_record_activity(self) -> Any:
        """last_activity_at only moves forward, and unknown tokens are not created."""
        store = self.make_store()
        yield store.issue(make_record(TOKEN), TOKEN)
        updates = {hash_token(TOKEN): 1700000100, hash_token(OTHER): 1700000100}
        self.assertIsNone((yield store.record_activity(updates)))
        self.assertEqual((yield store.lookup(TOKEN)).last_activity_at, 1700000100)
        yield store.record_activity({hash_token(TOKEN): 1700000000})
        self.assertEqual((yield store.lookup(TOKEN)).last_activity_at, 1700000100)
        self.assertIsNone((yield store.lookup(OTHER)))
        self.assertIsNone((yield store.record_activity({})))

    @inlineCallbacks
    def test_watch_revocations(self) -> Any:
        """Watchers hear a revoked token's hash, and ``instance:<uuid>`` for an instance."""
        store = self.make_store()
        inbox = Inbox()
        yield store.watch_revocations(inbox.put)
        yield store.issue(make_record(TOKEN, instance_uuid="i-1"), TOKEN)
        heard = inbox.next()
        yield store.revoke(hash_token(TOKEN))
        self.assertEqual((yield heard), hash_token(TOKEN))
        heard = inbox.next()
        yield store.revoke_instance("i-1")
        self.assertEqual((yield heard), "instance:i-1")


class MemoryBackchannelTests(BackchannelContract, TestCase):
    """The backchannel contract against MemoryTokenStore."""

    def make_store(self) -> MemoryTokenStore:
        return MemoryTokenStore()


class RedisBackchannelTests(RedisStoreMixin, BackchannelContract, TestCase):
    """The backchannel contract against RedisTokenStore and a real redis-server."""

    def make_store(self) -> RedisTokenStore:
        return self.redis_store(self.start_server())
