"""TrialSpecs -> Ray Tune: one trial per grid point, tracked in MLflow, resumable from disk.

A sweep lives in ``<storage>/sweeps/<sweep_id>/``: ``sweep.json`` (the spec, the trials and their
MLflow run ids, written before any trial starts) and one folder per trial (checkpoints after every
experience, ``result.json`` once finished). Resuming a sweep runs the same trials again: a trial
with ``result.json`` returns it at once, the others continue from their last checkpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from clgrid import checkpoint, tracking
from clgrid.spec import PipelineSpec, TrialSpec, expand

RESULT = "result.json"


@dataclass
class TrialOutcome:
    trial: TrialSpec
    run_id: str
    result: dict[str, Any] | None  # result.json content; None when the trial failed
    error: str | None = None


@dataclass
class SweepOutcome:
    sweep_id: str
    sweep_dir: Path
    experiment: str
    tracking_uri: str
    parent_run_id: str
    trials: list[TrialOutcome]

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.result is None]


def new_sweep_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def prepare(spec: PipelineSpec, sweep_id: str | None = None) -> Path:
    """Creates the sweep folder, the MLflow parent and child runs, and ``sweep.json``."""
    sweep_id = sweep_id or new_sweep_id()
    root = Path(spec.storage.root).resolve()
    sweep_dir = root / "sweeps" / sweep_id
    trials = expand(spec)
    uri = spec.tracking_uri
    root.mkdir(parents=True, exist_ok=True)
    exp_id = tracking.experiment_id(uri, spec.experiment, str(root))
    parent, run_ids = tracking.start_sweep(uri, exp_id, sweep_id, spec.spec_hash, trials)
    checkpoint.write_json(sweep_dir / "sweep.json", {
        "sweep_id": sweep_id, "spec": spec.model_dump(mode="json"), "tracking_uri": uri,
        "experiment": spec.experiment, "parent_run_id": parent,
        "trials": [{"trial": t.model_dump(mode="json"), "run_id": run_ids[t.trial_key]} for t in trials],
    })
    return sweep_dir


def _trainable(point: dict[str, Any]) -> None:
    """One Ray Tune trial: train (or resume) and log every experience to the trial's MLflow run."""
    from clgrid import trainer

    config = point["cfg"]
    trial = TrialSpec.model_validate(config["trial"])
    uri, run_id, trial_dir = config["tracking_uri"], config["run_id"], Path(config["trial_dir"])
    if (trial_dir / RESULT).exists():  # finished in an earlier attempt or an earlier run of the sweep
        tune.report(checkpoint.read_json(trial_dir / RESULT)["metrics"])
        return
    tracking.with_retries(lambda: tracking.client(uri).update_run(run_id, "RUNNING"))
    done = tracking.logged_steps(uri, run_id)

    def on_experience(report: trainer.ExperienceReport) -> None:
        if report.experience not in done:
            tracking.log_experience(uri, run_id, report.experience, report.row, report.metrics, report.costs)
        tune.report({"experience": report.experience, **report.metrics, **report.costs})

    _mark_attempt(trial_dir)
    try:
        result = trainer.run_trial(trial, trial_dir, on_experience=on_experience)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.log_matrix(uri, run_id, result.R, result.b, trial_dir / "artifacts")
    checkpoint.write_json(trial_dir / RESULT, {"metrics": {**result.metrics, **result.costs}, "R": result.R, "b": result.b})
    tracking.end_run(uri, run_id, "FINISHED")


def _mark_attempt(trial_dir: Path) -> None:
    """Counts trainer starts per trial (tests use it to prove finished trials are not rerun)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "attempts.log", "a") as f:
        f.write(f"{time.time():.3f} pid={os.getpid()}\n")


def run(sweep_dir: Path, *, address: str | None = None, max_concurrent: int | None = None,
        progress: bool = True) -> SweepOutcome:
    """Runs (or resumes) the sweep in ``sweep_dir`` on a local Ray instance or the cluster at ``address``."""
    import ray

    meta = checkpoint.read_json(sweep_dir / "sweep.json")
    spec = PipelineSpec.model_validate(meta["spec"])
    res = spec.resources
    configs = [{
        "trial": t["trial"], "run_id": t["run_id"], "tracking_uri": meta["tracking_uri"],
        "trial_dir": str(sweep_dir / TrialSpec.model_validate(t["trial"]).trial_key),
    } for t in meta["trials"]]
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 configure_logging=True, runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}),
        param_space={"cfg": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent or res.max_concurrent, reuse_actors=True,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=f"{meta['sweep_id']}-{secrets.token_hex(2)}", storage_path=str(sweep_dir / "ray"),
            failure_config=tune.FailureConfig(max_failures=res.max_failures), verbose=0,
            callbacks=[Progress(len(configs))] if progress else [],
        ),
    )
    tuner.fit()
    outcomes = []
    for t in meta["trials"]:
        trial = TrialSpec.model_validate(t["trial"])
        result_path = sweep_dir / trial.trial_key / RESULT
        result = checkpoint.read_json(result_path) if result_path.exists() else None
        outcomes.append(TrialOutcome(trial, t["run_id"], result, None if result else "failed: see Ray's error file"))
    tracking.end_run(meta["tracking_uri"], meta["parent_run_id"], "FINISHED" if all(o.result for o in outcomes) else "FAILED")
    return SweepOutcome(meta["sweep_id"], sweep_dir, meta["experiment"], meta["tracking_uri"], meta["parent_run_id"], outcomes)


def _trial_name(trial: Any) -> str:
    t = trial.config["cfg"]["trial"]
    return f"{t['strategy']['name']}-{TrialSpec.model_validate(t).trial_key}"


class Progress(tune.Callback):
    """One line per finished experience and per finished trial, printed by the driver."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t = trial.config["cfg"]["trial"]
        print(f"  {_label(t)}: experience {result['experience'] + 1}/{t['benchmark']['experiences']}"
              f"  acc={result['acc']:.3f}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        print(f"[{self.done}/{self.total} trials, {time.time() - self.start:.0f}s] finished "
              f"{_label(trial.config['cfg']['trial'])}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[trial error] {_label(trial.config['cfg']['trial'])}: see {trial.path}", file=sys.stderr, flush=True)


def _label(t: dict[str, Any]) -> str:
    return f"{t['strategy']['name']} seed{t['seed']} {t['benchmark']['source']}/{t['benchmark']['scenario']}"
