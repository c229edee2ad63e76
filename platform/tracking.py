"""MLflow, through an explicit ``MlflowClient`` (never the fluent global run).

One experiment per pipeline, one parent run per sweep, one child run per trial. Child runs are
created by the driver before any trial starts; their ids travel in the trial configs, so a retried
or restored trial writes to the same run. Per-experience metrics are logged with ``step`` = the
experience index, and a step already present is not logged again.

Every call retries for ``CLGRID_TRACKING_RETRY_SECONDS`` (default 60); a trial whose tracking
server stays away longer keeps training and leaves what it could not upload to ``clgrid sync``
(``clgrid.trial_logger``).
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from clgrid import matrix_png
from clgrid.errors import UsageError
from clgrid.spec import TrialSpec

T = TypeVar("T")
MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
RETRY_ENV = "CLGRID_TRACKING_RETRY_SECONDS"
RETRY_SECONDS = 60.0
# Answers another try cannot change: fail at once instead of for the whole budget.
PERMANENT = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def retry_seconds() -> float:
    """How long one MLflow call keeps retrying: ``CLGRID_TRACKING_RETRY_SECONDS``, default 60."""
    value = os.environ.get(RETRY_ENV, "")
    try:
        seconds = float(value) if value else RETRY_SECONDS
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise UsageError(f"{RETRY_ENV}={value!r}: expected a number of seconds >= 0")
    return seconds


def with_retries(fn: Callable[[], T], seconds: float | None = None) -> T:
    """Calls ``fn``, retrying with jittered exponential backoff (0.2 s doubling, at most 10 s apart)
    for up to ``seconds`` (default ``retry_seconds()``): SQLite "database is locked" from concurrent
    trials, a tracking server that is briefly away. PERMANENT MLflow errors are raised at once."""
    deadline = time.monotonic() + (retry_seconds() if seconds is None else seconds)
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            pause = min(delay, 10.0) * (0.5 + random.random())
            if getattr(exc, "error_code", None) in PERMANENT or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            delay *= 2


@functools.lru_cache(maxsize=4)
def client(uri: str) -> MlflowClient:
    # MLflow's HTTP client retries a refused connection for about 4 minutes per call (7 retries,
    # backoff factor 2) and waits 120 s for an answer; under with_retries that multiplies into
    # half an hour. One budget, ours, unless the user set MLflow's.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run" line per ended run
    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Raises UsageError (one line) when an HTTP tracking server does not answer within ``timeout``.

    Asked with plain urllib, once: MLflow's own client retries a refused connection for minutes
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _TIMEOUT), long after the user should have been told. Any HTTP
    answer counts as reachable (a 401 from an authenticating proxy is the server's business)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as exc:  # URLError, refused, timeout, bad host; ValueError: malformed URI
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"tracking server {uri} is unreachable ({reason}); expected an MLflow tracking server "
                         f"answering HTTP there (start it first, or leave out --tracking-uri to use SQLite in "
                         f"the storage root)") from None


def local_artifact_root(uri: str, storage_root: str) -> str | None:
    """Where an embedded store keeps artifacts: beside the database, not in the caller's cwd."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None  # a server decides
    return (Path(storage_root).resolve() / "mlartifacts").as_uri()


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
        "mlflow.parentRunId": parent_run_id,
        "mlflow.runName": trial.label,
        "clgrid.role": "trial",
        "clgrid.sweep_id": sweep_id,
        "clgrid.strategy": trial.strategy.name,
        "clgrid.benchmark": trial.benchmark.id,
        "clgrid.scenario": trial.benchmark.scenario,
        "clgrid.seed": str(trial.seed),
        "clgrid.trial_key": trial.trial_key,
        "clgrid.config_key": trial.config_key,
        "clgrid.spec_hash": trial.spec_hash,
    }


def start_sweep(uri: str, exp_id: str, sweep_id: str, spec_hash: str, trials: list[TrialSpec]) -> tuple[str, dict[str, str]]:
    """Creates the sweep's parent run and one child run per trial; returns their ids."""
    c = client(uri)
    parent = with_retries(lambda: c.create_run(exp_id, run_name=f"sweep-{sweep_id}", tags={
        "clgrid.role": "sweep", "clgrid.sweep_id": sweep_id, "clgrid.spec_hash": spec_hash}))
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


MATRIX_FILES = ("accuracy_matrix.json", "accuracy_matrix.png")


def write_matrix(folder: Path, R: list[list[float]], b: list[float]) -> None:
    """``accuracy_matrix.json`` and ``accuracy_matrix.png`` in ``folder``, each written atomically."""
    from clgrid import checkpoint  # imports torch, which `clgrid report` (also a user of this module) does not need

    checkpoint.write_json(folder / MATRIX_FILES[0], {"R": R, "b": b, "experiences": list(range(len(R)))})
    checkpoint.atomic_write(folder / MATRIX_FILES[1], matrix_png.render(R))


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
