"""Hand-made trial runs in a real MLflow SQLite store, laid out as a sweep logs them: the report tests'
data (conftest's `store` fixture builds the shared one with ``make_store``), and readers of report.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

EXPERIMENT = "quickstart"
BENCH, SCENARIO = "split-digits", "class-incremental"
T = 3
MB, GFLOP = 1e6, 1e9

# (label in the report, strategy, config_key, varying params, seeds that finish, seeds that fail)
CONFIGS = [
    ("ewc (ewc_lambda=10)", "ewc", "cfg-ewc10", {"strategy.ewc_lambda": "10"}, [1, 2], []),
    ("ewc (ewc_lambda=100)", "ewc", "cfg-ewc100", {"strategy.ewc_lambda": "100"}, [1], [2]),
    ("joint", "joint", "cfg-joint", {}, [1, 2], []),
    ("naive", "naive", "cfg-naive", {}, [1, 2], []),
]
RETENTION = {"cfg-lwf": 0.5, "cfg-ewc10": 0.55, "cfg-ewc100": 0.75, "cfg-joint": 1.0, "cfg-naive": 0.25}
COSTS = {  # flops, replay bytes, strategy state bytes
    "cfg-ewc10": (1.5e9, 0, 0.8e6), "cfg-ewc100": (1.5e9, 0, 0.8e6),
    "cfg-joint": (3e9, 5e6, 0), "cfg-naive": (1e9, 0, 0), "cfg-lwf": (1.3e9, 0, 0.4e6),
}
MODEL_BYTES = 0.4e6


def make_matrix(config_key: str, seed: int, retention: float | None = None) -> dict:
    """R for T class-incremental experiences: learned at ~0.95, then retained by a strategy factor."""
    keep = RETENTION[config_key] if retention is None else retention
    rng = np.random.default_rng([seed, sum(map(ord, config_key))])
    r = np.zeros((T, T))
    for i in range(T):
        for j in range(i + 1):
            learned = 0.9 + 0.08 * rng.random()
            r[i, j] = learned if i == j else learned * keep ** (i - j)
        if i + 1 < T:
            r[i, i + 1] = 0.05 * rng.random()  # a little transfer before training
    return {"R": np.round(r, 4).tolist(), "b": np.round(0.1 * rng.random(T), 4).tolist(),
            "experiences": [f"{2 * k}-{2 * k + 1}" for k in range(T)]}


def cost_metrics(config_key: str, seed: int) -> dict[str, float]:
    flops, replay, state = COSTS[config_key]
    return {"train_flops": flops, "train_seconds": 2.0 + seed * 0.3 + flops / 1e9,
            "device_seconds": 1.5 + seed * 0.2, "samples_seen": 1000.0,
            "peak_memory_bytes": 50e6 + seed * 1e6, "replay_bytes": replay,
            "model_bytes": MODEL_BYTES, "strategy_state_bytes": state}


def trial_tags(parent_id: str, strategy: str, key: str, seed: int, bench: str = BENCH) -> dict[str, str]:
    return {"mlflow.parentRunId": parent_id, "clgrid.role": "trial", "clgrid.strategy": strategy,
            "clgrid.benchmark": bench, "clgrid.scenario": SCENARIO, "clgrid.seed": str(seed),
            "clgrid.trial_key": f"{key}-s{seed}", "clgrid.spec_hash": "spec1", "clgrid.config_key": key}


def log_run(client: MlflowClient, exp_id: str, tags: dict[str, str], params: dict[str, str],
            metrics: dict[str, float], artifacts: dict[str, object], tmp: Path, status: str = "FINISHED",
            histories: dict[str, list[tuple[int, float]]] | None = None) -> str:
    """One run: tags, params, metrics (at step 0), per-step metric histories, JSON artifacts."""
    rid = client.create_run(exp_id, tags=tags).info.run_id
    for name, data in artifacts.items():
        path = tmp / rid / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        client.log_artifact(rid, str(path))
    history = [Metric(k, v, 0, step) for k, points in (histories or {}).items() for step, v in points]
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()] + history)
    client.set_terminated(rid, status)
    return rid


def log_trial(client, exp_id, parent_id, label, strategy, key, params, seed, status, tmp, matrix=True) -> str:
    params = {"strategy.name": strategy, "benchmark.source": "digits", "seed": str(seed), "train.lr": "0.01", **params}
    metrics, artifacts = {}, {}
    if status == "FINISHED":
        m = make_matrix(key, seed)
        if matrix:
            artifacts["accuracy_matrix.json"] = m
        metrics = cost_metrics(key, seed) | {"acc": float(np.mean(m["R"][-1]))}
    tags = trial_tags(parent_id, strategy, key, seed) | {"mlflow.runName": f"{label} seed {seed}"}
    return log_run(client, exp_id, tags, params, metrics, artifacts, tmp, status)


def new_sweep(tmp: Path, experiment: str, sweep_id: str) -> tuple[str, MlflowClient, str, str]:
    """A SQLite store in ``tmp`` with an experiment and a sweep's parent run: (uri, client, experiment
    id, parent run id)."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(experiment, artifact_location=(tmp / "artifacts").as_uri())
    parent = client.create_run(exp_id, tags={"clgrid.role": "sweep", "clgrid.sweep_id": sweep_id}).info.run_id
    return uri, client, exp_id, parent


def make_store(tmp: Path) -> dict:
    """Two sweeps of `quickstart` (the newer is the default) and an experiment that only failed."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri())
    old = client.create_run(exp_id, start_time=1_000, tags={"clgrid.role": "sweep", "clgrid.sweep_id": "s-old"})
    log_trial(client, exp_id, old.info.run_id, "lwf", "lwf", "cfg-lwf", {}, 1, "FINISHED", tmp)
    log_trial(client, exp_id, old.info.run_id, "lwf", "lwf", "cfg-lwf", {}, 2, "FINISHED", tmp, matrix=False)
    client.set_terminated(old.info.run_id, "FINISHED")
    new = client.create_run(exp_id, start_time=2_000, tags={"clgrid.role": "sweep", "clgrid.sweep_id": "s-new"})
    runs = {}
    for label, strategy, key, params, ok, failed in CONFIGS:
        for seed in ok + failed:
            status = "FINISHED" if seed in ok else "FAILED"
            runs[(key, seed)] = log_trial(client, exp_id, new.info.run_id, label, strategy, key,
                                          params, seed, status, tmp)
    client.set_terminated(new.info.run_id, "FINISHED")

    bad_id = client.create_experiment("all-failed", artifact_location=(tmp / "bad").as_uri())
    bad = client.create_run(bad_id, tags={"clgrid.role": "sweep", "clgrid.sweep_id": "s-bad"})
    log_trial(client, bad_id, bad.info.run_id, "naive", "naive", "cfg-naive", {}, 1, "FAILED", tmp)
    return {"uri": uri, "client": client, "parent": new.info.run_id, "runs": runs, "tmp": tmp}


def table(md: str, after: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first Markdown table after the line ``after``: header, rows by first cell."""
    lines = md.split(after, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| "))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split(" | ")])
    return rows[0], {r[0]: r for r in rows[2:]}  # rows[1]: the |---| line


def mean_of(cell: str) -> float:
    return float(re.match(r"-?\d+(?:\.\d+)?", cell).group())
