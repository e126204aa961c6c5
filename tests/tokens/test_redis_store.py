"""
The Redis token store against a real redis-server: layout, backchannel, failures, TLS and
Sentinel.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from typing import Any
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.redis_server import RedisServer, make_tls_files, start_redis
from tests.tokens.support import OTHER, TOKEN, Inbox, RedisStoreMixin, log_messages, make_record
from vncmux.tokens import (
    INSTANCE_KEY_PREFIX,
    REVOKE_CHANNEL,
    GuardSet,
    RedisConfig,
    RedisTokenStore,
    TokenStoreUnavailable,
    UnsupportedOperation,
    hash_token,
    token_key,
)
from vncmux.tokens.redis.client import pool_factories
from vncmux.tokens.redis.scripts import INSTANCE_PRUNE_THRESHOLD


class RedisTokenStoreTests(RedisStoreMixin, TestCase):
    """The Redis layout (docs/running.md) on a real redis-server."""

    def setUp(self) -> None:
        self.server = self.start_server()
        self.redis = self.server.client()
        self.addCleanup(self.redis.close)
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    @inlineCallbacks
    def test_layout(self) -> Any:
        """A HASH per token hash with the record's fields and a TTL; a SET per instance."""
        store = self.redis_store(self.server, expired_grace=60)
        now = reactor.seconds()
        record = make_record(TOKEN, instance_uuid="i-1", issued_at=now, expires_at=now + 600,
                         password="vnc-pass")  # fmt: skip
        yield store.issue(record, TOKEN)
        key = token_key(hash_token(TOKEN))
        self.assertEqual(self.redis.hgetall(key), record.to_fields())
        self.assertTrue(600 < self.redis.ttl(key) <= 661, self.redis.ttl(key))
        instance = INSTANCE_KEY_PREFIX + "i-1"
        self.assertEqual(self.redis.smembers(instance), {hash_token(TOKEN)})
        self.assertTrue(600 < self.redis.ttl(instance) <= 661)

        yield store.issue(make_record(OTHER, instance_uuid="i-1"), OTHER)
        self.assertEqual(self.redis.ttl(token_key(hash_token(OTHER))), -1, "no expiry, no TTL")
        self.assertEqual(self.redis.ttl(instance), -1, "the set lives as long as its tokens")

    @inlineCallbacks
    def test_token_is_never_stored(self) -> Any:
        """Neither key names nor values contain the raw token."""
        store = self.redis_store(self.server)
        yield store.issue(make_record(TOKEN, instance_uuid="i-1"), TOKEN)
        yield store.claim_use(hash_token(TOKEN))
        dump = []
        for key in self.redis.keys("*"):
            kind = self.redis.type(key)
            value = self.redis.hgetall(key) if kind == "hash" else self.redis.smembers(key)
            dump.append(f"{key} {value}")
        self.assertEqual(len(dump), 2)
        self.assertNotIn(TOKEN, "\n".join(dump))

    @inlineCallbacks
    def test_database_and_password(self) -> Any:
        """The URL's database and password are used (and auth covers the subscriber)."""
        server = self.start_server("--requirepass", "hunter2")
        url = f"redis://:hunter2@127.0.0.1:{server.port}/3"
        store = RedisTokenStore(RedisConfig.from_url(url), reactor, reactor=reactor)
        store.startService()
        self.addCleanup(store.stopService)
        yield store.watch_revocations(lambda message: None)
        yield store.issue(make_record(TOKEN), TOKEN)
        client = server.client(password="hunter2", db=3)
        self.addCleanup(client.close)
        self.assertEqual(client.hget(token_key(hash_token(TOKEN)), "port"), "5900")
        self.assertNotIn("hunter2", "\n".join(log_messages(self.log)))

    @inlineCallbacks
    def test_websockify_format(self) -> Any:
        """format=websockify reads ``websockify:<token>`` keys (websockify's TokenRedis with a
        namespace): host:port, {"host": ...} and nova JSON."""
        store = self.redis_store(self.server, query="format=websockify")
        self.redis.set("websockify:tok-plain", "10.0.0.1:5900")
        self.redis.set("websockify:tok-json", json.dumps({"host": "[fd00::1]:5901"}))
        self.redis.set("websockify:tok-nova", json.dumps({"host": "10.0.0.3", "port": "5902",
                                                          "instance_uuid": "u-1"}))  # fmt: skip
        self.assertEqual((yield store.lookup("tok-plain")).target, "10.0.0.1:5900")
        self.assertEqual((yield store.lookup("tok-json")).target, "[fd00::1]:5901")
        nova = yield store.lookup("tok-nova")
        self.assertEqual((nova.target, nova.instance_uuid), ("10.0.0.3:5902", "u-1"))
        self.assertEqual(nova.token_hash, hash_token("tok-nova"))
        self.assertIsNone((yield store.lookup("tok-missing")))
        yield self.assertFailure(store.issue(make_record(TOKEN), TOKEN), UnsupportedOperation)
        yield self.assertFailure(store.revoke(hash_token(TOKEN)), UnsupportedOperation)
        self.assertIs((yield store.claim_use(hash_token("tok-plain"))), True)
        self.assertIs((yield store.claim_use(hash_token("tok-plain"))), False)

    @inlineCallbacks
    def test_websockify_namespace(self) -> Any:
        """Only keys under the namespace are tokens: a key elsewhere in the database whose
        value looks like a target opens nothing, whatever the client sends as its token."""
        self.redis.set("app:cache:backend", "10.0.0.9:22")
        self.redis.set("consoles:tok", "10.0.0.1:5900")
        default = self.redis_store(self.server, query="format=websockify")
        custom = self.redis_store(self.server, query="format=websockify&namespace=consoles")
        self.assertIsNone((yield default.lookup("app:cache:backend")))
        self.assertIsNone((yield custom.lookup("app:cache:backend")))
        self.assertIsNone((yield default.lookup("tok")))
        self.assertEqual((yield custom.lookup("tok")).target, "10.0.0.1:5900")

    @inlineCallbacks
    def test_websockify_foreign_values_are_invalid_tokens(self) -> Any:
        """A websockify key of another type, or a value that is not a target, makes the token
        invalid (lookup answers None, so the client gets 4401 and no store error is
        counted); the log names the token_id, never the token or the stored value."""
        canary = "hunter2-stored-canary"
        self.redis.set("websockify:tok-garbage", f"not a target {canary}")
        self.redis.set("websockify:tok-json", json.dumps({"host": canary}))
        self.redis.set("websockify:tok-bytes", b"\xff\xfe" + canary.encode())
        self.redis.hset("websockify:tok-hash", "host", "10.0.0.1:5900")
        self.redis.sadd("websockify:tok-set", canary)
        websockify = self.redis_store(self.server, query="format=websockify")
        tokens = ["tok-garbage", "tok-json", "tok-bytes", "tok-hash", "tok-set"]
        for token in tokens:
            self.assertIsNone((yield websockify.lookup(token)), token)
        messages = log_messages(self.log)
        for token in tokens:
            self.assertTrue([m for m in messages if hash_token(token)[:12] in m], token)
        self.assertFalse([m for m in messages if canary in m or "tok-" in m], messages)

    @inlineCallbacks
    def test_garbage_is_unavailable(self) -> Any:
        """Native records that are not records fail as TokenStoreUnavailable (vncmux wrote
        them: the store is broken), logged by token_id and without the stored value."""
        canary = "hunter2-stored-canary"
        self.redis.hset(token_key(hash_token(TOKEN)), mapping={"port": "5900", "x": canary})
        self.redis.hset(token_key(hash_token(OTHER)), mapping={"host": canary, "port": "x"})
        native = self.redis_store(self.server)
        yield self.assertFailure(native.lookup(TOKEN), TokenStoreUnavailable)
        yield self.assertFailure(native.lookup(OTHER), TokenStoreUnavailable)
        self.redis.set(token_key(hash_token(OTHER)), "a string, not a hash")
        yield self.assertFailure(native.lookup(OTHER), TokenStoreUnavailable)
        messages = log_messages(self.log)
        self.assertTrue([m for m in messages if hash_token(TOKEN)[:12] in m])
        for secret in (canary, TOKEN, OTHER):
            self.assertFalse([m for m in messages if secret in m])

    @inlineCallbacks
    def test_lookup_reads_any_text(self) -> Any:
        """The lookup reads a record as one JSON reply: values with quotes, backslashes,
        slashes, control characters and non-ASCII text come back as issued; a value that is
        not UTF-8 fails the lookup as the store being broken."""
        store = self.redis_store(self.server)
        odd = 'a"b\\c/d\te\u00e9\u4e2d\U0001f600'
        record = make_record(TOKEN, instance_uuid=odd, password=odd)
        yield store.issue(record, TOKEN)
        found = yield store.lookup(TOKEN)
        self.assertEqual((found.instance_uuid, found.password), (odd, odd))
        self.assertEqual(found.to_fields(), record.to_fields())
        self.redis.hset(token_key(hash_token(OTHER)), "host", b"\xff\xfe")
        yield self.assertFailure(store.lookup(OTHER), TokenStoreUnavailable)

    def calls(self, command: str) -> int:
        """How many times the server ran C{command}, from scripts too."""
        return int(self.redis.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    @inlineCallbacks
    def test_guarded_lookup(self) -> Any:
        """lookup_unless_set answers as lookup while its guard key is absent (in one round
        trip), fails with GuardSet without reading the token when it is set, and reports
        broken records as lookup does: in both layouts."""
        native = self.redis_store(self.server)
        websockify = self.redis_store(self.server, query="format=websockify")
        yield native.issue(make_record(TOKEN), TOKEN)
        self.redis.set("websockify:tok", "10.0.0.1:5900")
        self.redis.hset("websockify:tok-hash", "host", "10.0.0.1:5900")
        self.redis.set(token_key(hash_token(OTHER)), "a string, not a hash")
        guard = "vncmux:blocked:192.0.2.7"

        scripts = self.calls("evalsha") + self.calls("eval")
        found = yield native.lookup_unless_set(TOKEN, guard)
        self.assertEqual(self.calls("evalsha") + self.calls("eval") - scripts, 1)
        self.assertEqual(found.to_fields(), (yield native.lookup(TOKEN)).to_fields())
        self.assertIsNone((yield native.lookup_unless_set("unknown", guard)))
        yield self.assertFailure(native.lookup_unless_set(OTHER, guard), TokenStoreUnavailable)
        self.assertEqual((yield websockify.lookup_unless_set("tok", guard)).target, "10.0.0.1:5900")
        self.assertIsNone((yield websockify.lookup_unless_set("tok-hash", guard)))

        self.redis.set(guard, "1")
        before = [self.calls(command) for command in ("exists", "hgetall", "get")]
        yield self.assertFailure(native.lookup_unless_set(TOKEN, guard), GuardSet)
        yield self.assertFailure(websockify.lookup_unless_set("tok", guard), GuardSet)
        after = [self.calls(command) for command in ("exists", "hgetall", "get")]
        self.assertEqual([a - b for a, b in zip(after, before, strict=True)], [2, 0, 0])

    @inlineCallbacks
    def test_revoke_publishes(self) -> Any:
        """Revoking publishes the token hash; revoking an instance publishes instance:<uuid>."""
        store = self.redis_store(self.server)
        pubsub = self.redis.pubsub()
        self.addCleanup(pubsub.close)
        pubsub.subscribe(REVOKE_CHANNEL)
        self.assertEqual(pubsub.get_message(timeout=5)["type"], "subscribe")
        yield store.issue(make_record(TOKEN, instance_uuid="i-1"), TOKEN)
        yield store.issue(make_record(OTHER, instance_uuid="i-2"), OTHER)

        self.assertIs((yield store.revoke(hash_token(TOKEN))), True)
        self.assertEqual(pubsub.get_message(timeout=5)["data"], hash_token(TOKEN))
        self.assertEqual(self.redis.smembers(INSTANCE_KEY_PREFIX + "i-1"), set())

        self.assertEqual((yield store.revoke_instance("i-2")), 1)
        self.assertEqual(pubsub.get_message(timeout=5)["data"], "instance:i-2")
        self.assertEqual(self.redis.keys("*"), [])

    @inlineCallbacks
    def test_record_activity(self) -> Any:
        """One round trip for many tokens; only forward; deleted keys are not re-created."""
        store = self.redis_store(self.server)
        live, revoked, never = hash_token(TOKEN), hash_token(OTHER), hash_token("never")
        yield store.issue(make_record(TOKEN), TOKEN)
        yield store.issue(make_record(OTHER), OTHER)
        yield store.revoke(revoked)
        yield store.ping()

        monitor = self.redis.monitor()
        monitor.__enter__()
        self.addCleanup(monitor.__exit__)
        yield store.record_activity({live: 1700000100, revoked: 1700000100, never: 1700000100.5})
        self.redis.echo("end-of-test-traffic")
        commands = []
        while True:
            command = monitor.next_command()
            if "end-of-test-traffic" in command["command"]:
                break
            commands.append(command)
        test_client = command["client_port"]
        sent = [
            c["command"].split()[0]
            for c in commands
            if c["client_type"] != "lua" and c["client_port"] != test_client
        ]
        self.assertEqual(len(sent), 1, commands)
        self.assertIn(sent[0], ("EVAL", "EVALSHA"))

        self.assertEqual(self.redis.hget(token_key(live), "last_activity_at"), "1700000100")
        self.assertEqual(self.redis.exists(token_key(revoked), token_key(never)), 0)
        yield store.record_activity({live: 1700000000})
        self.assertEqual((yield store.lookup(TOKEN)).last_activity_at, 1700000100)
        self.assertIsNone((yield store.record_activity({})))

    @inlineCallbacks
    def test_watch_revocations_survives_restart(self) -> Any:
        """The subscriber hears revocations, and again after Redis restarts on the same port;
        the re-check callback runs once, when the pool can read records again."""
        store = self.redis_store(self.server, resubscribe_policy=lambda attempt: 0.05)
        inbox, reconnects = Inbox(), []
        rechecked: Deferred[None] = Deferred()

        def on_reconnect() -> None:
            reconnects.append(True)
            rechecked.callback(None)

        yield store.watch_revocations(inbox.put, on_reconnect)
        heard = inbox.next()
        yield store.revoke(hash_token(TOKEN))
        self.assertEqual((yield heard), hash_token(TOKEN))

        subscribed_again = store.next_subscription()
        self.server.restart()
        yield subscribed_again
        heard = inbox.next()
        self.server.client().publish(REVOKE_CHANNEL, "instance:i-9")
        self.assertEqual((yield heard), "instance:i-9")
        self.assertEqual(inbox.messages, [hash_token(TOKEN), "instance:i-9"])
        yield rechecked
        yield store.lookup(TOKEN)  # the pool answers again
        self.assertEqual(reconnects, [True])

    @inlineCallbacks
    def test_redis_down(self) -> Any:
        """With Redis stopped, calls fail with TokenStoreUnavailable within the reply timeout."""
        store = self.redis_store(self.server, query="reply_timeout=0.5")
        yield store.ping()
        self.server.stop()
        for _ in range(2):  # on the dead connection, then at once: none is back yet
            started = reactor.seconds()
            failure = yield self.assertFailure(store.lookup(TOKEN), TokenStoreUnavailable)
            self.assertLess(reactor.seconds() - started, 0.5 + 0.5, str(failure))
        yield self.assertFailure(store.ping(), TokenStoreUnavailable)
        yield self.assertFailure(store.issue(make_record(TOKEN), TOKEN), TokenStoreUnavailable)
        messages = log_messages(self.log)
        self.assertTrue([m for m in messages if hash_token(TOKEN)[:12] in m])
        self.assertFalse([m for m in messages if TOKEN in m])

    @inlineCallbacks
    def test_revoke_recomputes_instance_ttl(self) -> Any:
        """
        The instance SET lives as long as its longest-lived token: revoking the token without
        expiry that made it PERSIST gives it the TTL of the tokens left, and revoking the last
        one deletes it.
        """
        store = self.redis_store(self.server, expired_grace=0)
        instance = INSTANCE_KEY_PREFIX + "i-1"
        yield store.issue(make_record(TOKEN, instance_uuid="i-1"), TOKEN)
        expires_at = reactor.seconds() + 600
        yield store.issue(make_record(OTHER, instance_uuid="i-1", expires_at=expires_at), OTHER)
        self.assertEqual(self.redis.ttl(instance), -1)
        yield store.revoke(hash_token(TOKEN))
        self.assertTrue(590 < self.redis.ttl(instance) <= 600, self.redis.ttl(instance))
        yield store.revoke(hash_token(OTHER))
        self.assertEqual(self.redis.exists(instance), 0)

    @inlineCallbacks
    def test_instance_set_pruning(self) -> Any:
        """
        Issuing sweeps an instance SET of members whose token key is gone (expired), but only
        once it has INSTANCE_PRUNE_THRESHOLD members: below that, issuing stays O(1).
        """
        store = self.redis_store(self.server)
        instance = INSTANCE_KEY_PREFIX + "i-1"
        tokens = [f"token-{n:03d}" for n in range(INSTANCE_PRUNE_THRESHOLD)]
        for token in tokens[:-1]:
            yield store.issue(make_record(token, instance_uuid="i-1"), token)
        # Their keys expire; Redis does not take the hashes out of the SET.
        self.redis.delete(*[token_key(hash_token(t)) for t in tokens[:-2]])
        yield store.issue(make_record(tokens[-1], instance_uuid="i-1"), tokens[-1])
        self.assertEqual(self.redis.scard(instance), INSTANCE_PRUNE_THRESHOLD, "not swept yet")
        yield store.issue(make_record(TOKEN, instance_uuid="i-1"), TOKEN)
        self.assertEqual(
            self.redis.smembers(instance), {hash_token(t) for t in (tokens[-2], tokens[-1], TOKEN)}
        )

    @inlineCallbacks
    def test_record_activity_in_batches(self) -> Any:
        """More than 1000 tokens go in several script calls, and every one of them lands."""
        store = self.redis_store(self.server)
        hashes = [hash_token(f"token-{n}") for n in range(2500)]
        with self.redis.pipeline(transaction=False) as pipe:
            for token_hash in hashes:
                pipe.hset(token_key(token_hash), mapping={"host": "h", "port": "1"})
            pipe.execute()
        yield store.record_activity({h: 1700000000 + n for n, h in enumerate(hashes)})
        with self.redis.pipeline(transaction=False) as pipe:
            for token_hash in hashes:
                pipe.hget(token_key(token_hash), "last_activity_at")
            written = pipe.execute()
        self.assertEqual(written, [str(1700000000 + n) for n in range(len(hashes))])

    @inlineCallbacks
    def test_record_activity_in_batches_fails_as_one(self) -> Any:
        """A failed batched write fails with TokenStoreUnavailable (not a FirstError)."""
        store = self.redis_store(self.server, query="reply_timeout=0.5")
        yield store.ping()
        self.server.stop()
        updates = {hash_token(f"token-{n}"): 1700000000.0 for n in range(1500)}
        yield self.assertFailure(store.record_activity(updates), TokenStoreUnavailable)

    @inlineCallbacks
    def test_stop_cancels_calls_in_flight(self) -> Any:
        """stopService fails the calls still waiting for Redis at once, and then stops."""
        store = self.redis_store(self.server)
        yield store.ping()
        self.server.pause()
        looking = store.lookup(TOKEN)
        issuing = store.issue(make_record(OTHER), OTHER)
        yield store.stopService()
        for pending in (looking, issuing):
            failure = yield self.assertFailure(pending, TokenStoreUnavailable)
            self.assertIn("stopping", str(failure))

    @inlineCallbacks
    def test_redis_too_slow(self) -> Any:
        """
        A Redis that stops answering (SIGSTOP: its connections stay open) fails calls with
        TokenStoreUnavailable within the reply timeout; once it answers again the same store
        works, without a restart.
        """
        store = self.redis_store(self.server, query="reply_timeout=2")
        yield store.issue(make_record(TOKEN), TOKEN)
        self.server.pause()
        for _ in range(2):  # the first aborts its connection; the second waits on another
            started = reactor.seconds()
            yield self.assertFailure(store.lookup(TOKEN), TokenStoreUnavailable)
            self.assertLess(reactor.seconds() - started, 2 + 0.5)
        self.server.resume()
        self.assertEqual((yield store.lookup(TOKEN)).port, 5900)

    @inlineCallbacks
    def test_subscriber_notices_a_silent_redis(self) -> Any:
        """
        Nothing closes the revocation connection of a Redis that stops answering (SIGSTOP):
        the subscriber's PING notices, the connection is dropped, and once Redis answers
        again the store subscribes again and calls on_reconnect (sessions are re-checked).
        """
        store = self.redis_store(
            self.server,
            query="reply_timeout=0.5",
            resubscribe_policy=lambda attempt: 0.1,
            keepalive_interval=0.2,
        )
        inbox, reconnects = Inbox(), []
        yield store.watch_revocations(inbox.put, lambda: reconnects.append(True))
        lost = store.next_subscription_loss()
        self.server.pause()
        yield lost
        self.assertEqual(reconnects, [])
        subscribed_again = store.next_subscription()
        self.server.resume()
        yield subscribed_again
        self.assertEqual(reconnects, [True])
        heard = inbox.next()
        self.redis.publish(REVOKE_CHANNEL, "instance:i-3")
        self.assertEqual((yield heard), "instance:i-3")
        self.assertTrue([m for m in log_messages(self.log) if "no answer to PING" in m])

    @inlineCallbacks
    def test_wrong_password(self) -> Any:
        """
        A refused password is named in the errors and logged once, never with the password;
        pool and subscriber retry with a growing delay (not every second, and not never
        again), no "Unhandled error in Deferred" is left behind, and once Redis accepts the
        password the same store works.
        """
        server = self.start_server("--requirepass", "right-password")
        pool_attempts: list[int] = []
        subscriber_attempts: list[int] = []
        backed_off = [Deferred(), Deferred()]

        def recording(attempts: list[int], done: Deferred[None]) -> Any:
            def policy(attempt: int) -> float:
                attempts.append(attempt)
                if attempt == 3 and not done.called:
                    done.callback(None)
                return 0.01

            return policy

        url = f"redis://:wrong-password@127.0.0.1:{server.port}/0?reply_timeout=1"
        store = RedisTokenStore(
            RedisConfig.from_url(url),
            reactor,
            reactor=reactor,
            reconnect_policy=recording(pool_attempts, backed_off[0]),
            resubscribe_policy=recording(subscriber_attempts, backed_off[1]),
        )
        store.startService()
        self.addCleanup(store.stopService)
        subscribed = store.watch_revocations(lambda message: None)

        failure = yield self.assertFailure(store.lookup(TOKEN), TokenStoreUnavailable)
        self.assertIn("refused the credentials", str(failure))
        yield gatherResults(backed_off)
        self.assertEqual(subscriber_attempts[:3], [1, 2, 3])
        self.assertEqual(sorted(pool_attempts)[:4], [1, 1, 2, 2])  # two pool connections
        refused = [m for m in log_messages(self.log) if "refused the credentials" in m]
        self.assertEqual(len(refused), 3, refused)  # pool, subscriber, the failed lookup

        client = server.client(password="right-password")
        self.addCleanup(client.close)
        client.config_set("requirepass", "wrong-password")
        yield subscribed
        self.assertIsNone((yield store.lookup(TOKEN)))
        self.assertFalse([m for m in log_messages(self.log) if "wrong-password" in m])

        yield store.stopService()
        gc.collect()  # an errback nobody handled is reported when its Deferred is collected
        self.assertEqual(self.flushLoggedErrors(), [])


class RedisServerHelperTests(SynchronousTestCase):
    """tests/redis_server.py itself."""

    def test_output_never_blocks_the_server(self) -> None:
        """
        More than a pipe's worth (64 KiB) of server log does not block the server: after
        startup its output goes on to redis.log in the server's directory.
        """
        try:
            server = start_redis(self, ["--enable-debug-command", "local"])
        except RuntimeError:  # Redis 6 has no such option (and DEBUG is always on)
            server = start_redis(self)
        client = server.client()
        self.addCleanup(client.close)
        filler = "x" * 900
        for n in range(100):  # DEBUG LOG writes a line to the server's log
            client.execute_command("DEBUG", "LOG", f"line {n} {filler}")
        self.assertTrue(client.ping())
        server.stop()
        with open(server.log_path, encoding="utf-8") as f:
            self.assertIn(f"line 99 {filler}", f.read())


class RedisTlsAndSentinelTests(RedisStoreMixin, TestCase):
    """``rediss://`` (verified TLS) and ``redis+sentinel://`` against real servers."""

    def start_tls_server(self, auth_clients: str = "no") -> tuple[RedisServer, dict[str, str]]:
        directory = tempfile.mkdtemp(prefix="vncmux-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        files = make_tls_files(directory)
        args = ["--tls-cert-file", files["cert"], "--tls-key-file", files["key"],
                "--tls-ca-cert-file", files["ca"], "--tls-auth-clients", auth_clients]  # fmt: skip
        try:
            return start_redis(self, args, tls=True), files
        except RuntimeError as e:
            last = str(e).strip().splitlines()[-1]
            hint = f"this redis-server has no TLS support ({last}): apt-get install redis-server"
            if os.environ.get("CI"):
                self.fail(hint)
            raise SkipTest(hint) from None

    def store(self, url: str, **kwargs: Any) -> RedisTokenStore:
        store = RedisTokenStore(RedisConfig.from_url(url), reactor, reactor=reactor, **kwargs)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    @inlineCallbacks
    def test_tls(self) -> Any:
        """rediss:// with the server's CA works for the pool and for the subscriber."""
        server, files = self.start_tls_server()
        store = self.store(f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={files['ca']}")
        inbox = Inbox()
        yield store.watch_revocations(inbox.put)
        yield store.issue(make_record(TOKEN), TOKEN)
        self.assertEqual((yield store.lookup(TOKEN)).target, "10.0.0.5:5900")
        heard = inbox.next()
        yield store.revoke(hash_token(TOKEN))
        self.assertEqual((yield heard), hash_token(TOKEN))

    @inlineCallbacks
    def test_tls_client_certificate(self) -> Any:
        """A server with tls-auth-clients yes accepts a store that presents a client
        certificate (ssl_certfile + ssl_keyfile) and refuses one that does not."""
        server, files = self.start_tls_server(auth_clients="yes")
        base = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={files['ca']}"
        without = self.store(base + "&reply_timeout=0.5")
        yield self.assertFailure(without.ping(), TokenStoreUnavailable)
        store = self.store(base + f"&ssl_certfile={files['cert']}&ssl_keyfile={files['key']}")
        yield store.issue(make_record(TOKEN), TOKEN)
        self.assertEqual((yield store.lookup(TOKEN)).target, "10.0.0.5:5900")

    def test_client_certificate_errors(self) -> None:
        """A missing or unusable client certificate is a ValueError naming the option."""
        directory = tempfile.mkdtemp(prefix="vncmux-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        files = make_tls_files(directory)
        for query, words in [
            (f"ssl_certfile={directory}/missing.pem", "ssl_certfile"),
            (f"ssl_certfile={files['cert']}&ssl_keyfile={files['ca']}", "ssl_certfile"),
            (f"ssl_keyfile={files['key']}", "ssl_keyfile needs ssl_certfile"),
        ]:
            with self.subTest(query=query):
                error = self.assertRaises(
                    ValueError,
                    lambda q=query: RedisTokenStore(
                        RedisConfig.from_url(f"rediss://h:1/0?{q}"), reactor
                    ),
                )
                self.assertIn(words, str(error))

    @inlineCallbacks
    def test_tls_verifies_the_server(self) -> Any:
        """Without the CA the certificate is not trusted: the store is unavailable."""
        server, _ = self.start_tls_server()
        store = self.store(f"rediss://127.0.0.1:{server.port}/0?reply_timeout=0.5")
        yield self.assertFailure(store.ping(), TokenStoreUnavailable)

    @inlineCallbacks
    def test_sentinel(self) -> Any:
        """redis+sentinel:// finds the master through Sentinel, for commands and revocations."""
        master = self.start_server()
        sentinel = start_redis(
            self,
            ["--sentinel"],
            config=f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n",
            ready_marker=b"+monitor master",
        )
        store = self.store(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/2")
        inbox = Inbox()
        yield store.watch_revocations(inbox.put)
        yield store.issue(make_record(TOKEN), TOKEN)
        client = master.client(db=2)
        self.addCleanup(client.close)
        self.assertEqual(client.hget(token_key(hash_token(TOKEN)), "host"), "10.0.0.5")
        heard = inbox.next()
        yield store.revoke(hash_token(TOKEN))
        self.assertEqual((yield heard), hash_token(TOKEN))


class SentinelPoolProtocolTests(SynchronousTestCase):
    """The pool's connection to a Sentinel-found master, without a server."""

    def test_lost_before_its_role_is_known(self) -> None:
        """A connection lost before the master answers txredisapi's ROLE check (a failover)
        leaves no unhandled error behind: the pool reconnects, nothing else is to be done."""

        class Factory:
            is_master = True
            replyTimeout = None

            def addConnection(self, connection: object) -> None:
                pass

            def delConnection(self, connection: object) -> None:
                pass

        _, sentinel_factory = pool_factories()
        protocol = sentinel_factory.protocol()
        protocol.factory = Factory()
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(ConnectionDone()))
        del protocol
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
