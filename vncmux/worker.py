"""
One worker of ``twistd vncmux --workers N``, started by the parent (L{vncmux.workers}) as::

    python -m vncmux.worker INDEX novnc=FD:FAMILY [serial=FD:FAMILY ...] -- OPTIONS...

OPTIONS are the parent's own, parsed by the same L{vncmux.tap.Options}; the worker then runs
today's single process (L{vncmux.tap.build_proxy}) on the listening sockets it inherited,
with its control channel to the parent on descriptor 3. It logs JSON events on its standard
output, which the parent republishes tagged with the worker's index. SIGTERM drains it like
a single process; so does the loss of its parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.python import usage

from vncmux.workers import CONTROL_FD, OneProtocol, WorkerLink

_log = Logger()


def parse_listeners(specs: Sequence[str]) -> dict[str, tuple[int, int]]:
    """C{TYPE=FD:FAMILY} arguments as C{{console_type: (fd, family)}}."""
    listeners = {}
    for spec in specs:
        console_type, _, where = spec.partition("=")
        fd, _, family = where.partition(":")
        listeners[console_type] = (int(fd), int(family))
    return listeners


def _die_with_parent() -> None:
    """Linux: SIGTERM when the parent dies (PR_SET_PDEATHSIG), so a worker never outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)


def main(argv: Sequence[str]) -> int:
    """Run one worker until SIGTERM or the end of its control channel."""
    from twisted.internet import reactor as global_reactor

    from vncmux.tap import Options, build_proxy, raise_open_files_limit

    reactor: Any = global_reactor
    _die_with_parent()
    split = list(argv).index("--")
    index, listener_specs, arguments = int(argv[0]), argv[1:split], list(argv[split + 1 :])
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)], redirectStandardIO=False)
    config = Options()
    try:
        config.parseOptions(arguments)
    except usage.UsageError as e:
        _log.critical("worker {index}: {error}", index=index, error=str(e))
        return 2
    raise_open_files_limit(config["max-sessions"])  # the parent said it if it is too low
    link = WorkerLink(index, parse_listeners(listener_specs))
    service = build_proxy(config, reactor, link)
    control = socket.socket(fileno=CONTROL_FD)
    control.setblocking(False)
    reactor.adoptStreamConnection(control.fileno(), socket.AF_UNIX, OneProtocol(link))
    control.close()
    stop = StopOnce(reactor)
    link.parent_gone = stop
    service.privilegedStartService()  # type: ignore[no-untyped-call]  # python/mypy#16651
    service.startService()  # type: ignore[no-untyped-call]  # python/mypy#16651
    link.tell_listening()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(signal.signal, signal.SIGTERM, stop.on_signal)
    reactor.run()
    return 0


class StopOnce:
    """
    Stop the worker's reactor (so the proxy drains) once, whatever asks first: SIGTERM from
    the parent, SIGTERM from systemd to every process of the unit (often both), or the end
    of the control channel. The reactor's own handler would try to stop it again, and log
    an error, on the second signal.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stopping = False

    def __call__(self) -> None:
        if not self._stopping and self._reactor.running:
            self._stopping = True
            _log.info("draining", vncmux_event="worker_draining")
            self._reactor.stop()

    def on_signal(self, number: int, frame: object) -> None:
        self._reactor.callFromThread(self)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
