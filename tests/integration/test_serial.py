"""
The serial console listener on real loopback sockets, to a real shell on a pty behind a TCP
port (what a compute host's serial port is to nova-serialproxy).

The serial port is a TCP server on a free port whose every connection runs ``bash`` on a
fresh pty (Twisted's ``spawnProcess(usePTY=True)``: the shell's stdin, stdout and stderr are
the pty's slave side, with the pty's line discipline, echo and job control, as under
``socat … EXEC:bash,pty,setsid,ctty``). Binding port 0 in the test itself leaves no race
between choosing a port and listening on it.
"""

from __future__ import annotations

import os
import re
import shutil

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support import ClientState, async_test, connect_client, listen_proxy
from vncmux.settings import Limits
from vncmux.tokens import MemoryTokenStore

#: Seconds any one wait on the shell may take before the test fails.
WAIT = 10.0
#: What Horizon's serial console offers (openstack_dashboard's serial_console view).
HORIZON_PROTOCOLS = ["binary", "base64"]


class _Shell(ProcessProtocol):
    """bash on a pty, wired to one TCP connection of the serial port."""

    def __init__(self, port: _SerialPort) -> None:
        self.port = port
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.port.transport.write(data)  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self.port.transport.loseConnection()  # type: ignore[union-attr]
        self.ended.callback(None)


class _SerialPort(Protocol):
    """One connection to the serial port: a new shell, closed (SIGHUP) when it goes away."""

    factory: _SerialPortFactory

    def connectionMade(self) -> None:
        self.shell = _Shell(self)
        self.factory.shells.append(self.shell)
        bash = self.factory.bash
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "dumb", "PS1": "$ "}
        reactor.spawnProcess(  # type: ignore[attr-defined]
            self.shell, bash, [bash, "--norc", "--noprofile", "-i"], env=env, usePTY=True
        )

    def dataReceived(self, data: bytes) -> None:
        self.shell.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        if not self.shell.ended.called:
            self.shell.transport.loseConnection()  # type: ignore[union-attr]


class _SerialPortFactory(Factory):
    protocol = _SerialPort

    def __init__(self, bash: str) -> None:
        self.bash = bash
        self.shells: list[_Shell] = []


async def listen_serial_port(test: TestCase) -> int:
    """A serial port with a shell behind it on a free loopback port; every shell it started
    has ended by the end of the test."""
    bash = shutil.which("bash")
    if bash is None:
        if os.environ.get("CI"):
            test.fail("CI needs bash for the serial console tests")
        test.skipTest("no bash")
    factory = _SerialPortFactory(bash)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

    def stop() -> Deferred[object]:
        for shell in factory.shells:
            if not shell.ended.called:
                shell.transport.loseConnection()  # type: ignore[union-attr]
        return DeferredList([port.stopListening(), *(s.ended for s in factory.shells)])

    test.addCleanup(stop)
    return port.getHost().port  # type: ignore[no-any-return]


async def output_with(client: ClientState, pattern: bytes) -> bytes:
    """Everything received once the regular expression C{pattern} matches in it (at most
    L{WAIT} seconds)."""

    async def wait() -> bytes:
        while re.search(pattern, client.received) is None:
            await client.receive(len(client.received) + 1)
        return client.received

    return await ensureDeferred(wait()).addTimeout(WAIT, reactor)


class SerialConsoleTests(TestCase):
    """A serial console through vncmux, as Horizon's serial console opens it."""

    async def _setup(self, limits: Limits | None = None) -> int:
        shell_port = await listen_serial_port(self)
        store = MemoryTokenStore()
        store.add("serial", "127.0.0.1", shell_port, console_type="serial")
        store.add("vnc", "127.0.0.1", shell_port)
        proxy = await listen_proxy(
            self,
            store,
            limits or Limits(ping_interval=0),
            serial_listen="tcp:0:interface=127.0.0.1",
        )
        listening = await proxy.service.listeners["serial"].listening()
        return listening.getHost().port  # type: ignore[no-any-return]

    @async_test
    async def test_command_runs(self) -> None:
        """A command typed through the WebSocket runs in the shell and its output comes
        back; the shell runs on a terminal (the shell said nothing before: no greeting is
        awaited)."""
        port = await self._setup()
        client = await connect_client(self, port, "/?token=serial", HORIZON_PROTOCOLS)
        await client.opened
        client.send(b"echo $((6 * 7)) $(tty)\r")
        await output_with(client, rb"\r\n42 /dev/pts/\d+\r\n")

    @async_test
    async def test_refusals_by_close_code(self) -> None:
        """An unknown token and a noVNC token on the serial listener both close with 4401
        'invalid token', and the client receives no byte (no RFB greeting on a terminal)."""
        port = await self._setup()
        for token in ("never-issued", "vnc"):
            client = await connect_client(self, port, f"/?token={token}", HORIZON_PROTOCOLS)
            self.assertEqual(await client.closed, (4401, "invalid token"), token)
            self.assertEqual(client.received, b"")

    @async_test
    async def test_idle_from_client_bytes(self) -> None:
        """A shell printing all the time does not keep the session alive: with no keystroke
        for the idle timeout, it closes with 4000 while output is still flowing."""
        port = await self._setup(Limits(ping_interval=0, idle_timeout=1.0, sweep_interval=0.1))
        client = await connect_client(self, port, "/?token=serial", HORIZON_PROTOCOLS)
        await client.opened
        client.send(b"while :; do echo tick; sleep 0.1; done\r")
        started = reactor.seconds()
        await output_with(client, rb"\ntick\r\n")
        code = await client.closed.addTimeout(WAIT, reactor)
        self.assertEqual(code, (4000, "idle timeout"))
        self.assertGreaterEqual(reactor.seconds() - started, 0.8)
        self.assertGreater(client.received.count(b"tick\r\n"), 3)
