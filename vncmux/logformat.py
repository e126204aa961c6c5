"""JSON log lines, one object per event, for log pipelines (Loki, Elasticsearch, journald).

Under twistd::

    twistd -n --logger vncmux.logformat.json_observer vncmux [options]

twistd calls L{json_observer} once before it redirects standard output into the log, so the
lines go to the real standard output (or to the journal under systemd).

Each line holds ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``message`` (the
formatted text), ``failure`` (a traceback, when there is one) and every scalar field of the
event, such as ``vncmux_event``, ``session_id``, ``token_id`` or ``bytes_to_client``. Fields
that are not plain strings, numbers, booleans or null are left out rather than stringified.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent
from zope.interface import implementer

# twisted.python.log's legacy keys; their content is in ``message`` already.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "why", "failure", "time", "system"})
_SCALARS = (str, int, float, bool, type(None))


def event_as_dict(event: LogEvent) -> dict[str, Any]:
    """The JSON-ready form of one event."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    system = event.get("log_system", event.get("system"))
    if isinstance(system, str) and system != "-":
        record["system"] = system
    failure = event.get("log_failure", event.get("failure"))
    if failure is not None:
        try:
            record["failure"] = failure.getTraceback()
        except Exception:
            record["failure"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        if isinstance(value, _SCALARS) and not _bad_float(value):
            record[key] = value
    return record


def _bad_float(value: object) -> bool:
    return isinstance(value, float) and (value != value or value in (float("inf"), -float("inf")))


def _iso_time(when: object) -> str | None:
    if not isinstance(when, int | float):
        return None
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@implementer(ILogObserver)
class JsonLineObserver:
    """Writes each event as one JSON line to C{out}; a bad event never breaks logging."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        try:
            line = json.dumps(event_as_dict(event), ensure_ascii=False, default=str)
        except Exception as e:  # never raise out of an observer
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        try:
            self._out.write(line + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass


def json_observer() -> JsonLineObserver:
    """The twistd ``--logger`` factory: JSON lines on the standard output of the moment."""
    return JsonLineObserver(sys.stdout)


__all__ = ["JsonLineObserver", "event_as_dict", "json_observer"]
