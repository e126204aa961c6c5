"""ConsoleProtocol's own setup work, with the in-memory harness."""

from __future__ import annotations

from unittest import mock

import autobahn.websocket.protocol as autobahn_protocol
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.trial.unittest import SynchronousTestCase

from tests.conformance.harness import Harness


class FactoryOptionsTests(SynchronousTestCase):
    """The protocol copies autobahn's per-connection options from its factory itself."""

    def test_every_option_copied_nothing_pretty_printed(self) -> None:
        """Each of autobahn's server options has the factory's value on the protocol, and
        autobahn's connection setup is left nothing to copy and pretty-print (if autobahn
        stops reading CONFIG_ATTRS, or prints something else there, this fails)."""
        harness = Harness.for_test(self)
        printed: list[object] = []
        with mock.patch.object(autobahn_protocol, "pformat", side_effect=printed.append):
            harness.connect()
        factory = harness.console.factories["novnc"]
        self.assertTrue(WebSocketServerProtocol.CONFIG_ATTRS)
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            self.assertEqual(getattr(harness.protocol, name), getattr(factory, name), name)
        self.assertEqual(printed, [[]])
