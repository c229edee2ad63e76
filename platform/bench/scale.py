"""What the platform costs per trial when a sweep has hundreds or thousands of tiny trials.

    python -m clgrid.bench.scale [--trials 240,2000] [--report-runs 2000] [--quick] [--out FILE]
    clgrid bench --scale [--scale-trials 240,2000] [--quick] [--out FILE]

1. platform cost per trial: a sweep of 8 configurations x n/8 seeds on digits (class-IL, 5
   experiences, an MLP 64, 1 epoch: 0.05-0.2 s of training a trial) through `clgrid run`'s path in a
   fresh process (``overhead.sweep_child``). The cost is the core-seconds between the first trial's
   start and the last trial's end not spent training, per trial: what each further trial adds. The
   sweep's fixed cost (Ray start-up, the workers' imports before their first trial, shut-down) is
   printed apart, and so is the driver's own CPU time per trial (Ray Tune's bookkeeping, MLflow
   runs, progress lines).
2. the driver's memory: its peak resident set (VmHWM) at each size; flat means the largest size
   costs at most 1.5x the smallest.
3. `clgrid report` over a sweep of ``--report-runs`` runs (``report_scale``): its wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clgrid.bench import overhead

COST_TARGET = 0.10  # core-seconds of platform cost per trial (issue 17)
MEMORY_TARGET = 1.5  # the driver's peak RSS at the largest size / at the smallest: "flat"
REPORT_TARGET = 10.0  # seconds of `clgrid report` over 2,000 runs
CONFIGS = [{"name": "naive"}, {"name": "joint"}, {"name": "replay", "buffer_size": [50, 200]},
           {"name": "ewc", "ewc_lambda": [10.0, 1000.0]}, {"name": "si"}, {"name": "lwf"}]  # 8 configurations


def scale_spec(trials: int, root: Path) -> dict[str, Any]:
    """A pipeline of 8 tiny configurations x trials/8 seeds on digits."""
    if trials % 8:
        raise SystemExit(f"--trials {trials}: a multiple of 8 (8 configurations x seeds) was expected")
    return {
        "name": "scale",
        "benchmarks": [{"source": "digits", "scenario": "class-il", "experiences": 5}],
        "strategies": CONFIGS, "model": {"name": "mlp", "hidden": [64]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.001}, "seeds": list(range(trials // 8)),
        "resources": {"cpus_per_trial": 1}, "storage": {"root": str(root)},
    }


def bench_sweep_scale(trials: int, root: Path) -> dict[str, Any]:
    """One sweep of ``trials`` tiny trials in a fresh, niced process: per-trial cost and driver memory."""
    spec = scale_spec(trials, root)
    cmd = [sys.executable, "-m", "clgrid.bench.overhead", "--sweep-child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=36000)
    if proc.returncode:
        raise RuntimeError(f"scale sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    marks, ts = data["marks"], data["trials"]
    overhead.check_sweep(data)
    cores = os.cpu_count() or 1
    first, last = min(t["start"] for t in ts), max(t["end"] for t in ts)
    train = sum(t["train_seconds"] for t in ts)
    return {
        "trials": len(ts), "cores": cores, "wall": marks["shut_down"] - marks["start"], "train_seconds": train,
        "steady_wall": last - first, "cost_per_trial": (cores * (last - first) - train) / len(ts),
        "fixed": (first - marks["start"]) + (marks["shut_down"] - last),
        "driver_peak_rss_mb": data["driver"]["peak_rss_mb"], "driver_cpu": data["driver"]["cpu_seconds"],
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def bench_report(runs: int) -> dict[str, Any]:
    """`clgrid report` over a sweep-shaped store of ``runs`` trial runs (8 configurations)."""
    from clgrid.bench import report_scale

    with tempfile.TemporaryDirectory(prefix="clgrid-report-scale-") as tmp:
        start = time.perf_counter()
        uri = report_scale.write_store(Path(tmp), 8, runs // 8)
        written = time.perf_counter() - start
        seconds, rss, cpu = report_scale.time_report(report_scale.EXPERIMENT, uri, Path(tmp) / "report")
    return {"runs": runs, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": rss, "store_seconds": written}


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def print_sweep(s: dict[str, Any]) -> None:
    print(f"scale: {s['trials']} trials, {s['train_seconds']:.1f} train s in {s['wall']:.1f} s wall "
          f"({s['fixed']:.1f} s of it start-up and shut-down), driver CPU {s['driver_cpu']:.1f} s "
          f"({s['driver_cpu'] / s['trials']:.3f} s per trial), driver peak RSS {s['driver_peak_rss_mb']:.0f} MB, load "
          f"average {s['load']}: platform cost {s['cost_per_trial']:.3f} core-s per trial "
          f"(target <= {COST_TARGET}: {verdict(s['cost_per_trial'] <= COST_TARGET)})", flush=True)


def report(results: dict[str, Any]) -> None:
    """The figures that compare sizes, and the report's (each sweep's line is printed as it ends)."""
    sweeps = results["sweeps"]
    if len(sweeps) > 1:
        growth = sweeps[-1]["driver_peak_rss_mb"] / sweeps[0]["driver_peak_rss_mb"]
        print(f"scale: driver memory {sweeps[0]['trials']} -> {sweeps[-1]['trials']} trials x{growth:.2f} "
              f"(target <= x{MEMORY_TARGET}: {verdict(growth <= MEMORY_TARGET)})", flush=True)
    r = results["report"]
    print(f"scale: clgrid report over {r['runs']} runs {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU), peak RSS "
          f"{r['peak_rss_mb']:.0f} MB "
          f"(target < {REPORT_TARGET:.0f} s: {verdict(r['seconds'] < REPORT_TARGET)})", flush=True)


def run(sizes: list[int], report_runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {"sweeps": []}
    with tempfile.TemporaryDirectory(prefix="clgrid-scale-") as tmp:
        for n in sizes:
            results["sweeps"].append(bench_sweep_scale(n, Path(tmp) / f"sweep-{n}"))
            print_sweep(results["sweeps"][-1])  # at once: the sizes after it may take an hour
    results["report"] = bench_report(report_runs)
    report(results)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m clgrid.bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--trials", help="sweep sizes, comma-separated multiples of 8 (default 240,2000; quick 8,16)")
    p.add_argument("--report-runs", type=int, help="runs in the store `clgrid report` reads (default 2000; quick 16)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite (no targets apply)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    trials = args.trials or ("8,16" if args.quick else "240,2000")
    results = run([int(n) for n in trials.split(",")], args.report_runs or (16 if args.quick else 2000))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
