"""Tune-then-test: the tuning phase of a spec with ``tune:``, and the final trials it chooses.

Per (strategy entry, benchmark) pair, one Ray Tune run searches the entry's grid axes and
distributions (and ``train.lr``'s): grid and random search are Ray's BasicVariantGenerator over
points drawn here, Optuna search is OptunaSearch; the scheduler is FIFO or ASHA with the experience
as its time. One Ray trial is one configuration: it trains the configuration on every tuning seed
in turn (one trial folder and MLflow run each, tagged ``clgrid.phase=tune``) and reports to Ray
Tune nothing but the validation metrics and its progress (``experience``: experiences trained over
its seeds); its last report carries the mean over the tuning seeds. Test metrics are measured and
logged like any trial's (for the report's "what tuning on test would have said"), never reported.

Then each pair's configuration with the best mean validation metric over the tuning seeds (among
those that trained on every seed: ASHA stops some) runs on the spec's seeds, evaluated on test: the
final trials, tagged ``clgrid.phase=final`` with the tuning runs they were chosen from and the
pair's tuning cost (tracking.schema).

Resuming: ``tune.json`` (SweepDir.tune) holds every point of every pair and its state, written by
the driver as Ray reports. Random points are drawn (seeded) and written before Ray starts; Optuna's
are written as Ray starts them. A resumed sweep skips finished pairs, never reruns an ended point
(finished or stopped by ASHA: Optuna is told the finished ones' scores), reruns started ones from
their checkpoints, and draws only what is missing. Ray Tune's own Tuner.restore is not used: its
state is Ray's pickles, and the points here are the sweep's own record, readable without Ray.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from clgrid import fsio, tracking
from clgrid.errors import UsageError
from clgrid.spec import PipelineSpec, TrialSpec
from clgrid.spec.grid import pairs, point, search_axes
from clgrid.spec.spaces import Space
from clgrid.sweep.layout import SweepDir, SweepMeta, SweepTrial
from clgrid.sweep.trial import TrialConfig, attempt
from clgrid.sweep.trial_logger import read_history
from clgrid.tracking.schema import FINAL, SELECTED_FROM, TUNE, TUNE_ENTRY, TUNING_DEVICE_SECONDS, TUNING_TRAIN_FLOPS
from clgrid.train.metrics import VAL_PREFIX

STARTED, ENDED, FAILED = "started", "ended", "failed"  # a point's states in tune.json; "planned" before Ray starts it
PLANNED = "planned"
EXPERIENCE = "experience"  # the time attribute of ASHA: experiences trained over the tuning seeds


class TuningIncomplete(UsageError):
    """Some tuning configurations failed: no final configuration is chosen until they finish.
    ``trials``: their unfinished trials and MLflow run ids."""

    def __init__(self, message: str, trials: list[tuple[TrialSpec, str]]):
        super().__init__(message)
        self.trials = trials


class TuneContext(BaseModel):
    """What every tuning trial of one pair gets besides its point (Ray's ``with_parameters``)."""

    sweep_dir: str
    spec: dict[str, Any]
    entry: int
    benchmark: int
    experiment_id: str
    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    retry_seconds: float


def pair_key(entry: int, benchmark: int) -> str:
    return f"{entry}.{benchmark}"


def tuning_trials(spec: PipelineSpec, entry: int, benchmark: int, hp: dict[str, Any]) -> list[TrialSpec]:
    """The trials of one point (``hp``: "section.field" -> value) on the tuning seeds."""
    return _trials(spec, entry, benchmark, hp, spec.tune.seeds)


def _trials(spec: PipelineSpec, entry: int, benchmark: int, hp: dict[str, Any], seeds: list[int]) -> list[TrialSpec]:
    values: dict[str, dict[str, Any]] = {}
    for key, value in hp.items():
        section, field = key.split(".", 1)
        values.setdefault(section, {})[field] = value
    config, train = point(spec.strategies[entry], spec.train, values)
    return [TrialSpec(pipeline=spec.name, experiment=spec.experiment, spec_hash=spec.spec_hash,
                      benchmark=spec.benchmarks[benchmark], strategy=config, model=spec.model, train=train, seed=seed,
                      resources=spec.resources, storage=spec.storage, probes=spec.probes, evaluate=spec.evaluate)
            for seed in seeds]


def tuned_experiences(spec: PipelineSpec, benchmark: int) -> int:
    """How many experiences a tuning trial trains: the stream, or its first ``tune.experiences``."""
    return spec.tune.experiences or spec.benchmarks[benchmark].experiences


def trainable(point_: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One configuration on every tuning seed, reporting validation metrics only."""
    context = TuneContext.model_validate(ctx)
    spec = PipelineSpec.model_validate(context.spec)
    trials = tuning_trials(spec, context.entry, context.benchmark, point_["hp"])
    n = tuned_experiences(spec, context.benchmark)
    results: list[dict[str, Any]] = []
    for k, trial in enumerate(trials):
        last = k == len(trials) - 1

        def report(measured: dict[str, Any], k: int = k, last: bool = last) -> None:
            done = measured.get(EXPERIENCE, -1) + 1  # a trial finished in an earlier run reports no experience
            if done and not (last and done == n):  # the last one is reported once its result.json is written
                tune.report({EXPERIENCE: k * n + done, **{key: v for key, v in measured.items()
                                                          if key.startswith(VAL_PREFIX)}})

        config = TrialConfig(trial=_tuning_run(context, trial), sweep_dir=context.sweep_dir,
                             tracking_uri=context.tracking_uri, retry_seconds=context.retry_seconds)
        results.append(attempt(config, report, n if n < trial.benchmark.experiences else None))
    # The last report, after every result.json is written (a scheduler may stop the trial at it):
    # the validation metrics' means over the tuning seeds.
    names = [key for key in results[0]["metrics"] if key.startswith(VAL_PREFIX)]
    tune.report({EXPERIENCE: len(trials) * n, **{key: statistics.fmean(r["metrics"][key] for r in results)
                                                 for key in names}})


def _tuning_run(context: TuneContext, trial: TrialSpec) -> SweepTrial:
    """The trial's MLflow run, created by its first attempt (the driver cannot know Optuna's points
    in advance) and kept in its folder, so that a retry or a resumed sweep logs to the same run."""
    folder = SweepDir(Path(context.sweep_dir)).trial(trial.trial_key)
    if not folder.run.exists():
        name = f"tune-{trial.strategy.name}-{trial.config_key[:8]}-seed{trial.seed}"
        tags = tracking.trial_tags(trial, context.sweep_id, context.parent_run_id, name, phase=TUNE) | {
            TUNE_ENTRY: str(context.entry)}
        run_id = tracking.create_trial_run(context.tracking_uri, context.experiment_id, trial, tags)
        folder.path.mkdir(parents=True, exist_ok=True)
        fsio.write_json(folder.run, {"run_id": run_id})
    return SweepTrial(trial=trial.model_dump(mode="json"), run_id=fsio.read_json(folder.run)["run_id"],
                      trial_key=trial.trial_key)


# ---- the driver's side ---------------------------------------------------------------------------

Fit = Callable[..., None]  # the driver's Ray Tune run: fit(trainable, param_space, name=, callbacks=, **TuneConfig)


class State:
    """tune.json: per pair its points ({"hp", "state"}) and whether its tuning is done; then the final
    trials ({"trial": SweepTrial, "metrics": tuning cost}). Written atomically at every change."""

    def __init__(self, folder: SweepDir):
        self.folder = folder
        self.data: dict[str, Any] = fsio.read_json(folder.tune) if folder.tune.exists() else {"pairs": {}, "final": None}

    def pair(self, key: str) -> dict[str, Any]:
        return self.data["pairs"].setdefault(key, {"points": [], "done": False})

    def save(self) -> None:
        fsio.write_json(self.folder.tune, self.data)


class Recorder(tune.Callback):
    """Records in tune.json, from the driver, each point Ray starts and ends, and the result keys
    Ray Tune was given (what reached the searcher and the scheduler)."""

    def __init__(self, state: State, key: str, label: str):
        self.state, self.points, self.label = state, state.pair(key)["points"], label

    def _point(self, trial: Any) -> dict[str, Any]:
        hp = trial.config["hp"]
        found = next((p for p in self.points if p["hp"] == hp), None)
        if found is None:
            found = {"hp": hp, "state": PLANNED}
            self.points.append(found)
        return found

    def on_trial_start(self, iteration, trials, trial, **info):
        self._point(trial)["state"] = STARTED
        self.state.save()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        found = self._point(trial)
        keys = sorted(set(found.get("reported", [])) | {k for k in result if k != "config"})
        if keys != found.get("reported"):
            found["reported"] = keys
            self.state.save()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._point(trial)["state"] = ENDED
        self.state.save()
        ended = sum(p["state"] == ENDED for p in self.points)
        print(f"  tuning {self.label}: {ended} configurations ended", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._point(trial)["state"] = FAILED
        self.state.save()


def planned(spec: PipelineSpec, entry: int, benchmark: int) -> list[dict[str, Any]]:
    """The points grid and random search try: the grid's product, or ``num_samples`` draws (lists as
    categoricals), seeded by the first tuning seed and the pair, so a resumed sweep draws the same."""
    space = {f"{section}.{field}": v for (section, field), v in search_axes(spec.strategies[entry], spec.train).items()}
    if spec.tune.search == "grid":
        points = [{}]
        for key, values in space.items():
            points = [{**p, key: v} for p in points for v in values]
        return points
    rng = np.random.default_rng([spec.tune.seeds[0], entry, benchmark])
    domains = {k: (v.domain() if isinstance(v, Space) else tune.choice(v)) for k, v in space.items()}
    return [{k: _plain(d.sample(random_state=rng)) for k, d in domains.items()} for _ in range(spec.tune.num_samples)]


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value JSON and the Config take."""
    return value.item() if isinstance(value, np.generic) else value


def run(folder: SweepDir, meta: SweepMeta, spec: PipelineSpec, fit: Fit,
        names: Callable[[list[TrialSpec]], dict[str, str]]) -> list[tuple[SweepTrial, dict[str, float]]]:
    """Tunes every pair not tuned yet, then chooses (once) the final trials and creates their runs;
    returns them with the metrics their result.json adds (the pair's tuning cost)."""
    state = State(folder)
    exp_id = tracking.client(meta.tracking_uri).get_run(meta.parent_run_id).info.experiment_id
    for pair in pairs(spec):
        if not pair.supported or state.pair(pair_key(pair.entry, pair.index))["done"]:
            continue
        context = TuneContext(sweep_dir=str(folder.path), spec=meta.spec, entry=pair.entry, benchmark=pair.index,
                              experiment_id=exp_id, sweep_id=meta.sweep_id, parent_run_id=meta.parent_run_id,
                              tracking_uri=meta.tracking_uri, retry_seconds=tracking.retry_seconds())
        _tune_pair(state, spec, context, fit, f"{pair.grid.name} on {pair.benchmark.id}")
    failed = [(key, p["hp"]) for key, pair in state.data["pairs"].items() for p in pair["points"] if p["state"] == FAILED]
    if failed:
        unfinished = [(t, fsio.read_json(folder.trial(t.trial_key).run)["run_id"])
                      for key, hp in failed for t in tuning_trials(spec, *map(int, key.split(".")), hp)
                      if not folder.trial(t.trial_key).result.exists() and folder.trial(t.trial_key).run.exists()]
        raise TuningIncomplete(f"{len(failed)} tuning configuration(s) failed past max_failures (first: pair "
                               f"{failed[0][0]}, {failed[0][1]}); expected all to finish: `clgrid resume` reruns "
                               f"them from their checkpoints, then chooses the final configurations", unfinished)
    if state.data["final"] is None:
        state.data["final"] = _final_trials(folder, meta, spec, state, exp_id, names)
        state.save()
    return [(SweepTrial.model_validate(f["trial"]), f["metrics"]) for f in state.data["final"]]


def _tune_pair(state: State, spec: PipelineSpec, context: TuneContext, fit: Fit, label: str) -> None:
    key = pair_key(context.entry, context.benchmark)
    pair = state.pair(key)
    tune_spec, metric = spec.tune, VAL_PREFIX + spec.tune.metric
    if not pair["points"] and tune_spec.search != "optuna":
        pair["points"] = [{"hp": hp, "state": PLANNED} for hp in planned(spec, context.entry, context.benchmark)]
        state.save()
    todo = [p["hp"] for p in pair["points"] if p["state"] != ENDED]  # planned, started, failed
    settings: dict[str, Any] = {"metric": metric, "mode": "max"}
    if tune_spec.scheduler == "asha":
        max_t = len(tune_spec.seeds) * tuned_experiences(spec, context.benchmark)
        settings["scheduler"] = ASHAScheduler(time_attr=EXPERIENCE, max_t=max_t, grace_period=1,
                                                              reduction_factor=3)
    if tune_spec.search == "optuna":
        settings["search_alg"] = _optuna(spec, context, pair["points"], todo)
        settings["num_samples"] = tune_spec.num_samples - sum(p["state"] == ENDED for p in pair["points"])
        param_space: dict[str, Any] = {}
    else:
        param_space = {"hp": tune.grid_search(todo)}
    if settings.get("num_samples", 1) > 0 and (todo or tune_spec.search == "optuna"):
        fit(tune.with_parameters(trainable, ctx=context.model_dump()), param_space,
            name=f"tune-{key}", callbacks=[Recorder(state, key, label)], **settings)
    pair["done"] = not any(p["state"] == FAILED for p in pair["points"])  # else `clgrid resume` reruns them
    state.save()


def _optuna(spec: PipelineSpec, context: TuneContext, points: list[dict[str, Any]], todo: list[dict[str, Any]]):
    """OptunaSearch over the pair's space (lists as categoricals), told the scores of the points
    that ended on every tuning seed, rerunning the started ones first."""
    from ray.tune.search.optuna import OptunaSearch

    axes = search_axes(spec.strategies[context.entry], spec.train)
    space = {"hp": {f"{s}.{f}": (v.domain() if isinstance(v, Space) else tune.choice(v)) for (s, f), v in axes.items()}}
    flat = [{f"hp/{k}": v for k, v in hp.items()} for hp in todo]  # Optuna's names of the parameters: flattened
    search = OptunaSearch(space=OptunaSearch.convert_search_space(space), metric=VAL_PREFIX + spec.tune.metric,
                          mode="max", seed=spec.tune.seeds[0], points_to_evaluate=flat or None)
    for p in points:
        score = _score(SweepDir(Path(context.sweep_dir)), spec, context.entry, context.benchmark, p["hp"])
        if p["state"] == ENDED and score is not None:
            search.add_evaluated_point({f"hp/{k}": v for k, v in p["hp"].items()}, score)
    return search


def _score(folder: SweepDir, spec: PipelineSpec, entry: int, benchmark: int, hp: dict[str, Any]) -> float | None:
    """The point's mean validation metric over the tuning seeds; None unless it finished on all."""
    results = [folder.trial(t.trial_key).result for t in tuning_trials(spec, entry, benchmark, hp)]
    if not all(r.exists() for r in results):
        return None
    return statistics.fmean(fsio.read_json(r)["metrics"][VAL_PREFIX + spec.tune.metric] for r in results)


def tuning_cost(folder: SweepDir, trials: list[TrialSpec]) -> dict[str, float]:
    """The train FLOPs and device seconds of tuning trials, finished or stopped (their last report)."""
    flops = seconds = 0.0
    for t in trials:
        trial_dir = folder.trial(t.trial_key)
        if trial_dir.result.exists():
            measured = fsio.read_json(trial_dir.result)["metrics"]
        else:
            history = read_history(trial_dir)
            measured = history[max(history)]["costs"] if history else {}
        flops += measured.get("train_flops", 0.0)
        seconds += measured.get("device_seconds", 0.0)
    return {TUNING_TRAIN_FLOPS: flops, TUNING_DEVICE_SECONDS: seconds}


def _final_trials(folder: SweepDir, meta: SweepMeta, spec: PipelineSpec, state: State, exp_id: str,
                  names: Callable[[list[TrialSpec]], dict[str, str]]) -> list[dict[str, Any]]:
    """Per pair, the best point's trials on the spec's seeds, with their MLflow runs (a configuration
    two entries both chose runs once)."""
    chosen: dict[str, tuple[TrialSpec, dict[str, str], dict[str, float]]] = {}
    for pair in pairs(spec):
        if not pair.supported:
            continue
        points = [p["hp"] for p in state.pair(pair_key(pair.entry, pair.index))["points"]]
        scored = [(s, hp) for hp in points if (s := _score(folder, spec, pair.entry, pair.index, hp)) is not None]
        if not scored:
            raise RuntimeError(f"tuning {pair.grid.name} on {pair.benchmark.id}: no configuration finished on every "
                               f"tuning seed; see the tuning trials' folders in {folder.path}")
        best = max(scored, key=lambda s: s[0])[1]  # the first of equals, in the order points were tried
        tuned = [t for hp in points for t in tuning_trials(spec, pair.entry, pair.index, hp)]
        cost = tuning_cost(folder, tuned)
        selected = ",".join(fsio.read_json(folder.trial(t.trial_key).run)["run_id"]
                            for t in tuning_trials(spec, pair.entry, pair.index, best))
        for trial in _trials(spec, pair.entry, pair.index, best, spec.seeds):
            chosen.setdefault(trial.trial_key, (trial, {SELECTED_FROM: selected, TUNE_ENTRY: str(pair.entry)}, cost))
    trials = [c[0] for c in chosen.values()]
    label = names(trials)
    final = []
    for trial, tags, cost in chosen.values():
        all_tags = tracking.trial_tags(trial, meta.sweep_id, meta.parent_run_id, label[trial.trial_key], phase=FINAL)
        run_id = tracking.create_trial_run(meta.tracking_uri, exp_id, trial, all_tags | tags, cost)
        final.append({"trial": SweepTrial(trial=trial.model_dump(mode="json"), run_id=run_id,
                                          trial_key=trial.trial_key).model_dump(mode="json"), "metrics": cost})
    return final
