"""Writing a sweep's runs to MLflow, through an explicit ``MlflowClient`` (never the fluent global run).

One experiment per pipeline, one parent run per sweep, one child run per trial. Child runs are
created by the driver before any trial starts; their ids travel in the trial configs, so a retried
or restored trial writes to the same run. Per-experience metrics are logged with ``step`` = the
experience index, and a step already present is not logged again.

Every call retries for ``CLGRID_TRACKING_RETRY_SECONDS`` (default 60); a trial whose tracking
server stays away longer keeps training and leaves what it could not upload to ``clgrid sync``
(``clgrid.sweep.trial_logger``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from mlflow.entities import Metric, Param

from clgrid import fsio
from clgrid.tracking import matrix_png
from clgrid.tracking.schema import (
    BENCHMARK, CONFIG_KEY, MATRIX_FILES, MATRIX_JSON, MATRIX_PNG, PARENT, ROLE, RUN_NAME, SCENARIO, SEED,
    SPEC_HASH, STRATEGY, SWEEP, SWEEP_ID, TRIAL, TRIAL_KEY, client, local_artifact_root, with_retries,
)

if TYPE_CHECKING:  # runs take TrialSpecs from the driver; importing the spec would import torch
    from clgrid.spec import TrialSpec

MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


def experiment_id(uri: str, name: str, storage_root: str) -> str:
    c = client(uri)
    found = with_retries(lambda: c.get_experiment_by_name(name))
    if found is not None:
        return found.experiment_id
    return with_retries(lambda: c.create_experiment(name, artifact_location=local_artifact_root(uri, storage_root)))


def flat_params(trial: TrialSpec) -> dict[str, str]:
    """The trial's resolved config as flat, stable keys: ``strategy.ewc_lambda``, ``train.lr``..."""
    out: dict[str, str] = {"seed": str(trial.seed)}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    for section in ("benchmark", "strategy", "model", "train"):
        walk(section, getattr(trial, section).model_dump(mode="json"))
    out["benchmark.id"] = trial.benchmark.id
    return out


def trial_tags(trial: TrialSpec, sweep_id: str, parent_run_id: str) -> dict[str, str]:
    return {
        PARENT: parent_run_id,
        RUN_NAME: trial.label,
        ROLE: TRIAL,
        SWEEP_ID: sweep_id,
        STRATEGY: trial.strategy.name,
        BENCHMARK: trial.benchmark.id,
        SCENARIO: trial.benchmark.scenario,
        SEED: str(trial.seed),
        TRIAL_KEY: trial.trial_key,
        CONFIG_KEY: trial.config_key,
        SPEC_HASH: trial.spec_hash,
    }


def start_sweep(uri: str, exp_id: str, sweep_id: str, spec_hash: str, trials: list[TrialSpec]) -> tuple[str, dict[str, str]]:
    """Creates the sweep's parent run and one child run per trial; returns their ids."""
    c = client(uri)
    parent = with_retries(lambda: c.create_run(exp_id, run_name=f"sweep-{sweep_id}", tags={
        ROLE: SWEEP, SWEEP_ID: sweep_id, SPEC_HASH: spec_hash}))
    run_ids = {}
    for trial in trials:
        run = with_retries(lambda: c.create_run(exp_id, tags=trial_tags(trial, sweep_id, parent.info.run_id)))
        params = [Param(k, v) for k, v in flat_params(trial).items()]
        with_retries(lambda: c.log_batch(run.info.run_id, params=params))
        run_ids[trial.trial_key] = run.info.run_id
    return parent.info.run_id, run_ids


def logged_steps(uri: str, run_id: str, seconds: float | None = None) -> set[int]:
    """Experiences already logged to a run (a restarted trial skips them). One log_batch per
    experience writes all its metrics in one transaction, so ``acc`` stands for the rest."""
    return metric_steps(uri, run_id, ["acc"], seconds)["acc"]


def metric_steps(uri: str, run_id: str, keys: Iterable[str], seconds: float | None = None) -> dict[str, set[int]]:
    """The steps each metric of a run has."""
    c = client(uri)
    return {k: {m.step for m in with_retries(lambda: c.get_metric_history(run_id, k), seconds)} for k in keys}


def experience_metrics(experience: int, row: list[float], metrics: dict[str, float],
                       costs: dict[str, float]) -> dict[str, float]:
    """What one experience logs (step = ``experience``): the summary so far, the costs, and
    ``acc_on_exp_j`` for the experiences seen. Takes an ExperienceReport's fields."""
    return {**metrics, **costs, **{f"acc_on_exp_{j}": a for j, a in enumerate(row[: experience + 1])}}


def log_experience(uri: str, run_id: str, step: int, row: list[float], summary: dict[str, float],
                   costs: dict[str, float], seconds: float | None = None) -> None:
    log_metrics(uri, run_id, step, experience_metrics(step, row, summary, costs), seconds)


def log_metrics(uri: str, run_id: str, step: int, values: dict[str, float], seconds: float | None = None) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
    for i in range(0, len(metrics), MAX_BATCH):
        with_retries(lambda: client(uri).log_batch(run_id, metrics=metrics[i:i + MAX_BATCH]), seconds)


def write_matrix(folder: Path, R: list[list[float]], b: list[float]) -> None:
    """``accuracy_matrix.json`` and ``accuracy_matrix.png`` in ``folder``, each written atomically."""
    fsio.write_json(folder / MATRIX_JSON, {"R": R, "b": b, "experiences": list(range(len(R)))})
    fsio.atomic_write(folder / MATRIX_PNG, matrix_png.render(R))


def upload_matrix(uri: str, run_id: str, folder: Path, seconds: float | None = None) -> None:
    """The files of write_matrix as artifacts of the run (an upload again overwrites: no duplicates)."""
    for name in MATRIX_FILES:
        with_retries(lambda: client(uri).log_artifact(run_id, str(folder / name)), seconds)


def log_matrix(uri: str, run_id: str, R: list[list[float]], b: list[float], folder: Path) -> None:
    write_matrix(folder, R, b)
    upload_matrix(uri, run_id, folder)


def end_run(uri: str, run_id: str, status: str, seconds: float | None = None) -> None:
    with_retries(lambda: client(uri).set_terminated(run_id, status), seconds)


def run_status(uri: str, run_id: str, seconds: float | None = None) -> str:
    return with_retries(lambda: client(uri).get_run(run_id), seconds).info.status
