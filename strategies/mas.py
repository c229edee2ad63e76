"""Memory Aware Synapses (Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not) to forget").

After each experience a weight's importance is the mean over real samples of |d ||F(x)||^2 / d theta|,
F the scores of the classes seen so far (no labels needed); it is summed over experiences and later
training pays lambda * sum_i Omega_i (theta_i - theta*_i)^2 toward the latest weights.
"""

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from clgrid.strategies._penalty import per_sample_gradient_mean, quadratic_penalty, snapshot
from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig


class MASConfig(StrategyConfig):
    name: Literal["mas"] = "mas"
    # defaults tuned on mnist5k with the quickstart settings: tests/benchmarks/measure_regularization.py
    mas_lambda: float = Field(0.1, ge=0, description="penalty strength")
    samples: int = Field(512, ge=1, description="real samples of the experience for the importance")


class MAS(Strategy):
    Config = MASConfig

    def __init__(self, config: MASConfig):
        super().__init__(config)
        self.importance: dict[str, Tensor] = {}  # Omega, summed over past experiences
        self.anchor: dict[str, Tensor] = {}  # the weights after the previous experience

    def loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor | None:
        if not self.anchor:
            return None
        return self.config.mas_lambda * quadratic_penalty(ctx.model, self.anchor, self.importance)

    def after_experience(self, ctx: Context) -> None:
        exp = ctx.experience
        pick = torch.randperm(len(exp.y), generator=ctx.rng)[: self.config.samples]
        x, y = exp.x[pick].to(ctx.device), exp.y[pick].to(ctx.device)
        t = torch.full_like(y, exp.index)
        seen = ctx.seen_classes

        def squared_norm(scores: Tensor, yi: Tensor, ti: Tensor) -> Tensor:
            # F is what has been learned: the seen classes' scores (in task-IL the mask leaves only
            # the task's scores non-constant). In class-IL the never-trained classes' large negative
            # scores would otherwise make up most of the norm, and the penalty would protect them.
            return ctx.mask(scores, ti)[:, seen].pow(2).sum()

        new = per_sample_gradient_mean(ctx.model, squared_norm, torch.abs, x, y, t)
        self.importance = {n: self.importance.get(n, 0) + v for n, v in new.items()}
        self.anchor = snapshot(ctx.model)

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self.importance, self.anchor = state["importance"], state["anchor"]
