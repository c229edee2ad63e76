"""The strategy contract: a Config (the one declaration of a strategy's hyperparameters) and hooks.

The trainer (clgrid.train.trainer) owns the loop, the optimizer step, devices and cost meters. A strategy
only hooks in. Per training experience the hooks fire in this order:

    before_experience
    for every batch:  train_batch -> forward -> task_loss -> loss -> backward -> after_backward -> step -> after_step
    after_experience
    before_evaluation
    evaluation (predict, for every test experience)

With ``boundaries: hidden`` (task-free) the stream is one sequence of batches: before_experience and
after_experience never fire, every training batch's task id is 0, and one optimizer serves the
whole stream; only strategies whose ``needs_boundaries`` is empty run there.

Strategies import torch and this module only: never Ray, MLflow or pyarrow. Persistent storage of
samples goes through ``ctx.replay``; everything else a strategy keeps lives in ``state_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

if TYPE_CHECKING:  # only for type names; the platform hands these objects in through ctx
    from clgrid.benchmarks import Experience, Stream
    from clgrid.replay import ReplayMemory

SCENARIOS = ("class-il", "task-il", "domain-il")


class StrategyConfig(BaseModel):
    """Base of every strategy's Config: a ``name`` literal plus its hyperparameters.

    Each scalar hyperparameter may be given as a list in a pipeline spec: that list is a grid axis.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryConfig(StrategyConfig):
    """Base of the Config of a strategy that stores samples: ``buffer_size`` is declared here once,
    and the trainer sizes ``ctx.replay`` from it (``Strategy.memory_size``)."""

    buffer_size: int = Field(200, ge=1, description="samples the memory holds")


@dataclass
class Batch:
    """A training batch: inputs, labels and the experience (task) index of every sample.

    ``extra`` carries per-sample tensors some strategies store with samples (for example DER's logits).
    """

    x: Tensor
    y: Tensor
    t: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def cat(self, other: "Batch") -> "Batch":
        """This batch followed by ``other`` (extras kept only where both have them)."""
        keys = self.extra.keys() & other.extra.keys()
        return Batch(
            torch.cat([self.x, other.x]),
            torch.cat([self.y, other.y]),
            torch.cat([self.t, other.t]),
            {k: torch.cat([self.extra[k], other.extra[k]]) for k in keys},
        )


@dataclass
class Context:
    """What a hook may read or use. Built by the trainer once per trial.

    model:            the network being trained (a strategy that grows it assigns a new one here
                      and calls ``reset_optimizer``)
    device:           where model and batches live
    stream:           the benchmark stream (scenario, number of classes, test experiences)
    experience:       the training experience being learned (None before the first)
    seen:             the training experiences learned so far, the current one included
    replay:           this trial's replay memory; its ``capacity`` is the strategy's ``memory_size``
                      (0 unless its Config is a MemoryConfig)
    rng:              the strategy's random generator (seeded from the trial seed, checkpointed)
    batch_size, epochs, iterations, lr:  the spec's training settings
    mask:             ``mask(scores, t)``: scores as the task loss sees them (task-IL masks each
                      sample's scores to its task's classes; other scenarios pass them through)
    boundaries:       "given", or "hidden": no boundary hook fires (a memory fills per batch then)
    reset_optimizer:  ``reset_optimizer(params_or_groups)`` gives the trainer a fresh optimizer
    fit:              ``fit(x, y, t, epochs=, iterations=, loss_fn=, params=, lr=, batch_size=,
                      after_step=)`` trains with the trainer's own loop and cost meters (GDumb, joint
                      training, generator training); ``after_step(batch)`` runs after every step
    """

    model: nn.Module
    device: torch.device
    stream: "Stream"
    replay: "ReplayMemory"
    rng: torch.Generator
    batch_size: int
    epochs: int | None
    iterations: int | None
    lr: float
    mask: Callable[[Tensor, Tensor], Tensor]
    reset_optimizer: Callable[[Iterable[Any]], None]
    fit: Callable[..., None]
    experience: "Experience | None" = None
    seen: list["Experience"] = field(default_factory=list)
    boundaries: str = "given"

    @property
    def scenario(self) -> str:
        return self.stream.scenario

    @property
    def experience_index(self) -> int:
        return -1 if self.experience is None else self.experience.index

    @property
    def seen_classes(self) -> list[int]:
        return sorted({c for e in self.seen for c in e.classes})


class Strategy:
    """Base class: every hook is optional and does nothing by default.

    Subclasses set ``Config`` (a StrategyConfig with a ``name`` literal) and, when a scenario does
    not apply, ``scenarios`` (the spec refuses a strategy on a benchmark whose scenario is missing).
    A strategy that stores samples gives it a MemoryConfig: the trainer sizes ``ctx.replay``
    from ``memory_size``. A strategy that works on the MLP's hidden layers says why in
    ``needs_hidden_layers`` (the spec refuses it with the linear model, ``hidden: []``). A strategy
    that can learn without being told where experiences end sets ``needs_boundaries`` to ""; any
    other is refused with ``boundaries: hidden``, with this reason.
    """

    Config: ClassVar[type[StrategyConfig]]
    scenarios: ClassVar[tuple[str, ...]] = SCENARIOS
    needs_hidden_layers: ClassVar[str] = ""
    needs_boundaries: ClassVar[str] = "learns at them (its before_experience/after_experience hooks)"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a subclass that adds a boundary hook does not inherit "runs without boundaries": it says so itself
        super().__init_subclass__(**kwargs)
        if "needs_boundaries" not in vars(cls) and {"before_experience", "after_experience"} & vars(cls).keys():
            cls.needs_boundaries = Strategy.needs_boundaries

    def __init__(self, config: StrategyConfig):
        self.config = config

    @property
    def memory_size(self) -> int:
        """Slots of ``ctx.replay``: the Config's ``buffer_size`` if it is a MemoryConfig, else 0."""
        return self.config.buffer_size if isinstance(self.config, MemoryConfig) else 0

    def optimizer_params(self, ctx: Context) -> Iterable[Any]:
        """What the trainer's fresh optimizer trains (parameters or param groups): each experience's
        with given boundaries, the one of the whole stream with hidden ones."""
        return ctx.model.parameters()

    def before_experience(self, ctx: Context) -> None:
        """Fires once per training experience, after ``ctx.experience`` is set and a fresh optimizer
        over all model parameters is made, before the first batch."""

    def train_batch(self, batch: Batch, ctx: Context) -> Batch | None:
        """Fires for every training batch before the forward pass; returns the batch to train on
        (for example with replayed samples appended), or None to skip the step."""
        return batch

    def task_loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor | None:
        """Fires after the forward pass; a scalar replaces the task loss (cross-entropy over all
        of ``output``), None keeps it."""
        return None

    def loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor | None:
        """Fires after ``task_loss``; the returned scalar is added to the task loss."""
        return None

    def after_backward(self, batch: Batch, ctx: Context) -> None:
        """Fires after ``loss.backward()`` and before ``optimizer.step()``: gradients may be edited."""

    def after_step(self, batch: Batch, ctx: Context) -> None:
        """Fires after ``optimizer.step()`` for every trained batch."""

    def after_experience(self, ctx: Context) -> None:
        """Fires once per training experience, after its last batch and before evaluation."""

    def before_evaluation(self, ctx: Context) -> None:
        """Fires before each evaluation of the accuracy matrix (an experience's end, also with hidden
        boundaries), inside the training budget: for a learner that trains when asked to predict
        (GDumb). Continual evaluation (``evaluate:``) does not fire it."""

    def predict(self, x: Tensor, t: Tensor, ctx: Context) -> Tensor:
        """Fires at evaluation for every test batch; returns class scores [batch, num_classes]."""
        return ctx.model(x, t)

    def state_dict(self) -> dict[str, Any]:
        """Everything this strategy needs to resume after an experience: tensors, numbers, strings."""
        return {}

    def retained_data_bytes(self, ctx: Context) -> int:
        """Bytes of training samples kept outside the replay memory, read after each experience for
        ``strategy_state_bytes``: a strategy that trains on past data must pay for storing it."""
        return 0

    def probe_features(self, x: Tensor, task: int, ctx: Context) -> list[Tensor] | None:
        """The hidden layers' outputs [n, width], first to penultimate, that answer experience ``task``
        for inputs ``x``: what the representation probes read. Called only when a spec turns probes
        on, after each experience's evaluation, with the model in eval mode under
        ``torch.inference_mode``: it must change nothing and draw no random number. ``task`` may be
        an experience not trained yet (answer with what would serve it now). None, the default: the
        outputs of the model's backbone ``layers`` (an MLP's or CNN's), the same for every experience.
        A strategy that grows or masks the network overrides it with the task's column or mask."""
        return None

    def probe_weights(self, task: int, ctx: Context) -> dict[str, Tensor] | None:
        """Detached copies of the parameters that answer experience ``task``, keyed
        ``hidden.<k>.weight`` / ``hidden.<k>.bias`` (layer k as in ``probe_features``) and ``head...``,
        with entries the task does not use zeroed: what weight drift compares. Called when probes
        are on, after each experience's evaluation, for the experience just trained and the one
        before it; a task's entries must keep their shapes while later experiences train. None, the
        default: every backbone and head parameter of the model."""
        return None

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        """Restores ``state_dict()``; fires before the model's own weights are loaded, so a strategy
        that changed the architecture rebuilds ``ctx.model`` here first."""
