"""Backpressure on real sockets: a browser that stops reading must not grow the proxy."""

from __future__ import annotations

import hashlib

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.support import GREETING, connect_client, listen_proxy
from vncmux.relay import BACKEND_TO_CLIENT
from vncmux.settings import Limits
from vncmux.tokens import MemoryTokenStore

CHUNK = bytes(range(256)) * 256  # 64 KiB with a pattern, so reordering would show
TOTAL = 256 * 1024 * 1024  # far more than every socket buffer on the way together
#: Kernel socket buffers on loopback (both hops) plus the proxy's own 64 KiB write buffer.
IN_FLIGHT_BOUND = 48 * 1024 * 1024


@implementer(IPushProducer)
class Blaster(Protocol):
    """A VNC server that greets, then writes TOTAL bytes as fast as its transport accepts."""

    def connectionMade(self) -> None:
        self.sent = 0
        self.paused = False
        self.digest = hashlib.sha256()
        self.lost: Deferred[None] = Deferred()
        self.transport.write(GREETING)
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < TOTAL:
            self.sent += len(CHUNK)
            self.digest.update(CHUNK)
            self.transport.write(CHUNK)

    def stopProducing(self) -> None:
        self.paused = True

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class PauseWatch(dict):  # type: ignore[type-arg]
    """RelayStats.pauses that fires a Deferred when the relay pauses the backend."""

    def __init__(self, initial: dict[str, int]) -> None:
        super().__init__(initial)
        self.waiting: Deferred[None] | None = None

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, value)
        if key == BACKEND_TO_CLIENT and self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.callback(None)


async def until_stalled(blaster: Blaster, quiet_turns: int = 200) -> None:
    """Return once the blaster has made no progress for C{quiet_turns} reactor turns in a
    row (or has sent everything). Turns, not seconds: nothing here depends on speed."""
    last, quiet = blaster.sent, 0
    for _ in range(1_000_000):
        if blaster.sent >= TOTAL or quiet >= quiet_turns:
            return
        await deferLater(reactor, 0, lambda: None)
        quiet = quiet + 1 if blaster.sent == last else 0
        last = blaster.sent
    raise AssertionError("the transfer neither finished nor stalled")


class BackpressureTests(TestCase):
    """The relay stops reading from a VNC server whose browser does not keep up."""

    timeout = 120

    def test_slow_client(self) -> Deferred[None]:
        """With the client paused, the proxy stops reading the backend while the bytes in
        flight stay bounded; once resumed, every byte arrives intact and in order."""
        return ensureDeferred(self._slow_client())

    async def _slow_client(self) -> None:
        blasters: list[Blaster] = []

        def build() -> Blaster:
            blasters.append(Blaster())
            return blasters[-1]

        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(build)
        )
        self.addCleanup(listening.stopListening)
        store = MemoryTokenStore()
        store.add("good", "127.0.0.1", listening.getHost().port)
        proxy = await listen_proxy(self, store, Limits(idle_timeout=0))
        watch = PauseWatch(proxy.factory.stats.pauses)
        proxy.factory.stats.pauses = watch

        client = await connect_client(self, proxy.port)
        opened = await client.opened
        received = 0
        digest = hashlib.sha256()

        def count(payload: bytes, is_binary: bool) -> None:
            nonlocal received
            received += len(payload)
            digest.update(payload)
            if received >= TOTAL + len(GREETING) and not done.called:
                done.callback(None)

        done: Deferred[None] = Deferred()
        opened.onMessage = count  # type: ignore[method-assign]
        opened.transport.pauseProducing()

        # The relay pauses the backend once the browser's socket is full ...
        watch.waiting = Deferred()
        await watch.waiting
        # ... and then nothing moves: the blaster stays held back. Without backpressure it
        # would run to TOTAL while the proxy buffers everything.
        await until_stalled(blasters[0])
        session = next(iter(proxy.supervisor.sessions.values()))
        in_flight = session.bytes_to_client - received
        self.assertLess(in_flight, IN_FLIGHT_BOUND)
        self.assertLess(blasters[0].sent, TOTAL, "the backend was never held back")

        opened.transport.resumeProducing()
        await done
        self.assertEqual(received, TOTAL + len(GREETING))
        whole = hashlib.sha256(GREETING)
        for _ in range(TOTAL // len(CHUNK)):
            whole.update(CHUNK)
        self.assertEqual(digest.hexdigest(), whole.hexdigest())
        self.assertGreaterEqual(watch[BACKEND_TO_CLIENT], 1)
        blasters[0].transport.loseConnection()
        await client.closed
