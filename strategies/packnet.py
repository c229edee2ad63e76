"""PackNet (Mallya & Lazebnik 2018, "PackNet: Adding Multiple Tasks to a Single Network by Iterative
Pruning"), task-IL.

After each experience, ``prune_ratio`` of the backbone weights it trained (the free ones) are released
by magnitude and zeroed, the kept ones are retrained briefly and then owned by that task for good.
Task t is evaluated with the weights owned by tasks <= t. Backbone biases are fixed after the first
experience (as in the paper); heads are per task (multi-head, or the shared head masked per task).
"""

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig

FREE = -1  # owner of a weight no task has kept (zero outside the experience being trained)


class PackNetConfig(StrategyConfig):
    name: Literal["packnet"] = "packnet"
    prune_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of an experience's free weights released after it")
    retrain_epochs: int = Field(1, ge=0, description="epochs retraining the kept weights after pruning")


class PackNet(Strategy):
    Config = PackNetConfig
    scenarios = ("task-il",)

    def __init__(self, config: PackNetConfig):
        super().__init__(config)
        self.owner: dict[str, Tensor] = {}  # backbone weight name -> int8 task index per entry, FREE if none
        self.trainable: dict[str, Tensor] = {}  # what the current steps may change ...
        self.fixed: dict[str, Tensor] = {}  # ... and the values of everything else

    def prunable(self, model: nn.Module) -> dict[str, Tensor]:
        return {f"backbone.{n}": p for n, p in model.backbone.named_parameters() if p.dim() > 1}

    def before_experience(self, ctx: Context) -> None:
        if not self.owner:
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ctx.model.modules()):
                raise ValueError("packnet: batch-norm models are not supported (all tasks would share its statistics)")
            self.owner = {n: torch.full_like(p, FREE, dtype=torch.int8) for n, p in self.prunable(ctx.model).items()}
        if ctx.experience_index > 0:
            for p in ctx.model.backbone.parameters():
                p.requires_grad_(p.dim() > 1)
            ctx.reset_optimizer([p for p in ctx.model.parameters() if p.requires_grad])
        self.hold(ctx, {n: o == FREE for n, o in self.owner.items()})

    def hold(self, ctx: Context, trainable: dict[str, Tensor]) -> None:
        """From now on, steps may change only ``trainable`` entries of the backbone weights."""
        self.trainable = trainable
        self.fixed = {n: p.detach().clone() for n, p in self.prunable(ctx.model).items()}

    def after_step(self, batch: Batch, ctx: Context) -> None:
        with torch.no_grad():  # undo whatever the optimizer did to the weights held fixed
            for n, p in self.prunable(ctx.model).items():
                p.copy_(torch.where(self.trainable[n], p, self.fixed[n]))

    def after_experience(self, ctx: Context) -> None:
        keep = {}
        with torch.no_grad():
            for n, p in self.prunable(ctx.model).items():
                free = self.owner[n] == FREE
                n_keep = round(int(free.sum()) * (1 - self.config.prune_ratio))
                magnitude = torch.where(free, p.abs(), -1.0).flatten()  # owned weights are never picked
                kept = torch.zeros_like(free).flatten()
                kept[magnitude.topk(n_keep).indices] = True
                keep[n] = kept.view_as(free)
                p.masked_fill_(free & ~keep[n], 0.0)
        if self.config.retrain_epochs:  # the kept weights (and the heads) adapt to the pruning
            self.hold(ctx, keep)
            exp = ctx.experience
            ctx.fit(exp.x, exp.y, torch.full_like(exp.y, exp.index), epochs=self.config.retrain_epochs,
                    params=[p for p in ctx.model.parameters() if p.requires_grad],
                    after_step=lambda batch: self.after_step(batch, ctx))
        for n, kept in keep.items():
            self.owner[n][kept] = ctx.experience_index

    def predict(self, x: Tensor, t: Tensor, ctx: Context) -> Tensor:
        if not self.owner:  # the fresh model, before any experience
            return ctx.model(x, t)
        out = None
        for task in t.unique().tolist():  # evaluation batches hold one task: one pass
            used = {n: p * ((self.owner[n] != FREE) & (self.owner[n] <= task)) for n, p in self.prunable(ctx.model).items()}
            scores = functional_call(ctx.model, used, (x, t))
            out = scores if out is None else torch.where((t == task).unsqueeze(1), scores, out)
        return out

    def _serving(self, task: int, ctx: Context) -> dict[str, Tensor]:
        """The backbone weights as experience ``task`` sees them: those owned by tasks <= task."""
        return {n: p * ((self.owner[n] != FREE) & (self.owner[n] <= task)) for n, p in self.prunable(ctx.model).items()}

    def probe_features(self, x: Tensor, task: int, ctx: Context) -> list[Tensor] | None:
        """Each experience is probed through its own mask (the weights owned by it and earlier
        tasks): the outputs of each block of the backbone's ``layers`` (an MLP's Linear+ReLU, a
        CNN's Conv+ReLU+MaxPool, the last one after the pooling), as for an unmasked model."""
        if not self.owner:
            return None
        backbone = ctx.model.backbone
        layers = list(backbone.layers)
        starts = [k for k, m in enumerate(layers) if isinstance(m, (nn.Linear, nn.Conv2d))]
        ends = [layers[k - 1] for k in starts[1:]] + [layers[-1]]
        hidden: list[Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, out: hidden.append(
            out.mean(dim=(2, 3)) if out.dim() == 4 else out.flatten(1))) for m in ends]
        try:
            prefix = len("backbone.")
            functional_call(backbone, {n[prefix:]: p for n, p in self._serving(task, ctx).items()}, (x,))
        finally:
            for h in handles:
                h.remove()
        return hidden

    def probe_weights(self, task: int, ctx: Context) -> dict[str, Tensor] | None:
        """The backbone weights ``task`` owns or inherits (biases are fixed after the first
        experience) and its head (a task's own with one head per task), keyed hidden.<k> in the
        order of the layers."""
        if not self.owner:
            return None
        serving = self._serving(task, ctx)
        weights: dict[str, Tensor] = {}
        for k, (name, w) in enumerate(serving.items()):
            bias = ctx.model.get_parameter(name.removesuffix("weight") + "bias")
            weights |= {f"hidden.{k}.weight": w, f"hidden.{k}.bias": bias}
        head = ctx.model.head.heads[task] if hasattr(ctx.model.head, "heads") else ctx.model.head
        return weights | {f"head.{n}": p for n, p in head.named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        return {"owner": self.owner}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self.owner = {n: o.to(ctx.device) for n, o in state["owner"].items()}
