"""
How far a throughput ratio can go on the machine that ran ``benchmarks/run.py``: on a small
machine the load's own processes share the cores with the proxy, so the proxy's speed is not
the only cost per byte. For each throughput scenario and kind this prints the CPU that the
proxy, the backend and the client spent per GB together, and what the machine's cores would
move at that cost if all of them were busy (the run's ``cpus``): the most any run can show.
The ratio of two bounds is the ratio of two kinds that both kept every core busy; a kind's
bound over websockify's measured figure (the ceiling) is the most its ratio could show in that
run.

    .venv/bin/python benchmarks/bound.py benchmarks/results/sessions.json

Medians over the rounds; every round's figure uses that round's own throughput and CPU use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The throughput figures of run.py's scenarios, and how many bytes their unit is.
THROUGHPUT = {"throughput_mb": 1e6, "throughput": 2**20}
PARTS = ("proxy", "backend", "client")
REFERENCE = "websockify"


def cost_per_gb(measure: dict[str, Any]) -> dict[str, float] | None:
    """One round's CPU per GB (core-seconds) of each part and in all, or None without both
    a throughput and the CPU use."""
    util = measure.get("util")
    rate = next((measure[k] * unit for k, unit in THROUGHPUT.items() if measure.get(k)), None)
    if not util or not rate:
        return None
    per_gb = {part: util[part] / rate * 1e9 for part in PARTS}
    per_gb["total"] = sum(per_gb.values())
    per_gb["measured_mb"] = rate / 1e6
    return per_gb


def bounds(doc: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """
    Per scenario and kind: the median CPU per GB of each part and in all (core-seconds;
    the total is the median of the rounds' totals, not the sum of the parts' medians), the
    median MB/s measured, and C{bound_mb}, the MB/s that C{cpus} cores would move at that
    total.
    """
    cpus = doc["environment"]["cpus"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, by_kind in doc["runs"].items():
        for kind, measures in by_kind.items():
            costs = [c for c in map(cost_per_gb, measures) if c is not None]
            if not costs:
                continue
            keys = (*PARTS, "total", "measured_mb")
            median = {k: statistics.median(c[k] for c in costs) for k in keys}
            median["bound_mb"] = cpus / median["total"] * 1000
            out.setdefault(scenario, {})[kind] = median
    return out


def report(found: dict[str, dict[str, dict[str, float]]]) -> str:
    """A line per scenario and kind; for a kind measured with websockify, the ratio of the
    two bounds (both using every core) and of its bound to websockify's measured figure."""
    lines = [
        f"{'scenario':<14} {'kind':<16} {'proxy':>6} {'backend':>8} {'client':>7} "
        f"{'total':>6} {'MB/s':>7} {'bound MB/s':>10} {'bound ratio':>11} {'ceiling':>8}"
    ]
    for scenario, by_kind in found.items():
        reference = by_kind.get(REFERENCE)
        for kind, c in by_kind.items():
            ratios = ""
            if reference and kind != REFERENCE:
                ratios = (
                    f"{c['bound_mb'] / reference['bound_mb']:>11.2f}"
                    f" {c['bound_mb'] / reference['measured_mb']:>8.2f}"
                )
            lines.append(
                f"{scenario:<14} {kind:<16} {c['proxy']:>6.2f} {c['backend']:>8.2f} "
                f"{c['client']:>7.2f} {c['total']:>6.2f} {c['measured_mb']:>7,.0f} "
                f"{c['bound_mb']:>10,.0f} {ratios}".rstrip()
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON of run.py")
    args = parser.parse_args(argv)
    print("CPU per GB, core-seconds (medians over rounds); the bound at full use of the cores")
    for path in args.results:
        found = bounds(json.loads(path.read_text()))
        if found:
            print(f"\n{path}:\n{report(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
