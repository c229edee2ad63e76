"""One Ray Tune trial, in a Ray worker: a pack of trials (clgrid.sweep.packs), each trained (or
resumed) in its folder, every experience logged to the MLflow run the driver created for it.

A trial with ``result.json`` finished in an earlier attempt or an earlier run of the sweep: it
reports that result at once. Otherwise the trainer continues from the folder's last checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ray
from pydantic import BaseModel
from ray import tune

from clgrid import fsio, tracking
from clgrid.sweep.layout import SweepDir, SweepTrial, TrialDir
from clgrid.sweep.lease import TrialWriter
from clgrid.sweep.packs import FINISHED, KEYS
from clgrid.sweep.trial_logger import TrialLogger

if TYPE_CHECKING:
    from mlflow.entities import Dataset

    from clgrid.spec import TrialSpec

FAULT_ENV = "CLGRID_FAULT_ONCE"  # test hook: see _inject_fault
# A pack tells Ray Tune (the driver's progress lines, the pack sizes) what its trials did at most
# this often, and at its end: each report is a round trip to the driver, which a trial of many short
# experiences would otherwise wait on after every one of them.
REPORT_SECONDS = 1.0


class TrialConfig(BaseModel):
    """What the driver hands one trial (its Ray Tune config): JSON, validated in the worker."""

    trial: SweepTrial
    sweep_dir: str
    tracking_uri: str
    retry_seconds: float  # the driver's setting, also on cluster nodes
    extra_metrics: dict[str, float] = {}  # written into result.json beside the trainer's (a final trial's tuning cost)

    @property
    def folder(self) -> TrialDir:
        return SweepDir(Path(self.sweep_dir)).trial(self.trial.trial_key)


def trainable(pack: dict[str, Any], configs: dict[str, dict[str, Any]]) -> None:
    """The Ray Tune trainable: ``pack["keys"]`` are trial keys of ``configs`` (the sweep's
    TrialConfigs, which tune.with_parameters puts in Ray's object store once), run one after the
    other (clgrid.sweep.packs). A trial that fails does not stop the pack: the others run, then the
    pack fails, and Ray Tune's retry of it finds the finished ones' results on disk. One attempt at
    a time writes a trial's folder: an attempt Ray retries waits for the one before to stop
    (clgrid.sweep.lease)."""
    progress, failed, first_error = _Progress(), [], None
    for key in pack[KEYS]:
        start = time.monotonic()
        try:
            result = attempt(TrialConfig.model_validate(configs[key]), lambda m, key=key: progress.experience(key, m))
        except Exception as exc:
            failed.append(key)
            first_error = first_error or exc
            continue
        progress.finished(key, time.monotonic() - start, result["metrics"].get("acc"))
    progress.send()
    if failed:
        raise RuntimeError(f"trials {failed} of this pack failed; the first error is chained below") from first_error


class _Progress:
    """What a pack tells Ray Tune: its latest experience (trial key, experience, acc) and the trials
    finished since the last report ([key, seconds, acc] each), at most every REPORT_SECONDS and at
    the pack's end. Only these few numbers: Ray Tune keeps running statistics of every number
    reported and writes them into its experiment state; results are read from the trial folders."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self.done: list[list[Any]] = []
        self.sent = time.monotonic()

    def experience(self, key: str, metrics: dict[str, Any]) -> None:
        if "experience" in metrics:  # a trial finished earlier reports only its final metrics
            self.latest = {"trial": key, "experience": metrics["experience"], "acc": metrics["acc"]}
            self._due()

    def finished(self, key: str, seconds: float, acc: float | None) -> None:
        self.done.append([key, round(seconds, 4), acc])
        self.latest = {}
        self._due()

    def _due(self) -> None:
        if time.monotonic() - self.sent >= REPORT_SECONDS:
            self.send()

    def send(self) -> None:
        if self.latest or self.done:
            tune.report({**self.latest, FINISHED: self.done})
        self.latest, self.done, self.sent = {}, [], time.monotonic()


def attempt(config: TrialConfig, report: Callable[[dict[str, Any]], None], experiences: int | None = None) -> dict:
    """One attempt at a trial: ``report`` gets what each experience measured (the pack's progress,
    or the tuning phase's filter for Ray Tune); ``experiences`` stops after that many (tuning on the
    first experiences). Returns the trial's result.json."""
    with TrialWriter(config.folder):
        return _attempt(config, report, experiences)


class _Enough(Exception):
    """Raised after the last experience a trial trains (``experiences``): the trainer stops there."""

    def __init__(self, report: Any):
        self.report = report


def _attempt(config: TrialConfig, report: Callable[[dict[str, Any]], None], experiences: int | None) -> dict:
    from clgrid.benchmarks.scenarios import class_order
    from clgrid.train import checkpoint, trainer

    trial, folder = config.trial.trial_spec(), config.folder
    log = TrialLogger(config.tracking_uri, config.trial.run_id, folder, config.retry_seconds)
    if folder.result.exists():
        log.finished_earlier()
        result = fsio.read_json(folder.result)
        report(result["metrics"])
        return result
    first = not folder.attempts.exists()  # a first attempt finds its run as the driver created it
    log.start(first)

    def on_experience(done: trainer.ExperienceReport) -> None:
        log.experience(**vars(done))  # history.json, then MLflow (or the outbox)
        report({"experience": done.experience, **done.metrics, **done.costs})
        _inject_fault(config.trial.trial_key, done.experience, log.flush)
        if experiences is not None and done.experience + 1 >= experiences:
            raise _Enough(done)

    def run() -> trainer.TrialResult:
        try:
            return trainer.run_trial(trial, folder.path, on_experience=on_experience)
        except _Enough as enough:  # the rows so far are in the checkpoint of its last experience
            state = checkpoint.latest(folder.path)
            return trainer.TrialResult(state["R"], state["b"], enough.report.metrics, enough.report.costs,
                                       R_val=state.get("R_val", []), b_val=state.get("b_val", []))

    _mark_attempt(folder)
    try:
        log.dataset(benchmark_dataset(trial), first)  # unreadable data fails the trial here, as in the trainer
        result = run()
    except BaseException:
        log.end("FAILED")
        raise
    log.flush()
    log.matrix(result.R, result.b, result.R_val, result.b_val)
    log.probes(result.probes)
    log.continual(result.continual)
    written = {"metrics": {**result.metrics, **result.costs, **config.extra_metrics}, "R": result.R, "b": result.b,
               "R_val": result.R_val, "b_val": result.b_val, "class_order": class_order(trial.benchmark, trial.seed)} \
        | ({"continual": result.continual} if result.continual else {})
    fsio.write_json(folder.result, written)
    log.end("FINISHED")
    return written


def benchmark_dataset(trial: TrialSpec) -> Dataset:
    """The trial's benchmark as an MLflow dataset: its digest covers the identity of every sample in
    every experience (the source's labels, which of its samples each experience holds for training,
    for validation and for test, and how a domain-IL experience transforms them), so two trials share
    a dataset exactly when they see the same stream. Reads the source (cached for the trainer), not
    the stream: no transformed copies."""
    import torch
    from mlflow.types.schema import Schema, TensorSpec

    from clgrid.benchmarks import KEYS
    from clgrid.benchmarks.scenarios import class_groups, validation_mask
    from clgrid.benchmarks.sources import load_source

    b = trial.benchmark
    train_x, train_y, test_x, test_y = load_source(b.source, b.data_root, b.download)
    held = validation_mask(b, trial.seed, train_y) if b.validation else torch.zeros(len(train_y), dtype=torch.bool)
    layout: dict[str, Any] = {"scenario": b.scenario, "experiences": []}
    digest = hashlib.sha256(b.model_dump_json(exclude={"data_root", "download"}, context=KEYS).encode())
    if b.splits_classes:
        for group in class_groups(b, trial.seed):
            in_train, in_test = [(y.unsqueeze(1) == y.new_tensor(group)).any(1) for y in (train_y, test_y)]
            picked = {"train": (train_y, in_train & ~held), "test": (test_y, in_test)} \
                | ({"val": (train_y, in_train & held)} if b.validation else {})
            layout["experiences"].append({"classes": list(group)} | {k: int(m.sum()) for k, (_, m) in picked.items()})
            for y, mask in picked.values():
                digest.update(y[mask].numpy().tobytes() + mask.nonzero().numpy().tobytes())
    else:
        layout["domain"] = b.domain
        layout["experiences"] = [{"train": int((~held).sum()), "test": len(test_y)}
                                 | ({"val": int(held.sum())} if b.validation else {})] * b.experiences
        for y in (train_y, test_y):
            digest.update(y.numpy().tobytes())
        if b.validation:
            digest.update(held.nonzero().numpy().tobytes())
        digest.update(str(b.permutation_seed if b.permutation_seed is not None else trial.seed).encode())
    schema = Schema([TensorSpec(train_x.numpy().dtype, (-1, *train_x.shape[1:]), "image"),
                     TensorSpec(train_y.numpy().dtype, (-1,), "label")])
    source = {"source": b.source} if b.source in ("digits", "mnist5k") else {"source": b.source, "data_root": b.data_root}
    return tracking.benchmark_dataset(b.id, digest.hexdigest()[:12], source, schema.to_json(), layout)


def _mark_attempt(folder: TrialDir) -> None:
    """Counts trainer starts per trial, with the process and Ray node running each (tests use it to
    prove finished trials are not rerun, and to find the worker to kill)."""
    folder.path.mkdir(parents=True, exist_ok=True)
    with open(folder.attempts, "a") as f:
        f.write(f"{time.time():.3f} pid={os.getpid()} node={ray.get_runtime_context().get_node_id()}\n")


def _inject_fault(trial_key: str, experience: int, flush: Callable[[], None]) -> None:
    """Test hook, inert unless ``CLGRID_FAULT_ONCE=<dir>`` is set: a file ``<dir>/<trial_key>.<experience>``
    holding ``raise`` or ``hang`` makes the trial, once that experience is checkpointed and logged
    (``flush``: uploaded, or listed in the outbox), raise, or write its pid to ``<file>.pid`` and
    sleep until killed. The file is taken (renamed) first, so each fault fires once; retries and
    resumed sweeps then run undisturbed."""
    folder = os.environ.get(FAULT_ENV)
    if not folder:
        return
    order = Path(folder) / f"{trial_key}.{experience}"
    taken = order.with_name(order.name + ".taken")
    try:
        os.rename(order, taken)
    except FileNotFoundError:
        return
    flush()
    if taken.read_text().strip() == "raise":
        raise RuntimeError(f"injected fault ({FAULT_ENV}) after experience {experience}")
    fsio.atomic_write(order.with_name(order.name + ".pid"), str(os.getpid()).encode())
    time.sleep(600)
    raise RuntimeError(f"injected hang ({FAULT_ENV}) was not killed")
