"""TrialSpecs -> Ray Tune: the grid's trials in packs (clgrid.sweep.packs: a pack of short trials
is one Ray Tune trial), each trial tracked in its own MLflow run, resumable from disk.

A sweep lives in its folder (``clgrid.sweep.layout``): ``sweep.json`` (the spec, the trials and
their MLflow run ids, written before any trial starts) and one folder per trial (``clgrid.sweep.trial``
trains it there). Resuming a sweep runs the same trials again: a trial with ``result.json`` returns
it at once, the others continue from their last checkpoint, each in its own MLflow run (never a
duplicate).

Ray: ``address`` (or ``RAY_ADDRESS``, which Ray sets inside a Ray job) attaches to a running
cluster; without one a local Ray instance starts. On a cluster the storage root must be a path
every node sees at the same place (a shared filesystem): trials write their folders there.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ray import tune

from clgrid import fsio, tracking
from clgrid.report.aggregate import label_trials, short
from clgrid.spec import PipelineSpec, TrialSpec, expand
from clgrid.spec.grid import expected_work
from clgrid.sweep import liveness, outbox, packs, tune_phase
from clgrid.sweep.layout import SweepDir, SweepMeta, SweepTrial, check_storage, reports_dir
from clgrid.sweep.lease import SweepLease
from clgrid.sweep.trial import FAULT_ENV, TrialConfig, trainable


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
    unsynced: list[Path] = field(default_factory=list)  # folders with what the tracking server missed

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.result is None]


def new_sweep_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def new_sweep_folder(root: Path) -> SweepDir:
    """A sweep folder no other sweep has: creating a folder is exclusive (also on NFS), so two sweeps
    started in the same second with the same random bits draw again instead of sharing one."""
    while True:
        folder = SweepDir.at(root, new_sweep_id())
        try:
            folder.path.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue


def prepare(spec: PipelineSpec, held: contextlib.ExitStack | None = None) -> Path:
    """Creates the sweep folder, the MLflow parent and child runs, and ``sweep.json``. With ``held``,
    the sweep's lease is taken as soon as its folder exists, and held until ``held`` closes."""
    check_storage(spec.storage.root)
    root = Path(spec.storage.root).resolve()
    trials = expand(spec)
    uri = spec.tracking_uri
    root.mkdir(parents=True, exist_ok=True)
    exp_id = tracking.experiment_id(uri, spec.experiment, str(root))
    folder = new_sweep_folder(root)
    if held is not None:
        held.enter_context(SweepLease(folder, "clgrid run"))
    sweep_id = folder.path.name
    note = (f"Sweep {sweep_id} of the pipeline spec `{spec.name}` (spec hash {spec.spec_hash}): {len(trials)} "
            f"trials, one child run each. Report: {reports_dir(root, spec.experiment) / 'report.html'} (written "
            f"when `clgrid run` ends; `clgrid report {spec.experiment} --storage {root}` rebuilds it), also "
            "attached to this run.")
    parent, run_ids = tracking.start_sweep(uri, exp_id, sweep_id, spec.spec_hash, trials, names=run_names(trials),
                                           note=note)
    folder.write_meta(SweepMeta(
        sweep_id=sweep_id, spec=spec.model_dump(mode="json"), spec_hash=spec.spec_hash, tracking_uri=uri,
        experiment=spec.experiment, parent_run_id=parent,
        trials=[SweepTrial(trial=t.model_dump(mode="json"), run_id=run_ids[t.trial_key], trial_key=t.trial_key)
                for t in trials],
    ))
    return folder.path


def run_names(trials: list[TrialSpec]) -> dict[str, str]:
    """Child run names by trial key: ``<configuration label>-seed<k>`` with the report's label
    (``replay-buffer_size=200-seed1``), led by the benchmark and scenario when the sweep has several.
    A label depends on what varies across the whole grid, so names are made here, from all trials."""
    groups = label_trials(trials, lambda t: t)
    names = {}
    for benchmark, scenario, configs in groups:
        lead = [f"{benchmark}-{scenario}"] if len(groups) > 1 else []
        for label, ts in configs:
            parts = [*lead, ts[0].strategy.name, *(f"{short(k)}={v}" for k, v in label.varying.items())]
            if label.text.endswith(f"[{ts[0].config_key[:8]}]"):  # the report's mark of labels that would collide
                parts.append(ts[0].config_key[:8])
            names.update({t.trial_key: "-".join([*parts, f"seed{t.seed}"]) for t in ts})
    return names


def prepare_and_connect(spec: PipelineSpec, address: str | None, held: contextlib.ExitStack | None = None) -> Path:
    """``prepare`` and ``connect`` at once: the driver sets up MLflow's store and runs while Ray's
    start-up mostly waits for its processes (seconds off every `clgrid run` on a small machine)."""
    check_storage(spec.storage.root)  # a storage root that can never work starts no Ray
    with ThreadPoolExecutor(1) as pool:
        prepared = pool.submit(prepare, spec, held)
        connect(address)  # ray.init stays in the main thread; MLflow's client works from any
        return prepared.result()


FORWARDED_ENV = (FAULT_ENV,)  # the driver's settings that trials read
# What a trial imports before it trains (the trainable's module, the trainer and torch, and the
# compiler stack torch.optim's first step loads), imported by the workers a local Ray instance
# prestarts while Ray and the driver still start up, instead of after the first trial began.
WORKER_PRELOAD = ("clgrid.sweep.trial", "clgrid.train.trainer", "torch._dynamo")


def trial_env() -> dict[str, str]:
    """Environment variables trials get from their driver: quiet warnings, and FORWARDED_ENV, which
    reach workers on other nodes only this way. Nothing else: Ray writes a runtime_env verbatim to
    its logs (runtime_env_agent.log) and the job API, so a CLGRID_API_TOKEN must not travel in it."""
    return {"PYTHONWARNINGS": "ignore", **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}


def _credentials_stay_out_of_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS_* credentials into every trainable's runtime_env, and Ray's
    runtime_env_agent logs that verbatim. Local workers inherit the driver's environment anyway;
    cluster nodes use their own credentials (instance roles, the pod's secrets)."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in class_cache.ENV_VARS_TO_PROPAGATE if not v.startswith("AWS_")}


def _trainables_take_prestarted_workers() -> None:
    """Ray Tune gives every trainable a runtime_env setting PL_DISABLE_FORK (for PyTorch Lightning,
    which clgrid does not use); any runtime_env keeps an actor off the workers Ray prestarts."""
    from ray.tune.execution import class_cache

    class_cache.DEFAULT_ENV_VARS = {}


def connect(address: str | None) -> None:
    """Attaches to the cluster at ``address`` or ``RAY_ADDRESS``; else starts a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    if address or os.environ.get("RAY_ADDRESS"):
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
        # Inside a Ray job Ray refuses a driver env var that the job's runtime_env already sets.
        env = {k: v for k, v in trial_env().items() if k not in job.get("env_vars", {})}
        ray.init(address=address, runtime_env={"env_vars": env}, **quiet)
    else:  # "local": never attach silently to a cluster someone started on this machine with `ray start`
        # Local workers descend from the Ray processes started here and inherit their environment.
        # Without a runtime_env trials run in the workers Ray prestarts at init; with one, Ray starts
        # and sets up new workers first (seconds before the first trial on a small machine).
        with _environment(trial_env()):
            ray.init(address="local", include_dashboard=False, configure_logging=True,
                     _system_config={"preload_python_modules": list(WORKER_PRELOAD)}, **quiet)


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` added to os.environ inside the block (for the processes started there), then undone."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(sweep_dir: Path, *, address: str | None = None, max_concurrent: int | None = None,
        progress: bool = True) -> SweepOutcome:
    """Runs (or resumes) the sweep in ``sweep_dir`` on a local Ray instance or the cluster at ``address``."""
    folder = SweepDir(sweep_dir)
    meta = folder.meta()
    uri, parent = meta.tracking_uri, meta.parent_run_id
    spec = PipelineSpec.model_validate(meta.spec)
    res = spec.resources
    seconds = tracking.retry_seconds()
    connect(address)
    _credentials_stay_out_of_runtime_envs()
    _trainables_take_prestarted_workers()

    def fit(trainable_: Any, param_space: dict[str, Any], *, name: str, callbacks: list, **settings: Any) -> None:
        tune.Tuner(
            tune.with_resources(trainable_, {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}),
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or res.max_concurrent, reuse_actors=True,
                                        **settings),
            run_config=tune.RunConfig(
                name=f"{name}-{secrets.token_hex(2)}", storage_path=str(folder.ray),
                failure_config=tune.FailureConfig(max_failures=res.max_failures), verbose=0, callbacks=callbacks,
            ),
        ).fit()

    tracking.with_retries(lambda: tracking.client(uri).update_run(parent, "RUNNING"))  # a resumed sweep
    outbox.record_end(folder, parent, None)  # an earlier driver's end that the server missed: this driver ends the run
    # Ray Tune's default CSV, JSON and TensorBoard loggers write files nothing reads, and the last
    # prints a "To visualize your results with TensorBoard" hint; trials keep their own results.
    # Its experiment state (every trial's state as JSON, for Tuner.restore, which clgrid does not use:
    # a sweep resumes from its own folder) is saved at the end only, not every few seconds: at
    # thousands of trials each save took seconds of the driver's CPU.
    tune_env = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_GLOBAL_CHECKPOINT_S": str(10**9)}
    with liveness.Heartbeat(uri, parent), _environment(tune_env):
        # with `tune:` the tuning phase first; its final trials then run like a sweep's
        try:
            chosen = tune_phase.run(folder, meta, spec, fit, run_names) if spec.tune else [(t, {}) for t in meta.trials]
        except tune_phase.TuningIncomplete as exc:
            _end_runs(uri, folder, parent, [TrialOutcome(t, run_id, None) for t, run_id in exc.trials])
            raise
        trials = [t for t, _ in chosen]
        extra = {t.trial_key: m for t, m in chosen}
        configs = {t.trial_key: TrialConfig(trial=t, sweep_dir=str(folder.path), tracking_uri=uri, retry_seconds=seconds,
                                            extra_metrics=extra[t.trial_key]).model_dump() for t in trials}
        specs = {t.trial_key: t.trial_spec() for t in trials}
        # Ray Tune runs packs of trial keys (clgrid.sweep.packs); the configs go once to the object
        # store. The name creators are module functions: Ray Tune pickles them into every trial's state.
        searcher = packs.PackSearcher([t.trial_key for t in longest_first(trials)],
                                      packs.slots(res.cpus_per_trial, res.gpus_per_trial, max_concurrent or res.max_concurrent))
        fit(tune.with_parameters(trainable, configs=configs), {}, name=meta.sweep_id,
            callbacks=[Progress(specs)] if progress else [], trial_name_creator=trial_name,
            trial_dirname_creator=trial_name, search_alg=searcher, num_samples=len(trials))
    outcomes = []
    for t in trials:
        result_file = folder.trial(t.trial_key).result
        result = fsio.read_json(result_file) if result_file.exists() else None
        error = None if result else "failed: see Ray's error file"
        outcomes.append(TrialOutcome(t.trial_spec(), t.run_id, result, error))
    _end_runs(uri, folder, parent, outcomes)
    folders = [folder.trial(t.trial_key) for t in trials] + [folder]
    return SweepOutcome(meta.sweep_id, folder.path, meta.experiment, uri, parent, outcomes, outbox.pending(folders))


def trial_name(trial: Any) -> str:
    """A Ray Tune trial's name and folder: its pack's first trial key (which names that trial's
    clgrid folder) and how many trials follow it."""
    keys = trial.config[packs.KEYS]
    return keys[0] + (f"+{len(keys) - 1}" if len(keys) > 1 else "")


def longest_first(trials: list[SweepTrial]) -> list[SweepTrial]:
    """The trials in the order Ray Tune starts them: the longest expected first (spec order among
    equals), so that the sweep does not end with one long trial running alone on an idle machine."""
    work = {t.trial_key: expected_work(t.trial_spec()) for t in trials}
    return sorted(trials, key=lambda t: -work[t.trial_key])


def _end_runs(uri: str, folder: SweepDir, parent: str, outcomes: list[TrialOutcome]) -> None:
    """Ends the runs of trials whose workers died past max_failures, then the sweep's run. With the
    tracking server away, these statuses wait in outboxes for `clgrid sync`."""
    failed = [o for o in outcomes if o.result is None]
    ends = [(folder.trial(o.trial.trial_key), o.run_id, "FAILED") for o in failed]
    ends.append((folder, parent, "FAILED" if failed else "FINISHED"))
    try:
        for o in failed:
            if tracking.run_status(uri, o.run_id) == "RUNNING":
                tracking.end_run(uri, o.run_id, "FAILED")
        tracking.end_run(uri, parent, ends[-1][2])
    except Exception as exc:
        for where, run_id, status in ends:
            outbox.record_end(where, run_id, status, outbox.describe(exc))


class Progress(tune.Callback):
    """A line per experience a pack reports and per finished trial, printed by the driver."""

    def __init__(self, specs: dict[str, TrialSpec]):
        self.specs, self.done, self.start = specs, 0, time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "experience" in result:
            spec = self.specs[result["trial"]]
            print(f"  {_label(spec)}: experience {result['experience'] + 1}/{spec.benchmark.experiences}"
                  f"  acc={result['acc']:.3f}", flush=True)
        for key, _, acc in result.get(packs.FINISHED, []):
            self.done += 1
            print(f"[{self.done}/{len(self.specs)} trials, {time.time() - self.start:.0f}s] finished "
                  f"{_label(self.specs[key])}" + (f"  acc={acc:.3f}" if acc is not None else ""), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        keys = trial.config[packs.KEYS]
        more = f" (and {len(keys) - 1} more trials of its pack)" if len(keys) > 1 else ""
        print(f"[trial error] {_label(self.specs[keys[0]])}{more}: see {trial.path}", file=sys.stderr, flush=True)


def _label(t: TrialSpec) -> str:
    return f"{t.strategy.name} seed{t.seed} {t.benchmark.source}/{t.benchmark.scenario}"
