"""SIGHUP: reload instead of dying.

An operator's ``systemctl reload`` (or a log rotation tool) sends SIGHUP; without a handler
Python's default action ends the process and every console with it. While this service runs,
SIGHUP is logged and everything that can be re-read is re-read: the TLS certificates of the
``ssl:`` listeners. Live sessions are not touched.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger


class ReloadOnHangup(Service):
    """
    Installs a SIGHUP handler on start and puts the previous one back on stop. The handler
    only schedules L{reload} on the reactor thread (C{callFromThread} is safe in a signal
    handler); C{reloads} are called there, each one failing on its own.
    """

    _log = Logger()
    name = "reload-on-hangup"

    def __init__(self, reactor: Any, reloads: Sequence[Callable[[], object]]) -> None:
        self._reactor = reactor
        self._reloads = list(reloads)
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # python/mypy#16653
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Log the reload and run every reload step."""
        self._log.info("SIGHUP: reload", vncmux_event="reload")
        for step in self._reloads:
            try:
                step()
            except Exception:
                self._log.failure("reload step {step!r} failed", step=step)


__all__ = ["ReloadOnHangup"]
