"""
Target parsing: ``host:port``, brackets around IPv6, ports; the same rules everywhere.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.tokens.support import hosts, ports
from vncmux.tokens import BadTarget, check_target, format_target, parse_target


class ParseTargetTests(SynchronousTestCase):
    """``parse_target`` / ``format_target`` / ``check_target``."""

    def test_valid(self) -> None:
        """Names, IPv4, bracketed and bare IPv6 parse; the port is after the last colon."""
        self.assertEqual(parse_target("vnc.example:5900"), ("vnc.example", 5900))
        self.assertEqual(parse_target(" 10.0.0.1:5901 "), ("10.0.0.1", 5901))
        self.assertEqual(parse_target("[fd00::1]:5902"), ("fd00::1", 5902))
        self.assertEqual(parse_target("fd00::1:5903"), ("fd00::1", 5903))

    def test_invalid(self) -> None:
        """Everything else is a BadTarget."""
        for text in ["", "host", ":5900", "h:0", "h:65536", "h:x", "[fd00::1:5900",
                     "fd00::1]:5900", "[nothex]:1", "a b:1", "[]:1", "fd00::zz:1", "a]b:1",
                     "[[fd00::1]]:1", "h]:1"]:  # fmt: skip
            with self.subTest(text=text):
                self.assertRaises(BadTarget, parse_target, text)

    def test_check_target(self) -> None:
        """
        A separate host and port: IPv6 with or without one balanced pair of brackets; a host
        with any other bracket is refused, not half-stripped.
        """
        self.assertEqual(check_target("vnc.example", "5900"), ("vnc.example", 5900))
        self.assertEqual(check_target("fd00::1", 1), ("fd00::1", 1))
        self.assertEqual(check_target("[fd00::1]", 1), ("fd00::1", 1))
        for host in ["[fd00::1", "fd00::1]", "h]", "[h", "[h]", "[[fd00::1]]", "[10.0.0.1]",
                     "a]b", "a[b", "", " h", "a b"]:  # fmt: skip
            with self.subTest(host=host):
                self.assertRaises(BadTarget, check_target, host, 1)
        self.assertRaises(BadTarget, check_target, "h", 0)

    def test_format_target(self) -> None:
        """IPv6 addresses get brackets, nothing else does."""
        self.assertEqual(format_target("::1", 5900), "[::1]:5900")
        self.assertEqual(format_target("h", 1), "h:1")

    @given(host=hosts, port=ports)
    def test_round_trip(self, host: str, port: int) -> None:
        """``parse_target(format_target(h, p)) == (h, p)`` for names, IPv4 and IPv6."""
        self.assertEqual(parse_target(format_target(host, port)), (host, port))

    @given(text=st.text(max_size=60))
    def test_parse_target_only_raises_bad_target(self, text: str) -> None:
        """Arbitrary text gives a (host, port) or BadTarget, never another exception."""
        try:
            host, port = parse_target(text)
        except BadTarget:
            return
        self.assertTrue(host)
        self.assertTrue(0 < port < 65536)
