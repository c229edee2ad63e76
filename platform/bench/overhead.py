"""What the platform costs a user, against a plain torch loop, measured in one run and printed as ratios.

    python -m clgrid.bench.overhead [--quick] [--reps 3] [--epochs 4] [--out results.json]
    clgrid bench [the same options]

1. trainer overhead: the clgrid trainer (naive, replay, EWC) against hand-written torch loops doing
   the same work: same data, model, seed, batches, optimizer reset per experience, evaluation of
   every test experience after every experience, one thread. The loops draw the same random numbers
   in the same order, so a matching accuracy matrix shows the work is the same. Replay and EWC are
   also timed against the plain naive loop (the issue 17 target: EWC at most 2x).
2. sweep efficiency: the quickstart grid (12 trials, 1 CPU each) through ``sweep.prepare_and_connect``
   and ``sweep.run`` in a fresh process: sum of the trials' train_seconds / (wall x cores), and the
   per-trial overhead (core-seconds not spent training, per trial).
3. evaluation share: the part of an instrumented trial spent filling the accuracy matrix.
4. instrumentation cost: FLOP counting, checkpoints, Arrow replay commits and MLflow logging (the
   sweep's own TrialLogger: history.json, paced uploads, the matrices, the run's end) on against
   all off.
5. scaling: time per trial against the number of experiences T (permuted mnist5k, domain-IL),
   fitted as a*T + c*T^2 (training grows with T, evaluation with T^2); and replay memory size.

Timed variants are interleaved within each repetition (the order rotating), and ratios are medians
of per-repetition ratios, so load from other processes weighs on both sides alike. ``--quick``
runs a tiny version (digits, a few steps, a 2-trial sweep) for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clgrid import tracking
from clgrid.spec import PipelineSpec, TrialSpec, expand, load_spec
from clgrid.sweep.layout import SweepDir, TrialDir
from clgrid.sweep.trial_logger import TrialLogger
from clgrid.train.trainer import ExperienceReport, Trainer

STRATEGIES = {"naive": {"name": "naive"}, "replay": {"name": "replay", "buffer_size": 200},
              "ewc": {"name": "ewc", "ewc_lambda": 1000.0}}
EWC_TARGET = 2.0  # issue 17: EWC at most 2x plain naive training (Avalanche: 2.5x on the same work)


# ---- workloads ---------------------------------------------------------------------------------

def quickstart_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The quickstart pipeline as a dict (``--quick``: digits, 2 experiences, a few steps)."""
    spec = load_spec("quickstart").model_dump(mode="json")
    if args.quick:
        spec["benchmarks"] = [{"source": "digits", "scenario": "class-il", "experiences": 2}]
        spec["model"] = {"name": "mlp", "hidden": [64]}
        spec["train"] = {"iterations": 10, "batch_size": 32, "lr": 0.001}
    elif args.epochs:
        spec["train"]["epochs"] = args.epochs
    return spec


def trial_of(spec: dict[str, Any], strategy: dict[str, Any], **update: Any) -> TrialSpec:
    return expand(PipelineSpec.model_validate({**spec, "strategies": [strategy], "seeds": [0], **update}))[0]


class TimedTrainer(Trainer):
    """The trainer, with the seconds spent in evaluation (filling the accuracy matrix) counted."""

    eval_seconds = 0.0

    def evaluate(self, *args: Any, **kwargs: Any) -> list[float]:
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.perf_counter() - start


# ---- the plain loops -----------------------------------------------------------------------------

def plain_loop(trial: TrialSpec, stream, kind: str) -> tuple[list[list[float]], int]:
    """Naive fine-tuning, experience replay or EWC written directly in torch: (R, samples trained)."""
    torch.set_num_threads(int(trial.resources.cpus_per_trial))
    torch.use_deterministic_algorithms(False)
    cfg, train = trial.strategy, trial.train
    torch.manual_seed(trial.seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(np.prod(stream.input_shape))
    for hidden in trial.model.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    model = nn.Sequential(*layers, nn.Linear(width, stream.num_classes))
    shuffle = torch.Generator().manual_seed(trial.seed)
    rng = torch.Generator().manual_seed(trial.seed + 1)
    memory = ReservoirBuffer(cfg.buffer_size, stream.input_shape) if kind == "replay" else None
    anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []  # EWC: (fisher, weights) per experience
    params = dict(model.named_parameters())

    def evaluate() -> list[float]:
        model.eval()
        row = []
        with torch.inference_mode():
            for exp in stream.test:
                correct = sum(int((model(exp.x[i:i + train.eval_batch_size]).argmax(1)
                                   == exp.y[i:i + train.eval_batch_size]).sum())
                              for i in range(0, len(exp.y), train.eval_batch_size))
                row.append(correct / len(exp.y))
        model.train()
        return row

    evaluate()  # the fresh model (the trainer's b row)
    R, samples = [], 0
    for exp in stream.train:
        optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
        for idx in batches(len(exp.y), train.batch_size, train.epochs, train.iterations, shuffle):
            x, y = exp.x[idx], exp.y[idx]
            new_x, new_y = x, y
            if memory is not None and len(memory):
                mx, my = memory.sample(cfg.replay_batch_size or train.batch_size, rng)
                x, y = torch.cat([x, mx]), torch.cat([y, my])
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if anchors:
                penalty = sum(torch.stack([(f[k] * (params[k] - w[k]).pow(2)).sum() for k in w]).sum()
                              for f, w in anchors)
                loss = loss + 0.5 * cfg.ewc_lambda * penalty
            loss.backward()
            optimizer.step()
            if memory is not None:
                memory.insert(new_x, new_y, rng)
            samples += len(y)
        if kind == "ewc":
            pick = torch.randperm(len(exp.y), generator=rng)[:cfg.fisher_samples]
            anchors.append((fisher_diagonal(model, exp.x[pick], exp.y[pick]),
                            {k: p.detach().clone() for k, p in params.items()}))
        R.append(evaluate())
    return R, samples


def batches(n: int, size: int, epochs: int | None, iterations: int | None, shuffle: torch.Generator):
    """Index batches of shuffled passes over n samples: ``epochs`` passes, or ``iterations`` steps."""
    steps = 0
    for _ in range(epochs or iterations):
        order = torch.randperm(n, generator=shuffle)
        for start in range(0, n, size):
            if steps == iterations:
                return
            steps += 1
            yield order[start:start + size]


class ReservoirBuffer:
    """A fixed-size reservoir of (x, y) in preallocated tensors."""

    def __init__(self, capacity: int, shape: tuple[int, ...]):
        self.x, self.y = torch.zeros(capacity, *shape), torch.zeros(capacity, dtype=torch.long)
        self.capacity, self.seen = capacity, 0

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def sample(self, n: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randperm(len(self), generator=rng)[:n]
        return self.x[idx], self.y[idx]

    def insert(self, x: Tensor, y: Tensor, rng: torch.Generator) -> None:
        draws = torch.rand(len(y), generator=rng, dtype=torch.float64)
        k = torch.arange(self.seen, self.seen + len(y))
        slots = torch.where(k < self.capacity, k, (draws * (k + 1)).long())
        for i, slot in enumerate(slots.tolist()):  # in order: a later sample wins a shared slot
            if slot < self.capacity:
                self.x[slot], self.y[slot] = x[i], y[i]
        self.seen += len(y)


def fisher_diagonal(model: nn.Sequential, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Mean squared per-sample gradient of the loss (the empirical Fisher diagonal) of an MLP, in
    closed form: a Linear layer's per-sample gradient is d_i a_i^T, so the sum of its squares is
    (d^2)^T (a^2) over the layer's inputs a and output gradients d of one backward pass."""
    inputs, outputs, h = {}, {}, x
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            inputs[i] = h.detach()
        h = layer(h)
        if isinstance(layer, nn.Linear):
            outputs[i] = h
    deltas = torch.autograd.grad(F.cross_entropy(h, y, reduction="sum"), list(outputs.values()))
    fisher = {}
    for (i, a), d in zip(inputs.items(), deltas):
        fisher[f"{i}.weight"] = d.square().T @ a.square() / len(y)
        fisher[f"{i}.bias"] = d.square().sum(0) / len(y)
    return fisher


# ---- 1, 3, 4: trainer overhead, evaluation share, instrumentation ------------------------------

class Logged:
    """What a sweep trial logs to MLflow, through the sweep's TrialLogger (each experience, the
    matrices, the run's end), into a local SQLite store."""

    def __init__(self, root: Path):
        self.root, self.uri = root, f"sqlite:///{root}/mlflow.db"
        self.exp = tracking.experiment_id(self.uri, "bench", str(root))

    def new_run(self) -> str:
        return tracking.with_retries(lambda: tracking.client(self.uri).create_run(self.exp)).info.run_id

    def run_trial(self, trial: TrialSpec, trial_dir: Path, run_id: str) -> TimedTrainer:
        log = TrialLogger(self.uri, run_id, TrialDir(trial_dir), tracking.retry_seconds())
        log.start(first=True)

        def logged(report: ExperienceReport) -> None:
            log.experience(**vars(report))

        trainer = TimedTrainer(trial, trial_dir, on_experience=logged)
        result = trainer.run()
        log.flush()
        log.matrix(result.R, result.b, result.R_val, result.b_val)
        log.end("FINISHED")
        return trainer


def bench_trainer(spec: dict[str, Any], reps: int, root: Path) -> dict[str, Any]:
    """Plain loop, trainer (instrument=False) and instrumented trial, interleaved per repetition."""
    logged = Logged(root)
    out = {}
    for name, strategy in STRATEGIES.items():
        trial = trial_of(spec, strategy)
        # warm-up: data load, first optimizer step (imports torch._dynamo), FLOP counter, MLflow client
        warm = trial_of(spec, strategy, train={**spec["train"], "epochs": None, "iterations": 2})
        stream = Trainer(warm, root / "warm", instrument=False).stream
        plain_loop(warm, stream, name)
        Trainer(warm, root / "warm", instrument=False).run()
        logged.run_trial(warm, root / f"warm-{name}", logged.new_run())

        times: dict[str, list[float]] = {"plain": [], "clgrid": [], "instrumented": []}
        if name != "naive":  # the yardstick: every strategy against plain naive training
            times["plain_naive"] = []
        cpu: dict[str, list[float]] = {k: [] for k in times}  # process CPU seconds: other processes' load barely moves them
        evals, R = [], {}
        for r in range(reps):
            run_dir, run_id = root / f"{name}-{r}", logged.new_run()

            def plain() -> None:
                R["plain"], R["samples"] = plain_loop(trial, stream, name)

            def bare() -> None:
                trainer = Trainer(trial, run_dir / "bare", instrument=False)
                result = trainer.run()
                R["clgrid"], R["clgrid_samples"] = result.R, result.costs["samples_seen"]

            def instrumented() -> None:
                trainer = logged.run_trial(trial, run_dir / "instrumented", run_id)
                evals.append(trainer.eval_seconds)

            variants = [("plain", plain), ("clgrid", bare), ("instrumented", instrumented)]
            if "plain_naive" in times:
                variants.append(("plain_naive", lambda: plain_loop(trial, stream, "naive")))
            k = r % len(variants)
            for label, fn in variants[k:] + variants[:k]:  # rotate the order per repetition
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
        samples = R["samples"]
        def ratio(of: dict[str, list[float]], a: str, b: str) -> list[float]:
            """Median, lowest and highest of the per-repetition ratios a/b."""
            each = [x / y for x, y in zip(of[a], of[b])]
            return [statistics.median(each), min(each), max(each)]

        out[name] = {
            "samples": samples, "seconds": {k: statistics.median(v) for k, v in times.items()}, "runs": times,
            "samples_per_s": {k: samples / statistics.median(v) for k, v in times.items()},
            "overhead": ratio(times, "clgrid", "plain"), "overhead_cpu": ratio(cpu, "clgrid", "plain"),
            # interference from other processes only slows a run down: the fastest runs are the least disturbed
            "overhead_fastest": min(times["clgrid"]) / min(times["plain"]),
            "overhead_instrumented": ratio(times, "instrumented", "plain"),
            "instrumentation": ratio(times, "instrumented", "clgrid"),
            "eval_share": statistics.median(e / t for e, t in zip(evals, times["instrumented"])),
            "same_matrix": R["plain"] == R["clgrid"] and samples == R["clgrid_samples"],
        }
        if "plain_naive" in times:
            out[name]["against_plain_naive"] = ratio(times, "clgrid", "plain_naive")
    return out


# ---- 2: sweep efficiency -------------------------------------------------------------------------

def sweep_child(spec_json: str) -> None:
    """In a fresh process, as `clgrid run` does it: prepare while Ray starts, run, shut Ray down."""
    import ray

    from clgrid.sweep import driver as sweep

    spec = PipelineSpec.model_validate_json(spec_json)
    marks = {"start": time.time()}
    sweep_dir = sweep.prepare_and_connect(spec, None)
    marks["started"] = time.time()
    outcome = sweep.run(sweep_dir, progress=False)
    marks["ran"] = time.time()
    ray.shutdown()
    marks["shut_down"] = time.time()
    trials = []
    for t in outcome.trials:
        folder = SweepDir(sweep_dir).trial(t.trial.trial_key)
        attempts = folder.attempts.read_text()
        starts = [float(line.split()[0]) for line in attempts.splitlines()]
        trials.append({"start": starts[0], "end": folder.result.stat().st_mtime,
                       "pid": attempts.split("pid=")[1].split()[0],
                       "train_seconds": t.result["metrics"]["train_seconds"] if t.result else None})
    driver = {"peak_rss_mb": peak_rss_mb(), "cpu_seconds": time.process_time()}
    print(json.dumps({"marks": marks, "trials": trials, "driver": driver, "unsynced": [str(f) for f in outcome.unsynced]}))


def check_sweep(data: dict[str, Any]) -> None:
    """A benchmark sweep counts only when every trial finished and reached MLflow whole: a logger
    gone offline does less work and would flatter the figures."""
    if any(t["train_seconds"] is None for t in data["trials"]):
        raise RuntimeError("a trial of the benchmark sweep failed")
    if data["unsynced"]:
        raise RuntimeError(f"the benchmark sweep left uploads for clgrid sync in {data['unsynced'][:3]}")


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM; Ray's processes, its children, not counted)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def cli_start() -> float:
    """Seconds of `clgrid validate quickstart`: what every command costs before it does anything."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("clgrid")), "validate", "quickstart"], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def bench_sweep(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    spec = {**spec, "storage": {"root": str(root)}, "resources": {"cpus_per_trial": 1}}
    proc = subprocess.run([sys.executable, "-m", "clgrid.bench.overhead", "--sweep-child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=7200)
    if proc.returncode:
        raise RuntimeError(f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    marks, trials = data["marks"], data["trials"]
    check_sweep(data)
    cores = os.cpu_count() or 1
    wall = marks["shut_down"] - marks["start"]  # prepare + run + shutdown
    train = sum(t["train_seconds"] for t in trials)
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for t in sorted(trials, key=lambda t: t["start"]):
        by_worker.setdefault(t["pid"], []).append(t)
    # a worker's first trial also pays the process's imports, data load and MLflow store set-up
    outside = [[t["end"] - t["start"] - t["train_seconds"] for t in ts] for ts in by_worker.values()]
    later = [o for os_ in outside for o in os_[1:]]
    in_trial = statistics.median(later) if later else statistics.median(o[0] for o in outside)
    end = max(t["end"] for t in trials)
    return {
        "trials": len(trials), "cores": cores, "wall": wall, "train_seconds": train,
        "efficiency": train / (wall * cores), "overhead_per_trial": (wall * cores - train) / len(trials),
        "start_up": marks["started"] - marks["start"], "epochs": spec["train"].get("epochs"),
        "first_trial_start": min(t["start"] for t in trials) - marks["started"],
        "first_trial_extra": statistics.median(o[0] for o in outside) - in_trial,
        "in_trial_overhead": in_trial,  # trial wall not spent training: evaluation, checkpoints, MLflow
        "tail": end - min(ts[-1]["end"] for ts in by_worker.values()), "after_last_trial": marks["shut_down"] - end,
        "workers": len(by_worker),
    }


# ---- 5: scaling ----------------------------------------------------------------------------------

def bench_scaling(spec: dict[str, Any], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Time per instrumented trial against T (naive, permuted stream), and replay memory size."""
    source, sizes, counts = ("digits", [50, 100, 200], [2, 4, 8]) if args.quick else \
        ("mnist5k", [200, 1000, 4000], [5, 10, 20])
    train = {**spec["train"], "epochs": 1} if not args.quick else spec["train"]
    rows = []
    for T in counts:
        bench = {"source": source, "scenario": "domain-il", "domain": "permuted", "experiences": T}
        trial = trial_of(spec, {"name": "naive"}, benchmarks=[bench], train=train)
        Trainer(trial, root / "warm-scale", instrument=False)  # the stream, cached per process
        start = time.perf_counter()
        trainer = TimedTrainer(trial, root / f"scale-{T}")
        result = trainer.run()
        rows.append({"T": T, "seconds": time.perf_counter() - start, "train_seconds": result.costs["train_seconds"],
                     "eval_seconds": trainer.eval_seconds})
    Ts = np.array([r["T"] for r in rows], dtype=float)
    a, c = np.linalg.lstsq(np.stack([Ts, Ts**2], 1), np.array([r["seconds"] for r in rows]), rcond=None)[0]
    exponent = float(np.log(rows[-1]["seconds"] / rows[-2]["seconds"]) / np.log(Ts[-1] / Ts[-2]))
    memory = []
    for size in sizes:
        trial = trial_of(spec, {"name": "replay", "buffer_size": size})
        start = time.perf_counter()
        result = Trainer(trial, root / f"memory-{size}").run()
        memory.append({"buffer_size": size, "seconds": time.perf_counter() - start,
                       "replay_bytes": result.costs["replay_bytes"]})
    return {"experiences": rows, "fit": {"a": float(a), "c": float(c)}, "exponent": exponent, "memory": memory}


# ---- report --------------------------------------------------------------------------------------

def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return f"{os.cpu_count()} CPUs ({model}), torch {torch.__version__}"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _x(ratio: list[float]) -> str:
    median, low, high = ratio
    return f"x{median:.3f} [{low:.2f}-{high:.2f}]"


def report_trainer(trainer: dict[str, Any]) -> None:
    """Ratios: median of the repetitions [lowest-highest]."""
    for name, r in trainer.items():
        sps = r["samples_per_s"]
        print(f"trainer overhead {name}: plain {sps['plain']:.0f} samples/s, clgrid {sps['clgrid']:.0f} samples/s "
              f"({_x(r['overhead'])}; CPU time {_x(r['overhead_cpu'])}; fastest runs x{r['overhead_fastest']:.3f}), "
              f"clgrid instrumented "
              f"{sps['instrumented']:.0f} samples/s ({_x(r['overhead_instrumented'])}); "
              f"same accuracy matrix: {'yes' if r['same_matrix'] else 'NO'}")
    print("against the plain naive loop: " + ", ".join(
        f"{n} {_x(r['against_plain_naive'])}" for n, r in trainer.items() if "against_plain_naive" in r)
        + f" (target for EWC: <= x{EWC_TARGET}: "
        + ("met" if trainer["ewc"]["against_plain_naive"][0] <= EWC_TARGET else "missed") + ")")
    print("evaluation share: " + ", ".join(f"{n} {r['eval_share']:.1%}" for n, r in trainer.items())
          + " of an instrumented trial's time")
    print("instrumentation cost: " + ", ".join(f"{n} {_x(r['instrumentation'])}" for n, r in trainer.items())
          + " (FLOP counting, checkpoints, Arrow replay commits, MLflow logging: on vs off)", flush=True)


def report_sweep(s: dict[str, Any]) -> None:
    epochs = f"{s['epochs']} epochs per experience, " if s["epochs"] else ""
    print(f"sweep efficiency: {s['trials']} trials ({epochs}1 CPU each), {s['train_seconds']:.1f} train s summed / "
          f"({s['wall']:.1f} s wall x {s['cores']} cores) = {s['efficiency']:.2f}; per-trial overhead "
          f"{s['overhead_per_trial']:.2f} s")
    print(f"  sweep phases: MLflow runs prepared while Ray starts {s['start_up']:.1f} s, first trial starts "
          f"{s['first_trial_start']:.1f} s later and takes {s['first_trial_extra']:.1f} s more than later ones "
          f"(imports, data, MLflow store), each trial {s['in_trial_overhead']:.2f} s outside training "
          f"(evaluation, checkpoints, MLflow), one core idle for the last {s['tail']:.1f} s, exit "
          f"{s['after_last_trial']:.1f} s after the last trial", flush=True)


def report_scaling(sc: dict[str, Any]) -> None:
    per_t = ", ".join(f"T={r['T']} {r['seconds']:.1f} s (eval {r['eval_seconds'] / r['seconds']:.0%})"
                      for r in sc["experiences"])
    print(f"scaling with experiences: {per_t}; fit {sc['fit']['a']:.3f} s*T + {sc['fit']['c']:.4f} s*T^2; "
          f"growth exponent {sc['exponent']:.2f} over the last doubling")
    print("scaling with memory size: " + ", ".join(
        f"buffer {m['buffer_size']} {m['seconds']:.1f} s, {m['replay_bytes'] / 1e6:.1f} MB" for m in sc["memory"]),
        flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny workloads (digits, a few steps, a 2-trial sweep)")
    parser.add_argument("--reps", type=int, help="repetitions of each trainer comparison (default 5, quick 1)")
    parser.add_argument("--epochs", type=int, help="epochs per experience (default: the quickstart's)")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--sweep-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sweep_child:
        return sweep_child(args.sweep_child)
    reps = args.reps or (1 if args.quick else 5)
    spec = quickstart_dict(args)
    print(f"machine: {machine()}; load average {load()} (1/5/15 min) at start", flush=True)
    results: dict[str, Any] = {"machine": machine(), "load_start": load(), "quick": args.quick, "reps": reps}
    with tempfile.TemporaryDirectory(prefix="clgrid-bench-") as tmp:
        root = Path(tmp)
        results["trainer"] = bench_trainer(spec, reps, root)
        report_trainer(results["trainer"])
        results["cli_start"] = cli_start()
        print(f"CLI start-up: clgrid validate quickstart takes {results['cli_start']:.1f} s", flush=True)
        sweep_spec = {**spec, "strategies": [{"name": "naive"}], "seeds": [0, 1]} if args.quick else spec
        results["sweep"] = bench_sweep(sweep_spec, root / "sweep")
        report_sweep(results["sweep"])
        if not args.quick:  # the same grid with 4x longer trials: the start-up cost amortised
            longer = {**spec, "train": {**spec["train"], "epochs": 4 * spec["train"]["epochs"]}}
            results["sweep_longer"] = bench_sweep(longer, root / "sweep-longer")
            report_sweep(results["sweep_longer"])
        results["scaling"] = bench_scaling(spec, args, root)
        report_scaling(results["scaling"])
    results["load_end"] = load()
    print(f"load average {results['load_end']} (1/5/15 min) at the end", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
