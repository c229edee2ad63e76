"""What one GPU carries: the GPU path measured in one command, the day a GPU is there.

    clgrid bench --device cuda [--quick] [--out results.json]
    python -m clgrid.bench.gpu [the same options]

1. samples/s per model (mlp, cnn, resnet18) and precision (fp32, bf16, fp16): one uninstrumented
   trial each (split mnist5k class-IL, 5 experiences, 1 epoch, batch 128, naive), trained samples
   over train seconds, after one warm-up trial per model (cuDNN autotuning, CUDA context). fp32 is
   also run with ``device_data_share: 0`` (every batch gathered on the host, pinned, copied without
   blocking) against the stream resident on the device.
2. trials per GPU: 1, 2 and 4 copies of the mlp and cnn trials at once, each asking Ray for 1, 0.5
   and 0.25 of the one GPU Ray is given: their summed samples/s over the window in which they all
   train (they wait for each other once built), and that against one trial alone.
3. GPU memory per trial: ``torch.cuda.max_memory_allocated`` of each trial (its peak_memory_bytes
   on CUDA), the largest of the concurrent copies.

Without CUDA it exits 2 with one line. ``--quick`` runs digits with a few steps (a smoke run).
``concurrent_trials`` runs on a CPU-only Ray instance that declares GPUs too, which is how the test
suite checks where Ray puts fractional trials.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = {"mlp": {"name": "mlp"}, "cnn": {"name": "cnn"}, "resnet18": {"name": "resnet18"}}
PRECISIONS = ("fp32", "bf16", "fp16")
FRACTIONS = (1.0, 0.5, 0.25)
BARRIER_SECONDS = 600.0  # concurrent copies wait this long at most for each other to be built


def trial_spec(model: str, *, quick: bool, precision: str = "fp32", gpus: float = 1.0, share: float = 0.5):
    """The benchmark trial: naive on split mnist5k (``quick``: digits, 2 experiences, 5 steps)."""
    from clgrid.spec import PipelineSpec, expand

    bench = {"source": "digits", "scenario": "class-il", "experiences": 2} if quick else \
        {"source": "mnist5k", "scenario": "class-il", "experiences": 5}
    train = {"iterations": 5, "batch_size": 32} if quick else {"epochs": 1, "batch_size": 128}
    spec = {"name": "gpu-bench", "benchmarks": [bench], "strategies": [{"name": "naive"}],
            "model": MODELS[model] | ({"channels": [8]} if quick and model == "cnn" else {}),
            "train": train | {"precision": precision}, "seeds": [0],
            "resources": {"cpus_per_trial": 1, "gpus_per_trial": gpus, "device_data_share": share}}
    return expand(PipelineSpec.model_validate(spec))[0]


def run_one(trial, folder: Path) -> dict[str, Any]:
    """One uninstrumented trial: its throughput, peak memory and whether its data was resident."""
    from clgrid.train.trainer import Trainer

    trainer = Trainer(trial, folder, instrument=False)
    start = time.time()
    result = trainer.run()
    return {"samples": result.costs["samples_seen"], "train_seconds": result.costs["train_seconds"],
            "samples_per_s": result.costs["samples_seen"] / max(result.costs["train_seconds"], 1e-9),
            "peak_memory_bytes": result.costs["peak_memory_bytes"], "resident": trainer.data.resident,
            "device": str(trainer.device), "start": start, "end": time.time()}


def _placed_trial(trial_json: str, barrier: str, copies: int, index: int) -> dict[str, Any]:
    """A Ray task: where Ray put it, then the trial, once all ``copies`` are built (file barrier)."""
    import ray

    from clgrid.spec import TrialSpec
    from clgrid.train.trainer import Trainer

    placed = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "gpu_ids": [str(i) for i in ray.get_gpu_ids()], "pid": os.getpid()}
    trial = TrialSpec.model_validate_json(trial_json)
    with tempfile.TemporaryDirectory(prefix="clgrid-gpu-bench-") as folder:
        trainer = Trainer(trial, Path(folder), instrument=False)
        Path(barrier, f"ready-{index}").touch()
        placed["ready"] = time.time()
        deadline = time.time() + BARRIER_SECONDS
        while len(list(Path(barrier).glob("ready-*"))) < copies:
            if time.time() > deadline:
                raise TimeoutError(f"{copies} copies at once: only some were placed within {BARRIER_SECONDS:.0f} s")
            time.sleep(0.05)
        start = time.time()
        result = trainer.run()
        return placed | {"samples": result.costs["samples_seen"], "train_seconds": result.costs["train_seconds"],
                         "peak_memory_bytes": result.costs["peak_memory_bytes"], "start": start, "end": time.time()}


def concurrent_trials(trial, copies: int, fraction: float) -> list[dict[str, Any]]:
    """``copies`` copies of ``trial`` at once on the running Ray instance, each asking for
    ``fraction`` of a GPU (and no CPU, so CPU slots do not serialise them): per copy, the
    CUDA_VISIBLE_DEVICES and GPU ids Ray gave it, when it was ``ready`` (built, holding its share)
    and what it trained between ``start`` and ``end``."""
    import ray

    task = ray.remote(_placed_trial).options(num_gpus=fraction, num_cpus=0, max_retries=0)
    with tempfile.TemporaryDirectory(prefix="clgrid-gpu-barrier-") as barrier:
        return ray.get([task.remote(trial.model_dump_json(), barrier, copies, i) for i in range(copies)])


def throughput(copies: list[dict[str, Any]]) -> float:
    """Summed samples/s of copies that ran at once: all their samples over the window from the
    first start to the last end."""
    window = max(c["end"] for c in copies) - min(c["start"] for c in copies)
    return sum(c["samples"] for c in copies) / max(window, 1e-9)


def bench_models(quick: bool, root: Path) -> list[dict[str, Any]]:
    """Section 1: one trial at a time per model, precision and data placement."""
    rows = []
    for model in MODELS:
        run_one(trial_spec(model, quick=quick), root / f"warm-{model}")
        variants = [(p, 0.5) for p in PRECISIONS] + [("fp32", 0.0)]
        for precision, share in variants:
            trial = trial_spec(model, quick=quick, precision=precision, share=share)
            row = run_one(trial, root / f"{model}-{precision}-{share}")
            rows.append({"model": model, "precision": precision, "device_data_share": share} | row)
            data = "resident" if row["resident"] else "host batches"
            print(f"  {model:9s} {precision}  data share {share:g}: {data:12s} {row['samples_per_s']:10.0f} samples/s"
                  f"   peak {row['peak_memory_bytes'] / 2**20:8.1f} MiB", flush=True)
    return rows


def bench_sharing(quick: bool) -> list[dict[str, Any]]:
    """Sections 2 and 3: copies at once on one GPU, their summed throughput and memory."""
    import ray

    rows = []
    ray.init(address="local", num_gpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for model in ("mlp", "cnn"):
            alone = None
            for fraction in FRACTIONS:
                copies = round(1 / fraction)
                ran = concurrent_trials(trial_spec(model, quick=quick, gpus=fraction), copies, fraction)
                rate = throughput(ran)
                alone = alone or rate
                peak = max(c["peak_memory_bytes"] for c in ran)
                rows.append({"model": model, "fraction": fraction, "copies": copies, "samples_per_s": rate,
                             "speedup": rate / alone, "peak_memory_bytes": peak,
                             "cuda_visible_devices": sorted({c["cuda_visible_devices"] or "" for c in ran})})
                print(f"  {model:4s} {copies} trial(s) x {fraction:g} GPU: {rate:10.0f} samples/s together "
                      f"(x{rate / alone:.2f} of one alone), {peak / 2**20:.1f} MiB GPU memory per trial", flush=True)
    finally:
        ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, a few steps: a smoke run")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("clgrid bench --device cuda: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a machine with a GPU", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "quick": args.quick}
    print(f"GPU: {results['device']}, torch {results['torch']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="clgrid-gpu-bench-") as tmp:
        print("samples/s per model and precision (one trial at a time):", flush=True)
        results["models"] = bench_models(args.quick, Path(tmp))
    print("trials per GPU (copies at once, each with its fraction of one GPU):", flush=True)
    results["sharing"] = bench_sharing(args.quick)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
