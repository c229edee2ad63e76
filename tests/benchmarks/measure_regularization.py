"""Accuracy and forgetting of strategies on split/permuted mnist5k in all three scenarios.

    python tests/benchmarks/measure_regularization.py [--strategies '[{"name": "si", "c": [1, 10]}]']
        [--scenarios task-il class-il domain-il] [--seeds 0 1 2] [--train '{"optimizer": "sgd", "lr": 0.01}']
        [--workers 2] [--out results.jsonl]

The quickstart settings (5 experiences, MLP 2x400, Adam 1e-3, batch 32, 4 epochs; ``--train`` overrides); domain-il is the
permuted stream (``--domain split`` for Hsu et al.'s split-domain one). Strategies are spec entries, so a
list-valued hyperparameter is a grid axis. Each finished trial is appended to ``--out`` and skipped on
a rerun, so an interrupted sweep continues. Prints mean (sd) over seeds of acc and forgetting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from clgrid.spec import PipelineSpec, TrialSpec, expand

DEFAULT_STRATEGIES = [{"name": n} for n in ("naive", "l2", "ewc", "si", "mas", "lwf")]
QUICKSTART_TRAIN = {"epochs": 4, "batch_size": 32, "optimizer": "adam", "lr": 0.001}


def trials(strategies: list[dict], scenarios: list[str], seeds: list[int], domain: str,
           train: dict | None = None) -> list[TrialSpec]:
    benchmarks = [{"source": "mnist5k", "scenario": s, "experiences": 5, **({"domain": domain} if s == "domain-il" else {})}
                  for s in scenarios]
    spec = PipelineSpec.model_validate({
        "name": "measure-regularization", "benchmarks": benchmarks, "strategies": strategies,
        "model": {"name": "mlp", "hidden": [400, 400]},
        "train": {**QUICKSTART_TRAIN, **(train or {})},
        "seeds": seeds, "resources": {"cpus_per_trial": 1},
    })
    return expand(spec)


def label(trial: TrialSpec) -> str:
    params = trial.strategy.model_dump(exclude={"name"})
    return trial.strategy.name + "".join(f" {k}={v}" for k, v in params.items())


def run(trial: TrialSpec) -> dict:
    from clgrid.train.trainer import run_trial

    with tempfile.TemporaryDirectory() as folder:
        result = run_trial(trial, Path(folder), instrument=False)
    return {"key": trial.trial_key, "label": label(trial), "scenario": trial.benchmark.id + "/" + trial.benchmark.scenario,
            "seed": trial.seed, "R": result.R, **result.metrics, "seconds": result.costs["train_seconds"]}


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["scenario"]), []).append(row)

    def cell(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ({sd:.3f})"

    lines = ["| strategy | scenario | seeds | acc | forgetting |", "|---|---|---|---|---|"]
    for (name, scenario), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {name} | {scenario} | {len(group)} | {cell([r['acc'] for r in group])} "
                     f"| {cell([r['forgetting'] for r in group])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", type=json.loads, default=DEFAULT_STRATEGIES)
    parser.add_argument("--scenarios", nargs="+", default=["task-il", "class-il", "domain-il"])
    parser.add_argument("--domain", choices=["permuted", "rotated", "split"], default="permuted")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train", type=json.loads, default={}, help="overrides of the quickstart training settings")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("measure_regularization.jsonl"))
    args = parser.parse_args(argv)

    todo = trials(args.strategies, args.scenarios, args.seeds, args.domain, args.train)
    done = {json.loads(line)["key"]: json.loads(line) for line in args.out.read_text().splitlines()} \
        if args.out.exists() else {}
    with ProcessPoolExecutor(args.workers) as pool, args.out.open("a") as out:
        for row in pool.map(run, [t for t in todo if t.trial_key not in done]):
            out.write(json.dumps(row) + "\n")
            out.flush()
            done[row["key"]] = row
            print(f"{row['label']} {row['scenario']} seed {row['seed']}: acc {row['acc']:.3f} "
                  f"forgetting {row['forgetting']:.3f} ({row['seconds']:.0f} s)", flush=True)
    print(table([done[t.trial_key] for t in todo]))


if __name__ == "__main__":
    main()
