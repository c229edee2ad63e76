"""iCaRL (Rebuffi et al. 2017, "iCaRL: Incremental Classifier and Representation Learning").

Class-IL: each batch is trained with a batch of exemplars and the old classes' outputs are distilled
from the model as it was before the experience; after each experience, herding picks the exemplars
of the new classes (the memory holds ``buffer_size`` exemplars, split evenly over the classes seen)
and predictions go to the nearest mean of exemplars (normalised features).
Distillation is temperature-scaled KL on the old classes' logits, added to the trainer's
cross-entropy (the paper's sigmoid BCE would replace that loss, which a hook cannot do).
"""

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from clgrid.strategies.base import Batch, Context, MemoryConfig, Strategy
from clgrid.strategies.episodic import regroup
from clgrid.train.costs import count_flops


class ICaRLConfig(MemoryConfig):
    name: Literal["icarl"] = "icarl"
    distill_weight: float = Field(1.0, ge=0, description="weight of the distillation term")
    temperature: float = Field(2.0, gt=0, description="distillation temperature")
    replay_batch_size: int | None = Field(None, ge=1, description="exemplars per step; default: the batch size")


def herding(features: Tensor, m: int) -> Tensor:
    """Indices of up to m rows picked greedily so that the running mean of the picks stays closest
    to the mean of all rows (the order is the exemplars' priority)."""
    target = features.mean(0)
    picked_sum = torch.zeros_like(target)
    free = torch.ones(len(features), dtype=torch.bool)
    order = []
    for k in range(1, min(m, len(features)) + 1):
        distance = (target - (picked_sum + features) / k).norm(dim=1).masked_fill(~free, float("inf"))
        i = int(distance.argmin())
        order.append(i)
        free[i] = False
        picked_sum += features[i]
    count_flops(5 * features.numel() * len(order))  # per pick: add, divide, subtract, square, sum
    return torch.tensor(order, dtype=torch.long)


class ICaRL(Strategy):
    Config = ICaRLConfig
    scenarios = ("class-il",)

    def __init__(self, config: ICaRLConfig):
        super().__init__(config)
        self.class_means: Tensor | None = None  # [classes, features]; zero rows for classes without exemplars

    def before_experience(self, ctx: Context) -> None:
        self.old_classes = sorted({c for e in ctx.seen[:-1] for c in e.classes})
        self.teacher = copy.deepcopy(ctx.model).eval().requires_grad_(False) if self.old_classes else None

    def train_batch(self, batch: Batch, ctx: Context) -> Batch:
        if len(ctx.replay) == 0:
            return batch
        rows = ctx.replay.sample(self.config.replay_batch_size or ctx.batch_size, ctx.rng)
        return batch.cat(Batch(rows["x"].to(ctx.device), rows["y"].to(ctx.device), rows["t"].to(ctx.device)))

    def loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor | None:
        if self.teacher is None:
            return None
        T = self.config.temperature
        with torch.no_grad():
            target = F.softmax(self.teacher(batch.x, batch.t)[:, self.old_classes] / T, dim=1)
        student = F.log_softmax(output[:, self.old_classes] / T, dim=1)
        return self.config.distill_weight * T * T * F.kl_div(student, target, reduction="batchmean")

    @torch.no_grad()
    def _features(self, ctx: Context, x: Tensor, chunk: int = 512) -> Tensor:
        """Normalised features in eval mode (restored after): BatchNorm by its running statistics,
        each sample's features its own, and the statistics untouched."""
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            features = [ctx.model.features(x[i:i + chunk].to(ctx.device)) for i in range(0, len(x), chunk)]
        finally:
            ctx.model.train(was_training)
        return F.normalize(torch.cat(features), dim=1)

    def after_experience(self, ctx: Context) -> None:
        per_class = ctx.replay.capacity // len(ctx.seen_classes)
        exp = ctx.experience
        features = self._features(ctx, exp.x)
        picks = []
        for c in exp.classes:
            members = (exp.y == c).nonzero().squeeze(1)
            picks.append(members[herding(features[members].cpu(), per_class)])
        pick = torch.cat(picks)
        regroup(ctx, "y", per_class, {"x": exp.x[pick], "y": exp.y[pick], "t": torch.full_like(pick, exp.index)})

        rows = ctx.replay.rows()
        features = self._features(ctx, rows["x"]).cpu()
        self.class_means = torch.zeros(ctx.stream.num_classes, features.shape[1])
        for c in rows["y"].unique().tolist():
            self.class_means[c] = F.normalize(features[rows["y"] == c].mean(0), dim=0)

    def predict(self, x: Tensor, t: Tensor, ctx: Context) -> Tensor:
        if self.class_means is None:  # nothing learned yet: the network's own scores
            return ctx.model(x, t)
        means = self.class_means.to(ctx.device)
        scores = -torch.cdist(self._features(ctx, x), means)
        return scores.masked_fill(means.norm(dim=1) == 0, float("-inf"))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.class_means is None else {"class_means": self.class_means}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self.class_means = state.get("class_means")
