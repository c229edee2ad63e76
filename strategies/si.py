"""Synaptic Intelligence (Zenke et al. 2017, "Continual Learning Through Synaptic Intelligence").

Every step adds -g_i * delta_i (task-loss gradient times the step's weight change) to a weight's
path integral omega_i; after an experience Omega_i += omega_i / (Delta_i^2 + xi), with Delta_i the
weight's total change over the experience; later training pays c * sum_i Omega_i (theta_i - theta*_i)^2.
"""

from typing import Literal

import torch
from pydantic import Field

from clgrid.strategies._penalty import ImportancePenalty, snapshot
from clgrid.strategies.base import Batch, Context, StrategyConfig


class SIConfig(StrategyConfig):
    """``c`` 1 (of 0.1, 1, 10) is chosen on the validation split: the best mean val_acc over
    split-mnist5k task-IL and permuted-mnist5k domain-IL, 2 tuning seeds, MLP 400x400, 100 iterations
    of batch 128 per experience (docs/tuning.md "Defaults", with the spec that ran it);
    an earlier release had chosen the same value on test accuracy."""

    name: Literal["si"] = "si"
    c: float = Field(1.0, ge=0, description="penalty strength")
    xi: float = Field(1e-3, gt=0, description="damping of the importance denominator")


class SI(ImportancePenalty):
    Config = SIConfig

    @property
    def strength(self) -> float:
        return self.config.c

    def before_experience(self, ctx: Context) -> None:
        self.start = snapshot(ctx.model)
        self.previous = snapshot(ctx.model)  # the weights before the coming step
        self.path = {n: torch.zeros_like(p) for n, p in self.start.items()}  # omega

    def after_backward(self, batch: Batch, ctx: Context) -> None:
        # The path integral measures the task loss's decrease: remove the penalty's own gradient,
        # 2c * Omega * (theta - theta*), from the gradient the step is about to use.
        self.task_grad = {}
        for n, p in ctx.model.named_parameters():
            if n in self.path and p.grad is not None:
                g = p.grad.detach()
                if self.anchor:
                    g = g - 2 * self.config.c * self.importance[n] * (p.detach() - self.anchor[n])
                self.task_grad[n] = g

    def after_step(self, batch: Batch, ctx: Context) -> None:
        for n, p in ctx.model.named_parameters():
            if n in self.task_grad:
                self.path[n] -= self.task_grad[n] * (p.detach() - self.previous[n])
                self.previous[n].copy_(p.detach())

    def after_experience(self, ctx: Context) -> None:
        end = snapshot(ctx.model)
        for n, omega in self.path.items():
            # Clamped: with momentum a weight can move uphill on net (omega < 0), and a negative
            # importance would make the penalty push weights away from the anchor without bound.
            contribution = (omega / ((end[n] - self.start[n]).pow(2) + self.config.xi)).clamp(min=0)
            self.importance[n] = self.importance.get(n, 0) + contribution
        self.anchor = end
