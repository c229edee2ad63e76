"""THE continual-learning loop. It owns zero_grad/backward/step, devices, evaluation and the meters.

    fresh model -> evaluate every test and validation experience (b and b_val, for forward transfer)
    for each training experience i:
        strategy.before_experience
        for each batch: train_batch -> forward -> task loss + strategy.loss -> backward
                        -> after_backward -> optimizer.step -> after_step
                        (every `evaluate.every` batches: continual evaluation, timed apart)
        strategy.after_experience, strategy.before_evaluation
        evaluate every test experience -> row i of the accuracy matrix R
        evaluate every validation experience (if the benchmark holds a split out) -> row i of R_val
        probes the spec turns on (eval mode, own RNG, timed apart as probe_seconds)
        checkpoint (model, strategy, replay, RNG states, R; every experience starts a fresh optimizer) -> report row i

With ``boundaries: hidden`` the strategy is told nothing of i: no before/after_experience, task id 0
in every training batch, one optimizer for the whole stream (checkpointed with the rest).

A trial folder that already holds a checkpoint resumes after its experience, with every random
state restored, so an interrupted trial ends with the same accuracy matrix as an undisturbed one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from clgrid.train import checkpoint, metrics, probes
from clgrid.train.continual import ContinualEval
from clgrid.benchmarks import BenchmarkSpec, Experience, Stream, load_stream
from clgrid.train.costs import (Costs, FlopMeter, ForwardRows, Stopwatch, peak_memory_bytes, reset_peak_memory,
                                tensor_bytes)
from clgrid.train.models import MASKED, build_model, module_bytes, place_model
from clgrid.train.placement import DeviceData
from clgrid.train.precision import Precision
from clgrid.replay import TensorMemory
from clgrid.replay.arrow_store import ArrowReplayStore
from clgrid.spec import TrialSpec
from clgrid.sweep.layout import TrialDir
from clgrid.strategies import REGISTRY, Batch, Context



@dataclass
class ExperienceReport:
    """What the loop reports after each experience (and re-reports from a checkpoint on resume)."""

    experience: int
    row: list[float]
    metrics: dict[str, float]
    costs: dict[str, float]
    val_row: list[float] = field(default_factory=list)  # validation accuracies (none without a validation split)


@dataclass
class TrialResult:
    R: list[list[float]]
    b: list[float]
    metrics: dict[str, float]
    costs: dict[str, float]
    history: list[ExperienceReport] = field(default_factory=list)
    probes: dict[str, Any] = field(default_factory=dict)  # artifact name -> JSON (probes.Probes.artifacts)
    continual: dict[str, Any] | None = None  # the continual-evaluation trace (ContinualEval.trace), if on
    R_val: list[list[float]] = field(default_factory=list)  # R and b on the validation split (empty without one)
    b_val: list[float] = field(default_factory=list)


@functools.lru_cache(maxsize=8)
def _cached_stream(spec_json: str, seed: int) -> Stream:
    return load_stream(BenchmarkSpec.model_validate_json(spec_json), seed)


def trial_device(trial: TrialSpec) -> torch.device:
    return torch.device("cuda" if trial.resources.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")


class Trainer:
    """Runs one trial. ``instrument=False`` turns off FLOP counting and checkpoints (for benchmarks)."""

    def __init__(self, trial: TrialSpec, trial_dir: Path, *, device: torch.device | None = None,
                 instrument: bool = True, on_experience: Callable[[ExperienceReport], None] | None = None):
        self.trial, self.trial_dir = trial, Path(trial_dir)
        self.device = device or trial_device(trial)
        self.instrument = instrument
        self.on_experience = on_experience or (lambda report: None)
        torch.set_num_threads(max(1, int(trial.resources.cpus_per_trial)))  # one trial = its CPUs, no more
        torch.use_deterministic_algorithms(self.device.type == "cpu", warn_only=True)
        torch.manual_seed(trial.seed)
        self.stream = _cached_stream(trial.benchmark.model_dump_json(), trial.seed)
        self.strategy = REGISTRY[trial.strategy.name](trial.strategy)
        model = place_model(build_model(trial.model, self.stream.input_shape, self.stream.num_classes,
                                        self.stream.task_classes, self.stream.scenario), trial.model, self.device)
        self.data = DeviceData(self.device, self.stream, trial.resources.device_data_share,
                               trial.resources.gpus_per_trial)
        self.amp = Precision(trial.train.precision, self.device)
        self.shuffle = torch.Generator().manual_seed(trial.seed)
        self.task_mask = self._task_mask() if self.stream.scenario == "task-il" else None
        self.flops = FlopMeter(enabled=instrument)
        self.clock = Stopwatch(self.device)
        self.continual_clock = Stopwatch(self.device)  # eval_seconds
        self.samples_seen = 0
        self.stream_steps = 0  # training batches drawn over the stream: the step of continual evaluation
        self.learning = 0  # the experience being trained: the trainer knows it also with hidden boundaries
        self.hidden = trial.benchmark.boundaries == "hidden"
        self.earlier_peak = 0  # peak memory of the attempts before a resume
        self.optimizer: torch.optim.Optimizer | None = None
        # the probe subsets draw from their own generator: seed + 2 (the strategy's is seed + 1)
        self.probes = probes.Probes(trial.probes, self.stream.train, self.stream.test, trial.seed + 2) \
            if trial.probes.enabled else None
        # the continual-evaluation subsets draw from theirs: seed + 3
        self.continual = ContinualEval(trial.evaluate, self.stream.test, trial.seed + 3) if trial.evaluate else None
        self.ctx = Context(
            model=model, device=self.device, stream=self.stream, replay=self._memory(),
            rng=torch.Generator().manual_seed(trial.seed + 1), batch_size=trial.train.batch_size,
            epochs=trial.train.steps["epochs"], iterations=trial.train.steps["iterations"], lr=trial.train.lr,
            mask=self.masked,
            reset_optimizer=self.reset_optimizer, fit=self.fit, boundaries=trial.benchmark.boundaries,
        )

    def _memory(self):
        capacity = self.strategy.memory_size
        if self.trial.storage.replay == "arrow" and capacity > 0 and self.instrument:
            # manifest=0: a fresh start never inherits an earlier attempt's samples; resume reopens
            # the checkpoint's manifest through load_state_dict
            return ArrowReplayStore(TrialDir(self.trial_dir).replay, capacity, manifest=0)
        return TensorMemory(capacity)

    def _task_mask(self) -> Tensor:
        mask = torch.zeros(len(self.stream.train), self.stream.num_classes, dtype=torch.bool)
        for i, classes in enumerate(self.stream.task_classes):
            mask[i, list(classes)] = True
        return mask.to(self.device)

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> TrialResult:
        ctx, strategy = self.ctx, self.strategy
        reset_peak_memory(self.device)
        state = checkpoint.latest(self.trial_dir) if self.instrument else None
        if state is None:
            R, R_val, history = [], [], []
            b = self.evaluate()  # the fresh model, for forward transfer
            b_val = self.evaluate(self.stream.val)
            start = 0
        else:
            R, b, history, start = self._restore(state)
            R_val, b_val = state.get("R_val", []), state.get("b_val", [])  # older checkpoints: no split
            for report in history:  # re-report: the tracker skips what it already has
                self.on_experience(report)

        for exp in self.stream.train[start:]:
            told = not self.hidden  # hidden boundaries: nothing of the experience reaches the strategy
            ctx.experience, ctx.seen = (exp, self.stream.train[: exp.index + 1]) if told else (None, [])
            self.learning = exp.index
            if self.continual:
                self.continual.boundary(exp.index, self.stream_steps)
            with self.clock.timing():
                if told or self.optimizer is None:
                    self.reset_optimizer(strategy.optimizer_params(ctx))
                if told:
                    with self.flops.counting():
                        strategy.before_experience(ctx)
                self._train(exp.x, exp.y, self._task_ids(exp), self.steps,
                            loss_fn=None, hooks=True)
                if told:
                    with self.flops.counting():
                        strategy.after_experience(ctx)
                with self.flops.counting():
                    strategy.before_evaluation(ctx)
            ctx.experience, ctx.seen = exp, self.stream.train[: exp.index + 1]  # evaluation and probes read them
            if self.continual:
                self._continual_point(exp.index)
            R.append(self.evaluate())
            if self.stream.val:
                R_val.append(self.evaluate(self.stream.val))
            probed = self._probe(exp.index)
            ctx.replay.commit()  # durable before it is measured (replay_bytes) and checkpointed
            report = ExperienceReport(exp.index, R[-1], metrics.partial_summary(R, b) | probed
                                      | metrics.validation(metrics.partial_summary, R_val, b_val), self.reported_costs(),
                                      val_row=R_val[-1] if R_val else [])
            history.append(report)
            if self.instrument:
                checkpoint.save(self.trial_dir, exp.index, self._state(R, b, history) | {"R_val": R_val, "b_val": b_val})
            self.on_experience(report)

        final = history[-1].metrics if self.probes else {}  # the probe metrics of the last experience
        trace = self.continual.trace() if self.continual else None
        final |= metrics.continual_summary(trace) if trace else {}
        return TrialResult(R, b, final | metrics.summary(R, b) | metrics.validation(metrics.summary, R_val, b_val),
                           self.reported_costs(), history, self.probes.artifacts() if self.probes else {}, trace,
                           R_val=R_val, b_val=b_val)

    def _counted(self, batches: Iterator[Tensor]) -> Iterator[Tensor]:
        """The stream's batches; after each one is done, the stream step advances and continual
        evaluation runs when it is due."""
        for idx in batches:
            yield idx
            self.stream_steps += 1
            if self.continual and self.continual.due(self.stream_steps):
                self._continual_point(self.learning)

    def _continual_point(self, experience: int) -> None:
        """Accuracy on the subsets of experiences 0..experience, off the train clock and FLOP meter
        (no step is open between batches) and off every training RNG."""
        with self.clock.paused(), self.continual_clock.timing():
            self.continual.record(self.stream_steps, self.evaluate(self.continual.test[: experience + 1]))

    def _probe(self, i: int) -> dict[str, float]:
        """The metrics of the probes the spec turns on, after experience i (none when all are off)."""
        if self.probes is None:
            return {}
        features, weights = probes.strategy_view(self.strategy, self.ctx, self.trial.train.eval_batch_size)
        return self.probes.after_experience(i, features, weights)

    def _train(self, x: Tensor, y: Tensor, t: Tensor, steps: dict[str, int | None], *,
               loss_fn: Callable[[Batch], Tensor] | None, hooks: bool,
               optimizer: torch.optim.Optimizer | None = None, batch_size: int | None = None,
               after_step: Callable[[Batch], None] | None = None) -> None:
        """Steps over (x, y, t); with ``hooks`` the strategy's batch hooks fire around every step.
        A step's trained samples are the rows ``ctx.model`` forwards for its loss (costs.py)."""
        ctx, strategy = self.ctx, self.strategy
        phase = self.flops.phase()
        ctx.model.train()
        forwarded = ForwardRows(ctx.model)
        x, y, t = self.data.stage(x, y, t)
        try:
            batches = self._batches(len(y), batch_size or ctx.batch_size, **steps)
            for idx in self._counted(batches) if hooks else batches:
                batch = Batch(self.data.rows(x, idx), self.data.rows(y, idx), self.data.rows(t, idx))
                with phase.step() as step:
                    if hooks:
                        batch = strategy.train_batch(batch, ctx)
                        if batch is None:
                            continue
                    opt = optimizer or self.optimizer
                    opt.zero_grad(set_to_none=True)
                    rows = forwarded.rows
                    with self.amp.autocast():
                        if loss_fn is None:
                            output = self.masked(ctx.model(batch.x, batch.t), batch.t)
                            loss = strategy.task_loss(batch, output, ctx) if hooks else None
                            if loss is None:
                                loss = F.cross_entropy(output, batch.y)
                            extra = strategy.loss(batch, output, ctx) if hooks else None
                            if extra is not None:
                                loss = loss + extra
                        else:
                            loss = loss_fn(batch)
                    step.samples = forwarded.rows - rows or len(batch)
                    self.amp.backward(loss)
                    if self.amp.unscale(opt):
                        if hooks:
                            strategy.after_backward(batch, ctx)
                        self.amp.step(opt)
                        if hooks:
                            strategy.after_step(batch, ctx)
                        if after_step is not None:
                            after_step(batch)
                    else:  # fp16 gradients overflowed: no update, no hooks, a smaller scale
                        self.amp.skip()
                self.samples_seen += step.samples
        finally:
            forwarded.close()

    def _batches(self, n: int, batch_size: int, epochs: int | None, iterations: int | None) -> Iterator[Tensor]:
        """Shuffled index batches: ``epochs`` passes, or ``iterations`` steps cycling over passes."""
        steps = 0
        for _ in range(epochs or iterations or 0):
            order = torch.randperm(n, generator=self.shuffle)
            for start in range(0, n, batch_size):
                if iterations is not None and steps == iterations:
                    return
                steps += 1
                yield order[start:start + batch_size]

    @property
    def steps(self) -> dict[str, int | None]:
        """The spec's per-experience budget."""
        return {"epochs": self.ctx.epochs, "iterations": self.ctx.iterations}

    def _task_ids(self, exp: Experience) -> Tensor:
        return torch.full((len(exp.y),), 0 if self.hidden else exp.index, dtype=torch.long)

    def masked(self, scores: Tensor, t: Tensor) -> Tensor:
        """Task-IL: scores outside each sample's task classes are masked out; else unchanged. In
        fp32 (autocast's fp16 cannot hold MASKED; losses and stored logits want fp32 anyway)."""
        if self.task_mask is None:
            return scores.float()
        return scores.float().masked_fill(~self.task_mask[t], MASKED)

    # ---- what strategies call through ctx -------------------------------------------------

    def reset_optimizer(self, params: Iterable[Any]) -> None:
        self.optimizer = self._make_optimizer(params)

    def _make_optimizer(self, params: Iterable[Any], lr: float | None = None) -> torch.optim.Optimizer:
        train = self.trial.train
        lr = lr or train.lr
        if train.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=train.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)

    def fit(self, x: Tensor, y: Tensor, t: Tensor, *, epochs: int | None = None, iterations: int | None = None,
            loss_fn: Callable[[Batch], Tensor] | None = None, params: Iterable[Any] | None = None,
            lr: float | None = None, batch_size: int | None = None,
            after_step: Callable[[Batch], None] | None = None) -> None:
        """Trains on (x, y, t) with a fresh optimizer over ``params`` (default: the model's), without
        the strategy's batch hooks. ``loss_fn(batch)`` replaces the task loss of ``ctx.model``;
        ``after_step(batch)`` fires after every optimizer step (proximal updates, frozen-weight
        restores). Default budget: the spec's epochs or iterations per experience."""
        steps = ({"epochs": epochs, "iterations": None} if epochs else {"epochs": None, "iterations": iterations}) \
            if (epochs or iterations) else self.steps
        optimizer = self._make_optimizer(params if params is not None else self.ctx.model.parameters(), lr)
        self._train(x, y, t, steps, loss_fn=loss_fn, hooks=False, optimizer=optimizer, batch_size=batch_size,
                    after_step=after_step)

    # ---- evaluation -----------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self, experiences: list[Experience] | None = None) -> list[float]:
        """Accuracy on every test experience (one row of R), or on ``experiences`` (continual
        evaluation's subsets), in large batches without autograd."""
        model, ctx = self.ctx.model, self.ctx
        was_training = model.training
        model.eval()
        row = []
        size = self.trial.train.eval_batch_size
        for exp in self.stream.test if experiences is None else experiences:
            correct = 0
            for start in range(0, len(exp.y), size):
                x = self.data.span(exp.x, start, start + size)
                y = self.data.span(exp.y, start, start + size)
                t = torch.full_like(y, exp.index)
                with self.amp.autocast():
                    scores = self.masked(self.strategy.predict(x, t, ctx), t)
                correct += int((scores.argmax(1) == y).sum())
            row.append(correct / max(len(exp.y), 1))
        model.train(was_training)
        return row

    # ---- costs and checkpoints ------------------------------------------------------------

    def peak_memory(self) -> int:
        """This trial's peak memory, over its attempts."""
        return max(self.earlier_peak, peak_memory_bytes(self.device))

    def reported_costs(self) -> dict[str, float]:
        """The meters; with probes or continual evaluation on, also ``probe_seconds`` or
        ``eval_seconds`` (never part of train_seconds)."""
        return self.costs().as_dict() | ({"probe_seconds": self.probes.seconds} if self.probes else {}) \
            | ({"eval_seconds": self.continual_clock.seconds} if self.continual else {})

    def costs(self) -> Costs:
        share = self.trial.resources.gpus_per_trial if self.device.type == "cuda" else self.trial.resources.cpus_per_trial
        return Costs(
            train_flops=self.flops.total,
            train_seconds=self.clock.seconds,
            device_seconds=self.clock.seconds * share,
            samples_seen=self.samples_seen,
            peak_memory_bytes=self.peak_memory(),
            replay_bytes=self.ctx.replay.nbytes(),
            model_bytes=module_bytes(self.ctx.model),
            strategy_state_bytes=tensor_bytes(self.strategy.state_dict()) + self.strategy.retained_data_bytes(self.ctx),
        )

    def _state(self, R: list[list[float]], b: list[float], history: list[ExperienceReport]) -> dict[str, Any]:
        """Everything the next experience depends on. The optimizer is not saved: every experience
        starts a fresh one."""
        return {
            "model": self.ctx.model.state_dict(),
            "strategy": self.strategy.state_dict(),
            "replay": self.ctx.replay.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state(), "strategy": self.ctx.rng.get_state()},
            "meters": {"flops": self.flops.total, "seconds": self.clock.seconds, "samples": self.samples_seen,
                       "peak_memory": self.peak_memory(), "stream_steps": self.stream_steps},
            "R": R, "b": b,
            "history": [vars(h) for h in history],
        } | ({"probes": self.probes.state_dict()} if self.probes else {}) \
            | ({"amp": self.amp.state_dict()} if self.amp.scaler else {}) \
            | ({"optimizer": self.optimizer.state_dict()} if self.hidden else {}) \
            | ({"continual": self.continual.trace() | {"seconds": self.continual_clock.seconds}}
               if self.continual else {})

    def _restore(self, state: dict[str, Any]) -> tuple[list, list, list, int]:
        ctx = self.ctx
        self.strategy.load_state_dict(state["strategy"], ctx)  # may rebuild ctx.model first
        ctx.model.load_state_dict(state["model"])
        ctx.replay.load_state_dict(state["replay"])
        torch.set_rng_state(state["rng"]["torch"])
        self.shuffle.set_state(state["rng"]["shuffle"])
        ctx.rng.set_state(state["rng"]["strategy"])
        self.flops.total = state["meters"]["flops"]
        self.clock.seconds = state["meters"]["seconds"]
        self.samples_seen = state["meters"]["samples"]
        self.earlier_peak = state["meters"].get("peak_memory", 0)  # an earlier attempt's (older checkpoints: 0)
        self.stream_steps = state["meters"].get("stream_steps", 0)
        if self.probes:
            self.probes.load_state_dict(state["probes"])
        self.amp.load_state_dict(state.get("amp", {}))
        if self.hidden:  # one optimizer for the whole stream
            self.reset_optimizer(self.strategy.optimizer_params(ctx))
            self.optimizer.load_state_dict(state["optimizer"])
        if self.continual:
            self.continual.load_state_dict(state["continual"])
            self.continual_clock.seconds = state["continual"]["seconds"]
        start = state["experience"] + 1
        ctx.seen = self.stream.train[:start]
        ctx.experience = self.stream.train[start - 1]
        history = [ExperienceReport(**h) for h in state["history"]]
        return state["R"], state["b"], history, start


def run_trial(trial: TrialSpec, trial_dir: Path, **kwargs: Any) -> TrialResult:
    return Trainer(trial, trial_dir, **kwargs).run()
