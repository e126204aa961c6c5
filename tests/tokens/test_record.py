"""
Token records: fields, repr, and the token values (websockify and nova shapes) they are read from.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.tokens.support import TOKEN, make_record, record_objects
from vncmux.tokens import BadTarget, TokenRecord, hash_token, parse_target, parse_token_value


class TokenRecordTests(SynchronousTestCase):
    """``TokenRecord`` and ``parse_token_value``."""

    def test_brackets_in_records(self) -> None:
        """Issued and stored records take brackets through check_target too."""
        self.assertEqual(TokenRecord.issued(TOKEN, "[fd00::1]", 1, now=0).host, "fd00::1")
        self.assertRaises(BadTarget, TokenRecord.issued, TOKEN, "[fd00::1", 1, now=0)
        self.assertRaises(BadTarget, TokenRecord.issued, TOKEN, "[[h]]", 1, now=0)
        h = hash_token(TOKEN)
        self.assertEqual(TokenRecord.from_fields(h, {"host": "[::1]", "port": "1"}).host, "::1")
        for host in ["[fd00::1", "h]", "[[fd00::1]]"]:
            with self.subTest(host=host):
                fields = {"host": host, "port": "1"}
                self.assertRaises(BadTarget, TokenRecord.from_fields, h, fields)

    def test_password_not_in_repr(self) -> None:
        """A record's repr (logs, tracebacks) leaves the VNC password out."""
        record = make_record(TOKEN, password="vnc-pass-123")
        self.assertNotIn("vnc-pass-123", repr(record))
        self.assertEqual(record.password, "vnc-pass-123")

    def test_token_values(self) -> None:
        """websockify's ``host:port`` and ``{"host": "h:p"}``, and nova's record shape."""
        h = hash_token(TOKEN)
        self.assertEqual(parse_token_value(h, "h:1").target, "h:1")
        self.assertEqual(parse_token_value(h, '{"host": "[::1]:5900"}').target, "[::1]:5900")
        nova = parse_token_value(
            h, json.dumps({"host": "10.0.0.3", "port": "5902", "instance_uuid": "u-1"})
        )
        self.assertEqual((nova.host, nova.port, nova.instance_uuid), ("10.0.0.3", 5902, "u-1"))
        for bad in ["{bad", '{"port": 1}', "[1]", '{"host": "h:1", "max_sessions": "nan"}']:
            with self.subTest(bad=bad):
                self.assertRaises(BadTarget, parse_token_value, h, bad)

    @given(value=st.one_of(st.text(max_size=60), record_objects.map(json.dumps)))
    def test_parse_token_value_only_raises_bad_target(self, value: str) -> None:
        """Arbitrary values (text and JSON objects) give a record or BadTarget, nothing else."""
        try:
            record = parse_token_value("h", value)
        except BadTarget:
            return
        self.assertEqual(parse_target(record.target), (record.host, record.port))
