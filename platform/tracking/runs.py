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
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException

from clgrid import fsio
from clgrid.tracking import matrix_png
from clgrid.train.metrics import VAL_PREFIX, continual_summary
from clgrid.tracking.schema import (
    BENCHMARK, CONFIG_KEY, FINAL, PHASE, CONT_ACC, CONT_ACC_EXP, CONT_BOUNDARY, CONTINUAL_JSON, DATASET_CONTEXT, EXPERIMENT_KIND, MATRIX_FILES, MATRIX_JSON, MATRIX_PNG, NOTE, PARENT,
    CLASS_ORDER, PROBE_FILES, ROLE, VAL_MATRIX_FILES, VAL_MATRIX_JSON, VAL_MATRIX_PNG, RUN_NAME, SCENARIO, SEED, SPEC_HASH, STRATEGY, SWEEP, SWEEP_ID, TRAIN_CONTEXT, TRAINING, TRIAL, TRIAL_KEY,
    client, local_artifact_root, with_retries,
)

if TYPE_CHECKING:  # runs take TrialSpecs from the driver; importing the spec would import torch
    from clgrid.spec import TrialSpec

MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"


def experiment_id(uri: str, name: str, storage_root: str) -> str:
    """The experiment's id, created if needed, of the training kind (an experiment an older clgrid
    created gets the kind; one a user gave another kind keeps it)."""
    c = client(uri)

    def create() -> str | None:
        try:
            return c.create_experiment(name, artifact_location=local_artifact_root(uri, storage_root),
                                       tags={EXPERIMENT_KIND: TRAINING})
        except MlflowException as exc:
            if exc.error_code == ALREADY_EXISTS:  # a concurrent sweep created it first: no use retrying
                return None
            raise

    found = with_retries(lambda: c.get_experiment_by_name(name))
    if found is None:
        created = with_retries(create)
        if created is not None:
            return created
        found = with_retries(lambda: c.get_experiment_by_name(name))
    if EXPERIMENT_KIND not in found.tags:
        with_retries(lambda: c.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, TRAINING))
    return found.experiment_id


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


def trial_tags(trial: TrialSpec, sweep_id: str, parent_run_id: str, run_name: str | None = None,
               phase: str = FINAL) -> dict[str, str]:
    from clgrid.benchmarks.scenarios import class_order  # loaded with the trial's BenchmarkSpec: no cost

    order = class_order(trial.benchmark, trial.seed)
    return ({CLASS_ORDER: json.dumps(order)} if order is not None else {}) | {
        PHASE: phase,
        PARENT: parent_run_id,
        RUN_NAME: run_name or trial.label,
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


def start_sweep(uri: str, exp_id: str, sweep_id: str, spec_hash: str, trials: list[TrialSpec], *,
                names: Mapping[str, str] | None = None, note: str = "") -> tuple[str, dict[str, str]]:
    """Creates the sweep's parent run (``note``: its description) and one child run per trial, named
    ``names[trial_key]`` (default: the trial's label); returns their ids."""
    c = client(uri)
    parent = with_retries(lambda: c.create_run(exp_id, run_name=f"sweep-{sweep_id}", tags={
        ROLE: SWEEP, SWEEP_ID: sweep_id, SPEC_HASH: spec_hash, **({NOTE: note} if note else {})}))
    run_ids = {trial.trial_key: create_trial_run(uri, exp_id, trial, trial_tags(
        trial, sweep_id, parent.info.run_id, (names or {}).get(trial.trial_key))) for trial in trials}
    return parent.info.run_id, run_ids


def create_trial_run(uri: str, exp_id: str, trial: TrialSpec, tags: dict[str, str],
                     metrics: Mapping[str, float] | None = None) -> str:
    """A trial's child run with ``tags`` (trial_tags and more), its params and ``metrics``; its id."""
    c = client(uri)
    run = with_retries(lambda: c.create_run(exp_id, tags=tags))
    params = [Param(k, v) for k, v in flat_params(trial).items()]
    now = int(time.time() * 1000)
    logged = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    with_retries(lambda: c.log_batch(run.info.run_id, params=params, metrics=logged))
    return run.info.run_id


def benchmark_dataset(name: str, digest: str, source: dict[str, str], schema: str,
                      profile: dict[str, Any]) -> Dataset:
    """A benchmark as an MLflow dataset: ``source`` says where its samples come from, ``schema`` is
    MLflow's JSON schema of the samples, ``profile`` the experience layout. The UI's Dataset column
    and filter show the name and digest."""
    return Dataset(name=name, digest=digest, source_type="clgrid", source=json.dumps(source), schema=schema,
                   profile=json.dumps(profile))


def log_dataset(uri: str, run_id: str, dataset: Dataset, seconds: float | None = None, known_new: bool = False) -> None:
    """``dataset`` as the run's training input, once: a run that has it (a retried or resumed
    trial's) is left as it is; ``known_new``: the run has no inputs (not asked again)."""
    c = client(uri)
    inputs = [] if known_new else with_retries(lambda: c.get_run(run_id), seconds).inputs.dataset_inputs
    if any((i.dataset.name, i.dataset.digest) == (dataset.name, dataset.digest) for i in inputs):
        return
    logged = DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT, TRAIN_CONTEXT)])
    with_retries(lambda: c.log_inputs(run_id, datasets=[logged]), seconds)


def logged_steps(uri: str, run_id: str, seconds: float | None = None) -> set[int]:
    """Experiences already logged to a run (a restarted trial skips them). One log_batch per
    experience writes all its metrics in one transaction, so ``acc`` stands for the rest."""
    return metric_steps(uri, run_id, ["acc"], seconds)["acc"]


def metric_steps(uri: str, run_id: str, keys: Iterable[str], seconds: float | None = None) -> dict[str, set[int]]:
    """The steps each metric of a run has."""
    c = client(uri)
    return {k: {m.step for m in with_retries(lambda: c.get_metric_history(run_id, k), seconds)} for k in keys}


def experience_metrics(experience: int, row: list[float], metrics: dict[str, float],
                       costs: dict[str, float], val_row: list[float] = ()) -> dict[str, float]:
    """What one experience logs (step = ``experience``): the summary so far (with its ``val_``
    twins), the costs, and ``acc_on_exp_j`` (and ``val_acc_on_exp_j``) for the experiences seen.
    Takes an ExperienceReport's fields."""
    return {**metrics, **costs, **{f"{prefix}acc_on_exp_{j}": a for prefix, accs in (("", row), (VAL_PREFIX, val_row))
                                   for j, a in enumerate(accs[: experience + 1])}}


def log_experiences(uri: str, run_id: str, reports: list[dict[str, Any]], seconds: float | None = None) -> None:
    """Several experiences' metrics (ExperienceReport fields each) in as few log_batch calls as
    MLflow takes. Each experience's ``acc`` goes after its other metrics: a run that has an
    experience's ``acc`` has all of it (``logged_steps``), however the calls split."""
    now = int(time.time() * 1000)
    metrics = []
    for report in reports:
        values = experience_metrics(**report)
        metrics += [Metric(k, float(v), now, report["experience"]) for k, v in sorted(values.items(), key=lambda kv: kv[0] == "acc")]
    _log_batches(uri, run_id, metrics, seconds)


def log_metrics(uri: str, run_id: str, step: int, values: dict[str, float], seconds: float | None = None) -> None:
    now = int(time.time() * 1000)
    _log_batches(uri, run_id, [Metric(k, float(v), now, step) for k, v in values.items()], seconds)


def _log_batches(uri: str, run_id: str, metrics: list[Metric], seconds: float | None = None) -> None:
    """``metrics`` in order, MAX_BATCH a call."""
    for i in range(0, len(metrics), MAX_BATCH):
        with_retries(lambda: client(uri).log_batch(run_id, metrics=metrics[i:i + MAX_BATCH]), seconds)


def write_matrix(folder: Path, R: list[list[float]], b: list[float], R_val: list[list[float]] = (),
                 b_val: list[float] = ()) -> None:
    """``accuracy_matrix.json`` and ``accuracy_matrix.png`` in ``folder``, each written atomically;
    with a validation matrix ``R_val``, ``val_accuracy_matrix.json`` and ``.png`` too."""
    matrices = [(MATRIX_JSON, MATRIX_PNG, R, b)] + ([(VAL_MATRIX_JSON, VAL_MATRIX_PNG, R_val, b_val)] if R_val else [])
    for json_name, png_name, matrix, fresh in matrices:
        fsio.write_json(folder / json_name, {"R": matrix, "b": fresh, "experiences": list(range(len(matrix)))})
        fsio.atomic_write(folder / png_name, matrix_png.render(matrix))


def matrix_files(folder: Path) -> list[str]:
    """The files write_matrix wrote in ``folder``."""
    return [*MATRIX_FILES, *(name for name in VAL_MATRIX_FILES if (folder / name).exists())]


def upload_matrix(uri: str, run_id: str, folder: Path, seconds: float | None = None) -> None:
    """The files of write_matrix as artifacts of the run (an upload again overwrites: no duplicates),
    in one call when they are all the folder holds: for the trial's own logger, the folder's only
    writer (a sync beside a live trial uploads file by file, never a temporary file it might list)."""
    names = matrix_files(folder)
    if sorted(names) == sorted(p.name for p in folder.iterdir()):
        with_retries(lambda: client(uri).log_artifacts(run_id, str(folder)), seconds)
    else:
        upload_files(uri, run_id, folder, names, seconds)


def artifact_files(folder: Path) -> list[str]:
    """The artifacts a trial's folder holds for its run: the matrix files and any probe and
    continual-evaluation files."""
    return [*matrix_files(folder), *(name for name in (*PROBE_FILES, CONTINUAL_JSON) if (folder / name).exists())]


def log_matrix(uri: str, run_id: str, R: list[list[float]], b: list[float], folder: Path) -> None:
    write_matrix(folder, R, b)
    upload_matrix(uri, run_id, folder)


def end_run(uri: str, run_id: str, status: str, seconds: float | None = None) -> None:
    with_retries(lambda: client(uri).set_terminated(run_id, status), seconds)


def run_status(uri: str, run_id: str, seconds: float | None = None) -> str:
    return with_retries(lambda: client(uri).get_run(run_id), seconds).info.status


def write_probes(folder: Path, artifacts: dict[str, Any]) -> list[str]:
    """The probes' artifacts (name -> JSON, names as in schema.PROBE_FILES without ``.json``) in
    ``folder``, each written atomically; returns the file names."""
    names = [f"{name}.json" for name in artifacts]
    if unknown := set(names) - set(PROBE_FILES):
        raise ValueError(f"unknown probe artifacts: {sorted(unknown)}")
    for name, data in zip(names, artifacts.values()):
        fsio.write_json(folder / name, data)
    return names


def upload_files(uri: str, run_id: str, folder: Path, names: Iterable[str], seconds: float | None = None) -> None:
    """Files of ``folder`` as artifacts of the run (an upload again overwrites: no duplicates)."""
    for name in names:
        with_retries(lambda: client(uri).log_artifact(run_id, str(folder / name)), seconds)


def continual_metrics(trace: Mapping[str, Any]) -> list[Metric]:
    """A continual-evaluation trace (clgrid.train.continual) as metrics with step = the stream step,
    and its summary (min_acc, wc_acc, a_auc, stability_gap) at the last step."""
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, trace["steps"][-1]) for k, v in continual_summary(trace).items()]
    for step, row in zip(trace["steps"], trace["acc"]):
        metrics.append(Metric(CONT_ACC, sum(row) / len(row), now, step))
        metrics += [Metric(CONT_ACC_EXP.format(j), float(a), now, step) for j, a in enumerate(row)]
    return metrics + [Metric(CONT_BOUNDARY, float(i), now, step) for i, step in enumerate(trace["boundaries"])]


def log_continual(uri: str, run_id: str, folder: Path, seconds: float | None = None) -> None:
    """The metrics of ``folder``'s ``continual.json`` the run does not have yet (an earlier attempt
    or a sync may have logged some), then the file as an artifact."""
    metrics = continual_metrics(fsio.read_json(folder / CONTINUAL_JSON))
    have = metric_steps(uri, run_id, {m.key for m in metrics}, seconds)
    _log_batches(uri, run_id, [m for m in metrics if m.step not in have[m.key]], seconds)
    upload_files(uri, run_id, folder, [CONTINUAL_JSON], seconds)
