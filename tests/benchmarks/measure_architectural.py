"""Forgetting, plasticity and growth of the architectural strategies on split-mnist5k task-IL.

    python tests/benchmarks/measure_architectural.py [--strategies '[{"name": "progressive", "width_factor": 0.25}]']
        [--seeds 0 1 2] [--workers 2] [--out architectural.jsonl]

The quickstart settings (5 experiences, MLP 2x400, Adam 1e-3, batch 32, 4 epochs), one head per
task. Finished trials are appended to ``--out`` and skipped on a rerun. Prints mean (sd) over seeds of
acc, forgetting and learning accuracy, and model and strategy-state bytes after every experience.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from clgrid.spec import PipelineSpec, TrialSpec, expand
from clgrid.train.trainer import run_trial

DEFAULT = [{"name": n} for n in ("naive", "feature_extraction", "finetune_layers", "progressive", "packnet", "hat")]


def trials(strategies: list[dict], seeds: list[int]) -> list[TrialSpec]:
    return expand(PipelineSpec.model_validate({
        "name": "measure-architectural", "benchmarks": [{"source": "mnist5k", "scenario": "task-il", "experiences": 5}],
        "strategies": strategies, "model": {"name": "mlp", "hidden": [400, 400], "heads": "multi"},
        "train": {"epochs": 4, "batch_size": 32, "optimizer": "adam", "lr": 0.001},
        "seeds": seeds, "resources": {"cpus_per_trial": 1},
    }))


def measure(trial: TrialSpec) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result = run_trial(trial, Path(folder))
    return {"key": trial.trial_key, "strategy": trial.strategy.model_dump(), "seed": trial.seed, "R": result.R,
            "metrics": result.metrics, "model_bytes": [h.costs["model_bytes"] for h in result.history],
            "state_bytes": [h.costs["strategy_state_bytes"] for h in result.history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", type=json.loads, default=DEFAULT)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("architectural.jsonl"))
    args = parser.parse_args()
    done = {json.loads(line)["key"] for line in args.out.read_text().splitlines()} if args.out.exists() else set()
    todo = [t for t in trials(args.strategies, args.seeds) if t.trial_key not in done]
    with ProcessPoolExecutor(args.workers) as pool, args.out.open("a") as out:
        for row in pool.map(measure, todo):
            out.write(json.dumps(row) + "\n")
            out.flush()
    rows = [json.loads(line) for line in args.out.read_text().splitlines()]
    for config in {json.dumps(r["strategy"], sort_keys=True): r["strategy"] for r in rows}.values():
        mine = [r for r in rows if r["strategy"] == config]
        stats = {m: [r["metrics"][m] for r in mine] for m in ("acc", "forgetting", "learning_acc")}
        print(json.dumps(config), f"seeds={len(mine)}",
              " ".join(f"{m}={statistics.mean(v):.4f} ({statistics.pstdev(v):.4f})" for m, v in stats.items()))
        print("    model_bytes", [int(b) for b in mine[0]["model_bytes"]],
              "strategy_state_bytes", [int(b) for b in mine[0]["state_bytes"]])


if __name__ == "__main__":
    main()
