"""How much CPU the supervisor's sweep costs with many idle sessions.

Builds N relaying sessions on in-memory peers, then times the once-a-second sweep (idle,
lifetime, expiry and keepalive checks) and reports the share of one core it takes.

    python benchmarks/sweep.py --sessions 10000 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from twisted.internet.task import Clock

from tests.fakes import ClosingOwner, FakePeer
from vncmux.events import Observers
from vncmux.relay import RelayStats, Session
from vncmux.rfb import ClientActivityScanner
from vncmux.settings import Limits
from vncmux.supervisor import Supervisor
from vncmux.tokens import TokenRecord


def build(count: int, limits: Limits) -> tuple[Supervisor, Clock]:
    """A supervisor holding C{count} idle sessions, each on its own token."""
    clock = Clock()
    supervisor = Supervisor(clock, Observers(), limits)
    stats = RelayStats()
    owner = ClosingOwner()
    for n in range(count):
        record = TokenRecord(f"{n:064x}", "127.0.0.1", 5900, expires_at=1e12)
        reservation = supervisor.reserve(record, f"10.0.{n // 250}.{n % 250}")
        session = Session(
            f"s{n}",
            record,
            "c",
            FakePeer(),
            FakePeer(),
            0.0,
            supervisor,
            ClientActivityScanner(),
            reservation,
            owner,
        )
        session.start(session.client.transport, session.backend.transport, stats)
    return supervisor, clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    limits = Limits(
        idle_timeout=1800, max_session=86400, enforce_expiry=True, ping_interval=30, ping_timeout=20
    )
    supervisor, clock = build(args.sessions, limits)
    timings = []
    for _ in range(args.rounds):
        clock.advance(1.0)
        started = time.perf_counter()
        supervisor.sweep()
        timings.append(time.perf_counter() - started)
        for session in supervisor.sessions.values():
            session.ping_sent_at = None  # every client answers its pings
    assert len(supervisor.sessions) == args.sessions, "no session may end in this benchmark"
    median = statistics.median(timings)
    result = {
        "sessions": args.sessions,
        "rounds": args.rounds,
        "sweep_ms_median": round(median * 1000, 3),
        "sweep_ms_max": round(max(timings) * 1000, 3),
        "cpu_share_of_one_core_at_1_sweep_per_s": round(median, 5),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
