"""
``--tokens`` URLs for Redis and ``open_token_store``.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.tokens.support import TOKEN
from vncmux.tokens import (
    FileTokenStore,
    RedisConfig,
    RedisTokenStore,
    TokenStoreUnavailable,
    open_token_store,
)


class RedisConfigTests(SynchronousTestCase):
    """``--tokens`` URLs for Redis, and ``open_token_store``."""

    def test_plain(self) -> None:
        """Host, port and database, with defaults."""
        config = RedisConfig.from_url("redis://redis.example")
        self.assertEqual(
            (config.hosts, config.db, config.tls), ((("redis.example", 6379),), 0, False)
        )
        config = RedisConfig.from_url("redis://[::1]:6380/3")
        self.assertEqual((config.hosts, config.db), ((("::1", 6380),), 3))
        self.assertEqual((config.connect_timeout, config.reply_timeout), (2.0, 2.0))

    def test_credentials_never_shown(self) -> None:
        """Passwords are percent-decoded, and absent from repr and the redacted URL."""
        config = RedisConfig.from_url("redis://:p%40ss%3Aword@h:1/0")
        self.assertEqual((config.username, config.password), (None, "p@ss:word"))
        config = RedisConfig.from_url("redis://alice:hunter2@h:1/0")
        self.assertEqual((config.username, config.password), ("alice", "hunter2"))
        self.assertNotIn("hunter2", repr(config))
        self.assertEqual(config.redacted_url(), "redis://alice:***@h:1/0")
        self.assertNotIn("hunter2", repr(RedisTokenStore(config, Clock())))

    def test_options(self) -> None:
        """format=websockify, timeouts, TLS and Sentinel."""
        config = RedisConfig.from_url(
            "redis://h/1?format=websockify&reply_timeout=0.5&connect_timeout=1"
        )
        self.assertTrue(config.websockify_format)
        self.assertEqual((config.reply_timeout, config.connect_timeout), (0.5, 1.0))
        self.assertEqual(config.websockify_key("T"), "websockify:T")
        self.assertEqual(
            config.redacted_url(), "redis://h:6379/1?format=websockify&namespace=websockify"
        )
        config = RedisConfig.from_url("redis://h/1?format=websockify&namespace=a:b:")
        self.assertEqual(config.websockify_key("T"), "a:b:T")
        self.assertTrue(RedisConfig.from_url("rediss://h:6380").tls)
        config = RedisConfig.from_url("redis+sentinel://:pw@s1:5000,[fd00::1],s3/mymaster/2")
        self.assertEqual(config.hosts, (("s1", 5000), ("fd00::1", 26379), ("s3", 26379)))
        self.assertEqual(
            (config.sentinel_master, config.db, config.password), ("mymaster", 2, "pw")
        )
        self.assertEqual(
            config.redacted_url(),
            "redis+sentinel://:***@s1:5000,[fd00::1]:26379,s3:26379/mymaster/2",
        )

    def test_errors(self) -> None:
        """Mistakes are ValueErrors with readable messages that never quote the password."""
        for url in [
            "redis://:hunter2@h/notadb",
            "redis://:hunter2@h/0?colour=blue",
            "redis://:hunter2@h/0?format=json",
            "redis://:hunter2@h/0?format=websockify&namespace=",
            "redis://:hunter2@h/0?format=websockify&namespace=:",
            "redis://:hunter2@h/0?format=websockify&namespace=vncmux",
            "redis://:hunter2@h/0?namespace=websockify",
            "redis://hunter2@h/0",
            "redis://:hunter2@fd00::1/0",
            "redis://:hunter2@h:99999/0",
            "redis://:hunter2@h/0?reply_timeout=0",
            "redis://:hunter2@h/0?ssl_ca_certs=x",
            "rediss+sentinel://:hunter2@h/m",
            "redis+sentinel://:hunter2@h",
            "memcached://:hunter2@h",
        ]:
            with self.subTest(url=url):
                error = self.assertRaises(ValueError, RedisConfig.from_url, url)
                self.assertNotIn("hunter2", str(error))

    def test_tls_options(self) -> None:
        """rediss:// builds verified TLS options; a missing CA file is a clear ValueError."""
        store = RedisTokenStore(RedisConfig.from_url("rediss://h:1"), Clock())
        self.assertIsNotNone(store._tls)
        missing = self.mktemp()
        error = self.assertRaises(
            ValueError,
            RedisTokenStore,
            RedisConfig.from_url(f"rediss://h:1?ssl_ca_certs={missing}"),
            Clock(),
        )
        self.assertIn("ssl_ca_certs", str(error))

    def test_open_token_store(self) -> None:
        """file: and redis URLs map to their stores; anything else is a ValueError."""
        clock = Clock()
        store = open_token_store("file:etc/tokens", clock)
        self.assertIsInstance(store, FileTokenStore)
        self.assertEqual(store.path, os.path.abspath("etc/tokens"))
        self.assertEqual(open_token_store("file:///srv/tokens", clock).path, "/srv/tokens")
        redis_store = open_token_store("redis://h:1/2", clock, reply_timeout=0.25)
        self.assertIsInstance(redis_store, RedisTokenStore)
        self.assertEqual((redis_store.config.db, redis_store.max_wait), (2, 0.25))
        self.assertIsInstance(open_token_store("redis+sentinel://h/m", clock), RedisTokenStore)
        for source in ["", "file:", "tokens.txt", "mysql://u:hunter2@h/db"]:
            with self.subTest(source=source):
                error = self.assertRaises(ValueError, open_token_store, source, clock)
                self.assertNotIn("hunter2", str(error))
                self.assertIn("file:PATH", str(error)) if source != "file:" else None

    def test_not_started(self) -> None:
        """A Redis store that is not running fails fast with TokenStoreUnavailable."""
        store = RedisTokenStore(RedisConfig.from_url("redis://h:1"), Clock())
        self.failureResultOf(store.lookup(TOKEN), TokenStoreUnavailable)
        self.failureResultOf(store.ping(), TokenStoreUnavailable)
