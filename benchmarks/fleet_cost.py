"""What the fleet registry costs Redis per session: commands, round trips and bytes.

Runs one fleet instance (vncmux.fleet) in this process against a real redis-server of its own,
with sessions on in-memory peers that take their places through the supervisor (the fleet's
per-token limit included), and reads ``INFO commandstats`` and ``INFO stats`` before and after
each phase:

- setup and teardown of sessions one at a time (each written before the next starts: the
  worst case, nothing batched; the instance writes at most every 50 ms, so this phase takes
  that long per session) and of a burst started in one reactor turn;
- a heartbeat with every session idle, and one after every session moved bytes.

A round trip is one command sent by the proxy (here always EVAL/EVALSHA: one script call);
"in scripts" counts the commands those scripts ran inside Redis.

    python benchmarks/fleet_cost.py --sessions 1000
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.internet import defer, task
from twisted.internet.task import Clock

from tests.fakes import ClosingOwner, FakePeer
from tests.redis_server import RedisServer, find_redis_server
from vncmux.events import Observers
from vncmux.fleet import FleetInstance, FleetLimits
from vncmux.refusals import TOKEN_REVOKED
from vncmux.relay import RelayStats, Session
from vncmux.settings import Limits
from vncmux.supervisor import Supervisor
from vncmux.tokens import RedisConfig, RedisTokenStore, TokenRecord

#: Commands that are not the registry's (the measurement's own INFO, the revocation
#: subscriber's keepalive PING and SUBSCRIBE, connection set-up).
_NOT_OURS = {"info", "ping", "subscribe", "client", "hello", "select", "auth", "config"}
_SCRIPT_CALLS = {"eval", "evalsha"}


class Meter:
    """Deltas of Redis's own counters between two readings."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        first = self.read()
        self.before = self.read()
        # What the readings themselves add to the byte counters (INFO's requests and replies).
        self.overhead = (self.before[1] - first[1], self.before[2] - first[2])

    def read(self) -> tuple[dict[str, int], int, int]:
        stats = self.redis.info("commandstats")
        calls = {}
        for name, fields in stats.items():
            command = name.removeprefix("cmdstat_").lower()
            if command not in _NOT_OURS:
                calls[command] = int(fields["calls"])
        traffic = self.redis.info("stats")
        return calls, int(traffic["total_net_input_bytes"]), int(traffic["total_net_output_bytes"])

    def delta(self, per: int) -> dict[str, Any]:
        """Per session (C{per} sessions), since the last reading; the reading moves on."""
        (calls0, in0, out0), (calls1, in1, out1) = self.before, self.read()
        in1, out1 = in1 - self.overhead[0], out1 - self.overhead[1]
        self.before = self.read()
        diff = {c: n - calls0.get(c, 0) for c, n in calls1.items() if n != calls0.get(c, 0)}
        round_trips = sum(n for c, n in diff.items() if c in _SCRIPT_CALLS)
        inside = {c: n for c, n in diff.items() if c not in _SCRIPT_CALLS}
        return {
            "round_trips": round(round_trips / per, 3),
            "commands_in_scripts": round(sum(inside.values()) / per, 3),
            "bytes_to_redis": round((in1 - in0) / per),
            "bytes_from_redis": round((out1 - out0) / per),
            "in_scripts": {c: round(n / per, 3) for c, n in sorted(inside.items())},
        }


class Fleet:
    """A supervisor whose sessions take places under the fleet's per-token limit."""

    def __init__(self, store: RedisTokenStore, reactor: Any) -> None:
        observers = Observers()
        self.supervisor = Supervisor(Clock(), observers, Limits(max_sessions_per_client=0))
        self.instance = FleetInstance(store, self.supervisor, reactor, 1000.0, "bench")
        observers.add(self.instance)
        self.supervisor.shared_limits = (FleetLimits(self.instance, 10),)
        self.stats = RelayStats()
        self.owner = ClosingOwner()
        self.made = 0

    async def open(self) -> Session:
        """One session of a token of its own: its place (fleet claim), then it relays."""
        n = self.made = self.made + 1
        record = TokenRecord(f"{n:064x}", "127.0.0.1", 5900)
        reservation = await self.supervisor.take_place(record, "192.0.2.1")
        session = Session(
            f"s{n}", record, "192.0.2.1", FakePeer(), FakePeer(), 0.0, self.supervisor, None,
            reservation, self.owner,
        )  # fmt: skip
        session.start(session.client.transport, session.backend.transport, self.stats)
        return session


async def measure(reactor: Any, server: RedisServer, count: int) -> dict[str, Any]:
    store = RedisTokenStore(RedisConfig.from_url(server.url()), reactor, reactor=reactor)
    store.startService()
    fleet = Fleet(store, reactor)
    fleet.instance.startService()
    await fleet.instance.settled()
    redis = server.client()
    meter = Meter(redis)
    results: dict[str, Any] = {"sessions": count}

    one_by_one = []
    for _ in range(count):
        one_by_one.append(await fleet.open())
        await fleet.instance.settled()
    results["setup, one at a time"] = meter.delta(count)

    fleet.instance.beat()
    await fleet.instance.settled()
    results["heartbeat, every session idle (per session)"] = meter.delta(count)
    for session in one_by_one:
        session.bytes_to_client += 1000
        session.bytes_to_backend += 10
    fleet.instance.beat()
    await fleet.instance.settled()
    results["heartbeat, every session moved bytes (per session)"] = meter.delta(count)

    for session in one_by_one:
        session.end(TOKEN_REVOKED)
        await fleet.instance.settled()
    results["teardown, one at a time"] = meter.delta(count)

    burst = await defer.gatherResults([defer.ensureDeferred(fleet.open()) for _ in range(count)])
    await fleet.instance.settled()
    results["setup, all together"] = meter.delta(count)
    for session in burst:
        session.end(TOKEN_REVOKED)
    await fleet.instance.settled()
    results["teardown, all together"] = meter.delta(count)

    fleet.instance.beat()
    await fleet.instance.settled()
    results["heartbeat of an instance (whole call, no sessions)"] = meter.delta(1)

    await fleet.instance.stopService()
    await store.stopService()
    redis.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    args = parser.parse_args()
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("redis-server not found")
    server = RedisServer(binary)
    server.start()
    try:
        results: dict[str, Any] = {}

        async def run(reactor: Any) -> None:
            results.update(await measure(reactor, server, args.sessions))

        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    finally:
        server.cleanup()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
