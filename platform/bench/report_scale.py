"""How long `clgrid report` takes over a large sweep, and its peak memory.

    python -m clgrid.bench.report_scale [--trials 240] [--configs 8] [--reps 3] [--keep DIR]

Writes a sweep-shaped MLflow store (SQLite, local artifacts) in a temporary folder through the same
writers `clgrid run` uses (clgrid.tracking.start_sweep, log_metrics, log_matrix, end_run): a parent
run and configs x seeds trial runs with their tags, params, final metrics and accuracy matrices
(made-up numbers). Then runs `clgrid report` on it in a fresh process `--reps` times and prints
each run's wall seconds and peak RSS. The trials are stand-ins for TrialSpecs (no strategy registry).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from clgrid import tracking
from clgrid.benchmarks import BenchmarkSpec
from clgrid.sweep import layout

EXPERIMENT = "report-scale"
EXPERIENCES = 5
# Two strategies share the configurations, each varying one hyperparameter, as a real grid does.
AXES = (("replay", "buffer_size", 50), ("ewc", "ewc_lambda", 1.0))


class _Section(BaseModel):
    """A TrialSpec section (benchmark, strategy, model, train): attributes and model_dump."""

    model_config = ConfigDict(extra="allow", frozen=True)


@dataclass(frozen=True)
class _Trial:
    """What clgrid.tracking reads from a TrialSpec, without the strategy registry (and torch)."""

    benchmark: BenchmarkSpec
    strategy: _Section
    model: _Section
    train: _Section
    seed: int
    spec_hash: str = "report-scale"

    @property
    def config_key(self) -> str:
        sections = {s: getattr(self, s).model_dump(mode="json") for s in ("benchmark", "strategy", "model", "train")}
        return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def trial_key(self) -> str:
        return hashlib.sha256(f"{self.config_key}-{self.seed}".encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return f"{self.strategy.name}/{self.benchmark.id}/{self.benchmark.scenario}/seed{self.seed}"


def grid(configs: int, seeds: int) -> list[_Trial]:
    benchmark = BenchmarkSpec(source="digits", scenario="class-il", experiences=EXPERIENCES)  # tags read its class order
    model, train = _Section(name="mlp", hidden=100), _Section(lr=0.01, epochs=1, batch_size=32)
    trials = []
    for i in range(configs):
        name, param, base = AXES[i % len(AXES)]
        strategy = _Section(name=name, **{param: base * 2 ** (i // len(AXES))})
        trials += [_Trial(benchmark, strategy, model, train, seed) for seed in range(seeds)]
    return trials


def write_store(root: Path, configs: int, seeds: int) -> str:
    """The sweep's runs in `root`'s SQLite store; returns its tracking URI."""
    uri = layout.sqlite_uri(root)
    exp_id = tracking.experiment_id(uri, EXPERIMENT, str(root))
    trials = grid(configs, seeds)
    parent, run_ids = tracking.start_sweep(uri, exp_id, "scale", trials[0].spec_hash, trials)
    rng = random.Random(0)
    for trial in trials:
        run_id = run_ids[trial.trial_key]
        R = [[rng.uniform(0.5, 1.0) if j <= i else rng.uniform(0.0, 0.1) for j in range(EXPERIENCES)]
             for i in range(EXPERIENCES)]
        tracking.log_metrics(uri, run_id, EXPERIENCES - 1, {
            "acc": sum(R[-1]) / EXPERIENCES, "train_flops": 1e9 * (1 + rng.random()),
            "train_seconds": 10 * rng.random(), "device_seconds": 8 * rng.random(), "peak_memory_bytes": 2e8,
            "replay_bytes": 1e6 * (trial.strategy.name == "replay"), "model_bytes": 4e5,
            "strategy_state_bytes": 8e5 * (trial.strategy.name == "ewc")})
        tracking.log_matrix(uri, run_id, R, [0.1] * EXPERIENCES, root / "matrices" / trial.trial_key)
        tracking.end_run(uri, run_id, "FINISHED")
    tracking.end_run(uri, parent, "FINISHED")
    return uri


def time_report(experiment: str, uri: str, out: Path) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds of one `clgrid report` in a fresh process."""
    clgrid = Path(sys.executable).with_name("clgrid")  # the console script, as a user runs it
    cmd = [str(clgrid), "report", experiment, "--tracking-uri", uri, "--out", str(out)]
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: nobody reads while it runs
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the largest child's
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"clgrid report failed ({proc.returncode}): {err.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # Linux: KB


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m clgrid.bench.report_scale", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=240, help="trial runs in the sweep (a multiple of --configs)")
    p.add_argument("--configs", type=int, default=8, help="configurations (the rest are seeds)")
    p.add_argument("--reps", type=int, default=3, help="timed reports")
    p.add_argument("--keep", type=Path, help="write the store here and keep it (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.configs < 1 or args.trials % args.configs:
        p.error(f"--trials {args.trials} is not a multiple of --configs {args.configs}")
    with tempfile.TemporaryDirectory(prefix="clgrid-report-scale-") as tmp:
        root = args.keep or Path(tmp)
        start = time.perf_counter()
        uri = write_store(root, args.configs, args.trials // args.configs)
        print(f"store: {args.trials} trial runs ({args.configs} configurations x {args.trials // args.configs} seeds) "
              f"in {time.perf_counter() - start:.1f} s at {uri}", flush=True)
        for rep in range(args.reps):
            seconds, rss, cpu = time_report(EXPERIMENT, uri, Path(tmp) / "report")
            print(f"clgrid report, run {rep + 1}/{args.reps}: {seconds:.2f} s wall, {cpu:.2f} s CPU, {rss:.0f} MB "
                  f"peak RSS", flush=True)


if __name__ == "__main__":
    main()
