"""The pure upgrade checks: Origin patterns as parsed tuples, and X-Forwarded-For entries."""

from __future__ import annotations

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from vncmux.handshake import (
    Origin,
    client_address,
    forwarded_address,
    origin_allowed,
    parse_networks,
    parse_origin,
    parse_origin_pattern,
)
from vncmux.tap import Options


class OriginTests(SynchronousTestCase):
    """``--allowed-origin`` compares scheme, host and port; '*.' is a whole leading label."""

    def allowed(self, origin: str, *patterns: str, host: str = "proxy.internal:6080") -> bool:
        return origin_allowed(origin, host, "https", patterns)

    def test_attacks_from_the_issue(self) -> None:
        """A suffix glued to the allowed host, or a wildcard inside a label, opens nothing."""
        for origin, pattern in [
            ("http://console.example.org.evil.com", "http://console.example.org"),
            ("http://console.example.org:8080", "http://console.example.org"),
            ("http://console.example.org@evil.com", "http://console.example.org"),
            ("https://evilexample.com", "https://*.example.com"),
            ("https://example.com.evil.com", "https://*.example.com"),
            ("https://example.com", "https://*.example.com"),
            ("http://a.example.com", "https://*.example.com"),
            ("https://a.example.com:8443", "https://*.example.com"),
            ("https://a.example.com/x", "https://*.example.com"),
            ("null", "https://*.example.com"),
            ("https://console.example.org.evil.com:6081", "https://console.example.org:*"),
            ("http://console.example.org:6081", "https://console.example.org:*"),
        ]:
            with self.subTest(origin=origin, pattern=pattern):
                self.assertFalse(self.allowed(origin, pattern))

    def test_matches(self) -> None:
        """Exact origins with default or explicit ports, subdomains at any depth, any case."""
        for origin, pattern in [
            ("http://console.example.org", "http://console.example.org"),
            ("http://console.example.org:80", "http://console.example.org"),
            ("https://console.example.org", "https://console.example.org:443"),
            ("http://console.example.org:8080", "http://console.example.org:8080"),
            ("https://a.example.com", "https://*.example.com"),
            ("https://A.B.Example.COM:443", "https://*.example.com"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("https://anything.test", "*"),
            ("https://console.example.org:6081", "https://console.example.org:*"),
            ("https://console.example.org", "https://console.example.org:*"),
        ]:
            with self.subTest(origin=origin, pattern=pattern):
                self.assertTrue(self.allowed(origin, pattern))

    def test_bad_patterns_refused(self) -> None:
        """The issue's patterns and other wildcards are usage errors at startup."""
        for pattern in [
            "http://console.example.org*",
            "https://*example.com",
            "https://a.*.example.com",
            "https://*",
            "https://*.[::1]",
            "console.example.org",
            "ftp://console.example.org",
            "https://console.example.org/",
            "https://user@console.example.org",
            "https://console.example.org:99999",
            "https://console.example.org:8*",
        ]:
            with self.subTest(pattern=pattern):
                self.assertRaises(ValueError, parse_origin_pattern, pattern)
                self.assertRaises(UsageError, Options().parseOptions, ["--allowed-origin", pattern])

    def test_same_host(self) -> None:
        """Without patterns the Origin must be the request's own scheme, host and port."""
        host = "console.example.org"
        self.assertTrue(origin_allowed("https://console.example.org", host, "https", ()))
        self.assertTrue(origin_allowed("https://console.example.org:443", host, "https", ()))
        self.assertFalse(origin_allowed("http://console.example.org", host, "https", ()))
        self.assertFalse(origin_allowed("https://console.example.org:444", host, "https", ()))
        self.assertFalse(origin_allowed("https://console.example.org.evil", host, "https", ()))
        self.assertFalse(origin_allowed("https://evil@console.example.org", host, "https", ()))
        self.assertFalse(origin_allowed("https://x", "evil@x", "https", ()))
        self.assertTrue(origin_allowed("http://[::1]:6080", "[::1]:6080", "http", ()))
        self.assertFalse(origin_allowed("https://x", None, "https", ()))

    def test_missing_origin(self) -> None:
        """Non-browser clients send no Origin: allowed (they need the token anyway)."""
        self.assertTrue(origin_allowed(None, "h", "http", ()))
        self.assertTrue(origin_allowed("", "h", "http", ()))

    def test_parse_origin(self) -> None:
        """Origins become lower-case tuples with the scheme's default port."""
        self.assertEqual(parse_origin("HTTPS://Console.Example.ORG"),
                         Origin("https", "console.example.org", 443))  # fmt: skip
        self.assertEqual(parse_origin("http://[::1]"), Origin("http", "::1", 80))
        for bad in ["null", "file://", "http://", "http://a b", "http://a..b", "http://a.b."]:
            self.assertIsNone(parse_origin(bad), bad)


class ForwardedForTests(SynchronousTestCase):
    """X-Forwarded-For from a trusted proxy, entries with and without ports."""

    trusted = parse_networks(["10.0.0.0/8", "fd00::/8"])

    def address(self, forwarded: str, peer: str = "10.0.0.2") -> str:
        return client_address(peer, {"x-forwarded-for": forwarded}, self.trusted)

    def test_entries_with_ports(self) -> None:
        """``ip:port`` and ``[v6]:port`` give the address; a bare IPv6 is not split."""
        self.assertEqual(self.address("192.0.2.7:51234"), "192.0.2.7")
        self.assertEqual(self.address("[2001:db8::7]:51234"), "2001:db8::7")
        self.assertEqual(self.address("[2001:db8::7]"), "2001:db8::7")
        self.assertEqual(self.address("2001:db8::7"), "2001:db8::7")
        self.assertEqual(self.address("2001:DB8:0::7"), "2001:db8::7")
        self.assertEqual(self.address("192.0.2.7"), "192.0.2.7")

    def test_right_most_untrusted(self) -> None:
        """Trusted hops are skipped from the right, ports or not; a client's own spoofed
        entries further left are never reached."""
        chain = "6.6.6.6, 192.0.2.7:1000, 10.1.1.1:443, [fd00::1]:8443"
        self.assertEqual(self.address(chain), "192.0.2.7")
        self.assertEqual(self.address("10.1.1.1, 10.1.1.2"), "10.0.0.2")

    def test_untrusted_peer_and_garbage(self) -> None:
        """An untrusted peer's header is ignored; an entry that is no address yields the
        peer."""
        self.assertEqual(self.address("192.0.2.7", peer="198.51.100.1"), "198.51.100.1")
        for entry in ["unknown", "1.2.3.4:0", "1.2.3.4:99999", "1.2.3.4:x", "[1.2.3.4]:80",
                      "[2001:db8::1", "[2001:db8::1]x", "[2001:db8::1]:", "_hidden"]:  # fmt: skip
            with self.subTest(entry=entry):
                self.assertIsNone(forwarded_address(entry))
                self.assertEqual(self.address(entry), "10.0.0.2")
