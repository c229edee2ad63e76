"""One sweep's trial runs and accuracy matrices, read from MLflow (names from clgrid.tracking.schema).

Which runs: the trial runs of ONE sweep, the latest (by parent start time) unless `sweep_id`
names another. Sweeps of the same pipeline may come from different specs or code, so pooling
them would silently mix grids. An experiment without any sweep parent run (trials logged
directly) is reported as a whole.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clgrid.tracking.schema import (
    BENCHMARK, CONFIG_KEY, CONT_ACC, CONTINUAL_JSON, MATRIX_JSON, PARENT, PHASE, PROBE_FILES, ROLE, SCENARIO, SEED,
    STRATEGY, SWEEP, SWEEP_ID, TRIAL, client, search, with_retries,
)
from clgrid.train import metrics

FINISHED = "FINISHED"
NEWEST_FIRST = ["attributes.start_time DESC"]
DOWNLOAD_THREADS = 8  # a tracking server answers downloads one request each: overlap their latency


class ReportError(RuntimeError):
    """The report cannot be built (unknown experiment or sweep, no finished runs)."""


@dataclass(frozen=True)
class Matrix:
    r: np.ndarray
    names: list[str]
    summary: dict[str, float]  # clgrid.train.metrics.summary of r and b


@dataclass(frozen=True)
class Continual:
    """A run's continual-evaluation trace: the accuracy on each experience seen so far at training
    steps ``steps``; experience i started at training step ``boundaries[i]``."""

    steps: np.ndarray
    acc: list[np.ndarray]  # per evaluation point: one accuracy per experience seen then
    boundaries: list[float]

    @property
    def mean(self) -> np.ndarray:
        """The mean accuracy over the experiences seen, per evaluation point (cont_acc)."""
        return np.array([a.mean() if a.size else math.nan for a in self.acc])


@dataclass(frozen=True)
class Trial:
    run_id: str
    status: str
    end_time: int
    benchmark: str
    scenario: str
    strategy: str
    seed: str
    config_key: str
    params: dict[str, str]
    metrics: dict[str, float]
    matrix: Matrix | None  # finished runs with a usable accuracy_matrix.json
    matrix_problem: str | None  # finished runs without one: why
    probes: dict[str, dict] = field(default_factory=dict)  # probe artifact file name -> its JSON
    tags: dict[str, str] = field(default_factory=dict)
    continual: Continual | None = None  # runs with continual evaluation (issue 15)

    @property
    def phase(self) -> str:
        """``tune`` or ``final`` in a tune-then-test sweep (clgrid.tracking.schema.PHASE), else ""."""
        return self.tags.get(PHASE, "")


@dataclass(frozen=True)
class Sweep:
    experiment: str
    sweep_id: str | None  # None: no sweep parent run, every trial run of the experiment
    parent_run_id: str | None
    trials: list[Trial]  # newest first

    @property
    def n_finished(self) -> int:
        return sum(t.status == FINISHED for t in self.trials)


def collect(uri: str, experiment: str, sweep_id: str | None) -> Sweep:
    """The trial runs of the sweep, their finished runs' matrices read; ReportError if none finished."""
    c = client(uri)
    exp = with_retries(lambda: c.get_experiment_by_name(experiment))
    if exp is None:
        raise ReportError(f"no MLflow experiment named {experiment!r} at this tracking URI")
    parent = _find_sweep(uri, exp.experiment_id, experiment, sweep_id)
    query = f"tags.`{ROLE}` = '{TRIAL}'" + (f" and tags.`{PARENT}` = '{parent.info.run_id}'" if parent else "")
    runs = search(uri, exp.experiment_id, query, order_by=NEWEST_FIRST)
    finished = [r for r in runs if r.info.status == FINISHED]
    matrices = _read_matrices(c, finished)
    probes = _read_json(c, [r for r in finished if "probe_seconds" in r.data.metrics], PROBE_FILES)
    traces = _read_json(c, [r for r in finished if CONT_ACC in r.data.metrics], (CONTINUAL_JSON,))
    sweep = Sweep(experiment, parent.data.tags.get(SWEEP_ID, "?") if parent else None,
                  parent.info.run_id if parent else None,
                  [_trial(r, matrices.get(r.info.run_id), probes.get(r.info.run_id, {}),
                          _continual(traces.get(r.info.run_id, {}).get(CONTINUAL_JSON))) for r in runs])
    _check_finished(sweep)
    return sweep


def _find_sweep(uri: str, exp_id: str, experiment: str, sweep_id: str | None) -> Run | None:
    parents = search(uri, exp_id, f"tags.`{ROLE}` = '{SWEEP}'", order_by=NEWEST_FIRST)
    if sweep_id is None:
        return parents[0] if parents else None
    for run in parents:
        if run.data.tags.get(SWEEP_ID) == sweep_id:
            return run
    known = ", ".join(sorted({r.data.tags.get(SWEEP_ID, "?") for r in parents})) or "none"
    raise ReportError(f"experiment {experiment!r} has no sweep {sweep_id!r} (sweeps: {known})")


def _check_finished(sweep: Sweep) -> None:
    if sweep.n_finished:
        return
    statuses = Counter(t.status for t in sweep.trials)
    where = f"sweep {sweep.sweep_id!r} of " if sweep.parent_run_id else ""
    found = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no trial runs"
    raise ReportError(f"{where}experiment {sweep.experiment!r} has no finished trial runs ({found}); "
                      "nothing to report. Wait for the sweep, resume it, or pass another sweep id.")


def _trial(run: Run, matrix: Matrix | str | None, probes: dict[str, dict], continual: Continual | None) -> Trial:
    tags, info, params = run.data.tags, run.info, run.data.params
    return Trial(
        run_id=info.run_id, status=info.status, end_time=info.end_time or 0,
        benchmark=tags.get(BENCHMARK, "?"), scenario=tags.get(SCENARIO, "?"),
        strategy=tags.get(STRATEGY, params.get("strategy.name", "?")),
        seed=tags.get(SEED, params.get("seed", "?")),
        # Without a config key each run is its own configuration rather than a wrong pooling.
        config_key=tags.get(CONFIG_KEY, info.run_id),
        params=dict(params), metrics=dict(run.data.metrics),
        matrix=matrix if isinstance(matrix, Matrix) else None,
        matrix_problem=matrix if isinstance(matrix, str) else None, probes=probes, tags=dict(tags),
        continual=continual,
    )


def _read_matrices(c: MlflowClient, runs: list[Run]) -> dict[str, Matrix | str]:
    """run id -> its Matrix, or why it has none (the report then uses the logged metrics)."""
    with tempfile.TemporaryDirectory(prefix="clgrid-report-") as tmp, ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        return dict(zip((r.info.run_id for r in runs), pool.map(lambda r: _matrix(c, r, Path(tmp)), runs)))


def _matrix(c: MlflowClient, run: Run, tmp: Path) -> Matrix | str:
    try:
        return _parse_matrix(_artifact_text(c, run, tmp, MATRIX_JSON))
    except (MlflowException, OSError, ValueError, KeyError, TypeError) as e:
        return f"no usable {MATRIX_JSON} ({type(e).__name__}): logged metrics used"


def _read_json(c: MlflowClient, runs: list[Run], names: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """run id -> {artifact name: its JSON} of the runs' JSON artifacts ``names``; a missing or broken
    file is left out: the report then shows the logged metrics alone."""
    def read(run: Run, tmp: Path) -> dict[str, dict]:
        found = {}
        for name in names:
            try:
                found[name] = json.loads(_artifact_text(c, run, tmp, name))
            except (MlflowException, OSError, ValueError):
                pass
        return found

    with tempfile.TemporaryDirectory(prefix="clgrid-report-") as tmp, ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        return dict(zip((r.info.run_id for r in runs), pool.map(lambda r: read(r, Path(tmp)), runs)))


def _artifact_text(c: MlflowClient, run: Run, tmp: Path, name: str) -> str:
    """Read in place from a local artifact store: MLflow's download costs two run lookups and a copy.

    Anything else (a server, a missing file) goes through MLflow, whose error then names the problem.
    Not retried: a missing artifact is not always a permanent MLflow error, and waiting for it
    would stall the whole report over one unsynced run."""
    parsed = urlparse(run.info.artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        local = Path(url2pathname(parsed.path)) / name
        if local.is_file():
            return local.read_text()
    return Path(c.download_artifacts(run.info.run_id, name, str(tmp / run.info.run_id))).read_text()


def _continual(data: dict | None) -> Continual | None:
    """The trace of continual.json, or None when it is absent or malformed (its plot then leaves the
    run out; the logged summary metrics still count)."""
    try:
        steps = np.asarray(data["steps"], dtype=float)
        acc = [np.asarray(a, dtype=float).ravel() for a in data["acc"]]
        boundaries = [float(b) for b in data.get("boundaries") or []]
    except (TypeError, KeyError, ValueError):
        return None
    return Continual(steps, acc, boundaries) if steps.ndim == 1 and len(acc) == len(steps) > 0 else None


def _parse_matrix(text: str) -> Matrix:
    data = json.loads(text)
    r = np.asarray(data["R"], dtype=float)
    b = [float(x) for x in data["b"]]
    if len(b) != len(r):
        raise ValueError(f"b has {len(b)} entries for {len(r)} experiences")
    summary = metrics.summary(r, b)  # ValueError unless R is square
    exps = data.get("experiences") or []
    # Experiences may be described by dicts; a short name is all the plots need.
    names = [str(e) if isinstance(e, (str, int, float)) else str(i) for i, e in enumerate(exps)]
    return Matrix(r, names if len(names) == len(r) else [str(i) for i in range(len(r))], summary)
