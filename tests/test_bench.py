"""
The benchmark harness's pure parts (``benchmarks/run.py``: percentiles, proxy kinds, the
results table), its charts (``benchmarks/plot.py``) and its bounds (``benchmarks/bound.py``),
without running a benchmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import SkipTest, TestCase

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_module(name: str) -> ModuleType:
    """A script of benchmarks/ as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = load_module("run")
plot = load_module("plot")
bound = load_module("bound")


def measure(round_: int, **figures: Any) -> dict[str, Any]:
    """One run's figures, as run.py records them."""
    return {"round": round_, **figures}


def fake_runs() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Results of two rounds for three kinds, shaped as run.py writes them."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for n, (vncmux, websockify, socat) in {1: (900, 600, 800), 100: (700, 500, 900)}.items():
        runs[f"sessions_{n}"] = {
            "vncmux": [measure(1, throughput_mb=vncmux, cpu_per_gb=1.0, sessions_ok=n),
                       measure(2, throughput_mb=vncmux + 100, cpu_per_gb=1.2, sessions_ok=n)],
            "websockify": [measure(1, throughput_mb=websockify, cpu_per_gb=2.0, sessions_ok=n),
                           measure(2, throughput_mb=websockify * 2, cpu_per_gb=2.0,
                                   sessions_ok=n)],
            "socat": [measure(1, throughput_mb=socat, cpu_per_gb=0.5, sessions_ok=n)],
        }  # fmt: skip
    for n, pss in {100: 8.0, 1000: 14.0}.items():
        runs[f"idle_{n}"] = {"vncmux": [measure(1, pss_per_session=pss)],
                             "websockify": [measure(1, pss_per_session=4000.0)]}  # fmt: skip
    runs["setup_dist"] = {
        kind: [measure(1, rate=500, latency_quantiles_ms=[base * (1 + i / 4) for i in range(5)])]
        for kind, base in (("vncmux", 5.0), ("websockify", 20.0))
    }
    for k in (1, 2, 4):
        runs[f"fleet_{k}"] = {
            "vncmux-redis": [measure(1, setup_rate=400 * k, throughput_mb=800 * k,
                                     revoke_p50_ms=15.0, revoke_last_ms=30.0)]
        }  # fmt: skip
    return runs


class PercentileTests(TestCase):
    """The percentiles the harness computes from raw latencies."""

    def test_percentile_interpolates_between_ranks(self) -> None:
        """p50 of an even sample lies between the middle two; p0 and p100 are the ends."""
        values = [1.0, 2.0, 3.0, 4.0]
        self.assertEqual(run.percentile(values, 50), 2.5)
        self.assertEqual(run.percentile(values, 0), 1.0)
        self.assertEqual(run.percentile(values, 100), 4.0)
        self.assertAlmostEqual(run.percentile(list(range(101)), 99), 99.0)

    def test_percentile_of_nothing_is_an_error(self) -> None:
        """An empty sample has no percentile (the caller reports it as missing)."""
        with self.assertRaises(ValueError):
            run.percentile([], 50)

    def test_quantiles_keep_the_ends_and_the_order(self) -> None:
        """steps + 1 points from the minimum to the maximum, never decreasing."""
        values = sorted([0.5, 9.0, 3.0, 3.0, 7.25, 1.0])
        q = run.quantiles(values, 10)
        self.assertEqual(len(q), 11)
        self.assertEqual((q[0], q[-1]), (0.5, 9.0))
        self.assertEqual(q, sorted(q))

    def test_session_bytes_are_whole_chunks_and_never_zero(self) -> None:
        """Sessions share the total in 64 KiB chunks; many sessions still get one chunk."""
        self.assertEqual(run.session_bytes(512, 1), 512 * 2**20)
        self.assertEqual(run.session_bytes(512, 100) % (64 * 1024), 0)
        self.assertLessEqual(run.session_bytes(512, 100) * 100, 512 * 2**20)
        self.assertEqual(run.session_bytes(1, 1000), 64 * 1024)


class KindTests(TestCase):
    """Proxy kinds: the built-in ones, the variants, the client's command line."""

    def test_variant_is_vncmux_with_options(self) -> None:
        """NAME=ARGS makes a vncmux kind with those options, split as a shell would."""
        spec = run.parse_variant("vncmux-w2=--workers=2 --idle-timeout '30'", "file")
        self.assertEqual(spec, run.KindSpec("vncmux-w2", "vncmux", "file",
                                            ("--workers=2", "--idle-timeout", "30")))  # fmt: skip
        self.assertEqual(run.parse_variant("w2-redis=--workers=2", "redis").store, "redis")

    def test_variant_needs_a_new_name(self) -> None:
        """A variant may not hide a built-in kind, and must have NAME=."""
        for text in ("websockify=--foo", "--workers=2", "=--workers=2", "a,b=--x"):
            with self.assertRaises(argparse.ArgumentTypeError, msg=text):
                run.parse_variant(text, "file")

    def test_kinds_default_to_vncmux_variants_and_baseline(self) -> None:
        """Without --kinds: vncmux, then every variant, then the baseline; --kinds wins."""
        args = run.parse_args(["--quick", "--variant", "w2=--workers=2"])
        self.assertEqual(args.kinds, ("vncmux", "w2", "websockify"))
        args = run.parse_args(["--kinds", "socat,vncmux,websockify"])
        self.assertEqual(args.kinds, ("socat", "vncmux", "websockify"))

    def test_unknown_kind_or_scenario_is_refused(self) -> None:
        """A typo is an error, not a silently smaller run."""
        for argv in (["--kinds", "vncmux,nginx"], ["--scenarios", "bulk_dwn"]):
            with self.assertRaises(SystemExit, msg=argv):
                run.parse_args(argv)

    def test_fleet_needs_a_redis_kind(self) -> None:
        """The fleet shares one Redis store: a file-store kind cannot be the fleet."""
        with self.assertRaises(SystemExit):
            run.parse_args(["--scenarios", "fleet", "--fleet-kind", "vncmux"])
        args = run.parse_args(["--scenarios", "fleet", "--redis-variant", "w2r=--workers=2",
                               "--fleet-kind", "w2r"])  # fmt: skip
        self.assertEqual(args.specs["w2r"].store, "redis")

    def test_socat_routes_each_token_to_its_own_relay(self) -> None:
        """socat has a port per backend: the client gets that port for each token."""
        ps = run.ProxySet(run.BUILTIN_KINDS["socat"], 1, Path(), Path(), run.Registry())
        ps.instances = [run.ProxyInstance("socat", 7001, None, None, "echo0"),  # type: ignore[arg-type]
                        run.ProxyInstance("socat", 7002, None, None, "blast0")]  # type: ignore[arg-type]  # fmt: skip
        self.assertTrue(ps.raw)
        self.assertEqual(ps.route(["blast0", "echo0"]), ([7002, 7001], ["blast0", "echo0"]))
        self.assertIn("TCP:127.0.0.1:5900", ps.argv(7001, target=5900))

    def test_client_argv_flags(self) -> None:
        """True becomes a bare flag, False is left out, values follow their option."""
        argv = run.client_argv("idle", [1, 2], ["t"], raw=True, close_wait=2.5, verbose=False)
        self.assertEqual(argv[2:], ["idle", "--ports", "1,2", "--tokens", "t", "--raw",
                                    "--close-wait", "2.5"])  # fmt: skip

    def test_workers_share_the_descriptors(self) -> None:
        """--workers N (either spelling, auto = the cores) divides an instance's sessions."""
        self.assertEqual(run.workers_of(["--idle-timeout=0"]), 1)
        self.assertEqual(run.workers_of(["--workers=2"]), 2)
        self.assertEqual(run.workers_of(["--workers", "3", "--foo"]), 3)
        self.assertEqual(run.workers_of(["--workers=auto"]), os.cpu_count())

    def test_nofile_advice_names_the_limit_and_the_fix(self) -> None:
        """Too low a descriptor limit is reported with the numbers and what to change."""
        text = run.nofile_advice(10_000, 4096)
        self.assertIn(str(run.descriptors_needed(10_000)), text)
        self.assertIn("4096", text)
        self.assertIn("ulimit -Hn", text)


class TableTests(TestCase):
    """The results table: medians per kind and paired ratios against websockify."""

    def test_every_kind_gets_a_ratio_to_the_reference(self) -> None:
        """Ratios pair each round's runs (round 2 of socat is missing: one pair)."""
        runs = {"sessions_1": fake_runs()["sessions_1"]}
        rows, text = run.build_table(runs, ("vncmux", "socat", "websockify"))
        row = next(r for r in rows if r["metric"] == "throughput_mb")
        self.assertEqual(row["reference"], "websockify")
        self.assertEqual(row["vncmux"]["median"], 950)
        # vncmux/websockify: 900/600 and 1000/1200, median of the two
        self.assertAlmostEqual(row["ratios"]["vncmux"], (1.5 + 1000 / 1200) / 2)
        self.assertAlmostEqual(row["ratios"]["socat"], 800 / 600)
        self.assertEqual(row["ratio"], row["ratios"]["vncmux"])
        self.assertTrue(row["a_leads"])
        self.assertIn("socat/websockify", text)
        json.dumps(rows)  # the JSON file holds these rows as they are

    def test_columns_are_the_kinds_measured(self) -> None:
        """The fleet's kind is not among the kinds asked for but has a column; kinds that
        measured nothing (a fleet-only run) have none."""
        runs = {"fleet_2": fake_runs()["fleet_2"] | {"vncmux": []}}
        rows, text = run.build_table(runs, ("vncmux", "websockify"))
        row = next(r for r in rows if r["metric"] == "setup_rate")
        self.assertEqual(row["vncmux-redis"]["median"], 800)
        self.assertNotIn("vncmux", row)
        self.assertEqual(text.split()[4], "vncmux-redis")


class PlotTests(TestCase):
    """benchmarks/plot.py: which points it draws, and that it writes real PNGs."""

    def test_series_are_medians_sorted_by_size(self) -> None:
        """sessions_N scenarios become (N, median) points per kind."""
        speed = plot.series(fake_runs(), "sessions_", "throughput_mb")
        self.assertEqual(speed["vncmux"], [(1, 950), (100, 750)])
        self.assertEqual(speed["websockify"], [(1, 900), (100, 750)])
        self.assertEqual(speed["socat"], [(1, 800), (100, 900)])
        self.assertEqual(plot.series(fake_runs(), "fleet_", "setup_rate")["vncmux-redis"],
                         [(1, 400), (2, 800), (4, 1600)])  # fmt: skip

    def test_latency_distribution_is_the_median_of_rounds(self) -> None:
        """Each kept quantile is the median of that quantile over the rounds."""
        rounds = ([1.0, 2.0, 9.0], [3.0, 4.0, 5.0], [2.0, 3.0, 4.0])
        measures = [measure(i, latency_quantiles_ms=q) for i, q in enumerate(rounds, 1)]
        runs = {"setup_dist": {"vncmux": measures}}
        self.assertEqual(plot.latency_distribution(runs), {"vncmux": [2.0, 3.0, 5.0]})

    def test_files_merge_by_kind_unless_they_measured_the_same(self) -> None:
        """Two files with the same scenarios: the second's kinds are labelled by its file.
        Files with different scenarios of a kind make one line."""
        directory = Path(self.mktemp())
        for name in ("before", "after"):
            (directory / f"{name}.json").write_text(json.dumps({"runs": fake_runs()}))
        runs = plot.load([directory / "before.json", directory / "after.json"])
        self.assertEqual(set(runs["sessions_1"]), {"vncmux", "websockify", "socat",
                         "vncmux (after)", "websockify (after)", "socat (after)"})  # fmt: skip
        big = {"idle_9000": {"vncmux": [measure(1, pss_per_session=14.0)]}}
        (directory / "big.json").write_text(json.dumps({"runs": big}))
        runs = plot.load([directory / "before.json", directory / "big.json"])
        self.assertEqual(plot.series(runs, "idle_", "pss_per_session")["vncmux"],
                         [(100, 8.0), (1000, 14.0), (9000, 14.0)])  # fmt: skip

    def test_writes_one_png_per_chart_with_data(self) -> None:
        """Every chart is drawn from a full results file; a chart without data is not."""
        require_matplotlib()
        directory = Path(self.mktemp())
        results = directory / "latest.json"
        results.write_text(json.dumps({"runs": fake_runs()}))
        self.assertEqual(plot.main([str(results), "--out", str(directory / "img")]), 0)
        written = sorted(p.name for p in (directory / "img").iterdir())
        self.assertEqual(written, sorted(f"bench-{name}.png" for name in plot.CHARTS))
        for name in written:
            self.assertEqual((directory / "img" / name).read_bytes()[:8], PNG_MAGIC)
        only_idle = directory / "idle.json"
        only_idle.write_text(json.dumps({"runs": {"idle_100": fake_runs()["idle_100"]}}))
        plot.main([str(only_idle), "--out", str(directory / "idle")])
        self.assertEqual([p.name for p in (directory / "idle").iterdir()],
                         ["bench-memory-per-idle-session.png"])  # fmt: skip

    def mktemp(self) -> str:
        """A fresh directory, removed after the test."""
        import shutil
        import tempfile

        path = tempfile.mkdtemp(prefix="vncmux-bench-")
        self.addCleanup(shutil.rmtree, path, True)
        return path


def require_matplotlib() -> None:
    """matplotlib comes with the bench extra: skipped without it, failed under CI."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        message = "matplotlib is not installed: pip install -e '.[bench]'"
        if os.environ.get("CI"):
            raise AssertionError(message) from None
        raise SkipTest(message) from None


class BoundTests(TestCase):
    """benchmarks/bound.py: CPU per GB of the whole load, and what the cores would move."""

    def test_cost_and_bound_per_round(self) -> None:
        """Each round's CPU use over its own throughput (MB/s, or MiB/s for bulk_down); the
        bound is the run's cores over the median total; rounds without CPU use are left out."""
        def util(proxy: float, backend: float, client: float) -> dict[str, float]:
            return {"proxy": proxy, "backend": backend, "client": client}

        runs = {
            "sessions_1": {
                "vncmux": [measure(1, throughput_mb=1000, util=util(0.5, 0.3, 0.2)),
                           measure(2, throughput_mb=500, util=util(0.5, 0.5, 0.5)),
                           measure(3, throughput_mb=800)],
                "websockify": [measure(1, throughput_mb=800, util=util(1.0, 0.3, 0.3))],
            },
            "bulk_down": {"vncmux": [measure(1, throughput=1000, util=util(1.0, 0, 0))]},
        }  # fmt: skip
        found = bound.bounds({"environment": {"cpus": 2}, "runs": runs})
        vncmux = found["sessions_1"]["vncmux"]
        self.assertAlmostEqual(vncmux["proxy"], 0.75)  # median of 0.5 and 1.0 s per GB
        self.assertAlmostEqual(vncmux["total"], 2.0)  # median of 1.0 and 3.0
        self.assertAlmostEqual(vncmux["bound_mb"], 1000)
        self.assertAlmostEqual(found["sessions_1"]["websockify"]["bound_mb"], 1000)
        self.assertAlmostEqual(found["bulk_down"]["vncmux"]["total"], 1e6 / 2**20)  # MiB/s
        text = bound.report(found)
        line = next(x for x in text.splitlines() if x.startswith("sessions_1") and "vncmux" in x)
        self.assertEqual(line.split()[-2:], ["1.00", "1.25"])  # bound ratio, ceiling
        self.assertNotIn("idle", text)
