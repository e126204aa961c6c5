"""
PNG charts of ``benchmarks/run.py`` results (matplotlib): throughput against concurrent
sessions, memory per idle session against sessions, the setup latency distribution and the
fleet's scaling against its number of instances K. Each chart is drawn only when the results
hold its scenarios; every point is the median over the run's rounds.

    .venv/bin/python benchmarks/plot.py benchmarks/results/latest.json --out docs/img

Several results files may be given: a kind's scenarios from different files make one line
(idle sizes measured in two runs); a kind measured again in the same scenario (one run
before and one after a change) is drawn as its own line, labelled with the file's name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Runs = dict[str, dict[str, list[dict[str, Any]]]]
Series = dict[str, list[tuple[int, float]]]

#: Fixed colours, so that a kind looks the same in every chart and every run.
COLOURS = {
    "vncmux": "tab:blue",
    "vncmux-redis": "tab:cyan",
    "websockify": "tab:orange",
    "socat": "tab:gray",
}
OTHER_COLOURS = ("tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive")


def load(paths: Sequence[Path]) -> Runs:
    """
    The ``runs`` of every file, merged: a kind's scenarios from several files make one
    line; a scenario a kind already has from an earlier file is kept as ``kind (file)``.
    """
    merged: Runs = {}
    for path in paths:
        runs: Runs = json.loads(path.read_text())["runs"]
        clash = {k for scenario, by_kind in runs.items() for k in by_kind
                 if k in merged.get(scenario, {})}  # fmt: skip
        for scenario, by_kind in runs.items():
            for kind, measures in by_kind.items():
                name = f"{kind} ({path.stem})" if kind in clash else kind
                merged.setdefault(scenario, {})[name] = measures
    return merged


def median_of(measures: list[dict[str, Any]], key: str) -> float | None:
    """The median of one figure over the rounds that have it."""
    values = [m[key] for m in measures if m.get(key) is not None]
    return statistics.median(values) if values else None


def series(runs: Runs, prefix: str, key: str) -> Series:
    """
    ``{kind: [(x, median), ...]}`` sorted by x, from the scenarios named ``prefix + x``
    (``sessions_100``, ``idle_1000``, ``fleet_4``).
    """
    out: Series = {}
    for scenario, by_kind in runs.items():
        tail = scenario.removeprefix(prefix)
        if tail == scenario or not tail.isdigit():
            continue
        for kind, measures in by_kind.items():
            value = median_of(measures, key)
            if value is not None:
                out.setdefault(kind, []).append((int(tail), value))
    return {kind: sorted(points) for kind, points in out.items()}


def latency_distribution(runs: Runs, scenario: str = "setup_dist") -> dict[str, list[float]]:
    """Per kind, the median over rounds of each kept quantile of the setup latency (ms)."""
    out: dict[str, list[float]] = {}
    for kind, measures in runs.get(scenario, {}).items():
        rounds = [m["latency_quantiles_ms"] for m in measures if m.get("latency_quantiles_ms")]
        if rounds and len({len(r) for r in rounds}) == 1:
            out[kind] = [statistics.median(values) for values in zip(*rounds, strict=True)]
    return out


def colour(kind: str, kinds: Sequence[str]) -> str:
    """A kind's colour: fixed for the known kinds, else the next free one."""
    if kind in COLOURS:
        return COLOURS[kind]
    others = [k for k in kinds if k not in COLOURS]
    return OTHER_COLOURS[others.index(kind) % len(OTHER_COLOURS)]


def _lines(
    ax: Any, data: Series, ylabel: str, xlabel: str, log_x: bool = True, log_y: bool = False
) -> None:
    kinds = sorted(data)
    for kind in kinds:
        xs, ys = zip(*data[kind], strict=True)
        ax.plot(xs, ys, marker="o", label=kind, color=colour(kind, kinds))
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:,.0f}")
    if log_y:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def chart_throughput(runs: Runs, plt: Any) -> Any | None:
    """Backend→browser MB/s and proxy CPU per GB against concurrent sessions."""
    speed = series(runs, "sessions_", "throughput_mb")
    if not speed:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _lines(left, speed, "MB/s, all sessions together", "concurrent sessions")
    left.set_title("backend→browser throughput")
    for kind, points in series(runs, "sessions_", "sessions_ok").items():
        for n, held in points:
            if held < n:  # websockify cannot hold 1,000 sessions: say so at the point
                y = dict(speed[kind])[n]
                note = f"{kind}: {held:,.0f} of {n:,} sessions"
                left.annotate(note, (n, y), textcoords="offset points", xytext=(-150, -14),
                              fontsize=8)  # fmt: skip
    _lines(right, series(runs, "sessions_", "cpu_per_gb"), "proxy CPU, core·s per GB",
           "concurrent sessions")  # fmt: skip
    right.set_title("proxy CPU per GB relayed")
    return fig


def chart_memory(runs: Runs, plt: Any) -> Any | None:
    """Pss per idle session against the number of idle sessions (log scales)."""
    pss = series(runs, "idle_", "pss_per_session")
    if not pss:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _lines(ax, pss, "Pss per idle session, KiB", "idle sessions", log_y=True)
    ax.set_title("memory per idle session")
    return fig


def chart_setup_latency(runs: Runs, plt: Any) -> Any | None:
    """The distribution (CDF) of connection setup latency, 8 in flight."""
    dist = latency_distribution(runs)
    if not dist:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    kinds = sorted(dist)
    for kind in kinds:
        values = dist[kind]
        steps = len(values) - 1
        ax.plot(values, [100 * i / steps for i in range(steps + 1)], label=kind,
                color=colour(kind, kinds))  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("setup latency, ms (connect to the first RFB bytes)")
    ax.set_ylabel("percent of connections")
    ax.axhline(99, color="black", linewidth=0.6, linestyle=":")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("connection setup latency")
    return fig


def chart_fleet(runs: Runs, plt: Any) -> Any | None:
    """Aggregate setup rate, bulk throughput and revocation time against K instances."""
    rate = series(runs, "fleet_", "setup_rate")
    if not rate:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    _lines(axes[0], rate, "connections per second", "instances K", log_x=False)
    axes[0].set_title("setup rate, all instances")
    _lines(axes[1], series(runs, "fleet_", "throughput_mb"), "MB/s", "instances K", log_x=False)
    axes[1].set_title("bulk throughput, all instances")
    revoke = {
        f"{kind} {label}": points
        for key, label in (("revoke_p50_ms", "p50"), ("revoke_last_ms", "last close"))
        for kind, points in series(runs, "fleet_", key).items()
    }
    _lines(axes[2], revoke, "ms from the revocation", "instances K", log_x=False)
    axes[2].set_title("revoked token: sessions closed")
    for ax in axes:
        ax.set_xticks(sorted({k for points in rate.values() for k, _ in points}))
    return fig


CHARTS: dict[str, Callable[[Runs, Any], Any | None]] = {
    "throughput-vs-sessions": chart_throughput,
    "memory-per-idle-session": chart_memory,
    "setup-latency": chart_setup_latency,
    "fleet-scaling": chart_fleet,
}


def main(argv: list[str] | None = None) -> int:
    """Write one PNG per chart that the results have data for; print each path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="results JSON of run.py")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="directory")
    parser.add_argument("--prefix", default="bench-", help="file name prefix")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in CHARTS.items():
        fig = draw(runs, plt)
        if fig is None:
            print(f"{name}: no data in the results, not drawn", file=sys.stderr)
            continue
        fig.tight_layout()
        path = args.out / f"{args.prefix}{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
