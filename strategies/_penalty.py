"""Shared by the weight-regularization strategies (L2, EWC, SI, MAS): anchors, importances, penalty.

Each keeps anchor weights theta* and a per-weight importance Omega, and adds
strength * sum_i Omega_i (theta_i - theta*_i)^2 to the task loss; they differ in how Omega is
estimated. Not a strategy itself (the registry skips modules whose name starts with "_").
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the trainable weights, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def quadratic_penalty(model: nn.Module, anchor: dict[str, Tensor], importance: dict[str, Tensor] | None = None) -> Tensor:
    """sum_i Omega_i (theta_i - theta*_i)^2 over the anchored weights; Omega = 1 when not given."""
    params = dict(model.named_parameters())
    terms = [(params[n] - a).pow(2) for n, a in anchor.items()]
    if importance is not None:
        terms = [importance[n] * term for n, term in zip(anchor, terms)]
    return torch.stack([term.sum() for term in terms]).sum()


def per_sample_gradient_mean(model: nn.Module, sample_loss: Callable[[Tensor, Tensor, Tensor], Tensor],
                             transform: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, t: Tensor,
                             chunk: int = 128) -> dict[str, Tensor]:
    """mean over samples of transform(d sample_loss / d theta), per trainable weight.

    ``sample_loss(scores, y, t)`` sees the model's scores for one sample (a batch of one), so
    transform acts on true per-sample gradients (vmap), not on a batch gradient.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor, ti: Tensor) -> Tensor:
        return sample_loss(functional_call(model, p, (xi[None], ti[None])), yi[None], ti[None])

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))
    for start in range(0, len(y), chunk):
        s = slice(start, start + chunk)
        for n, g in per_sample(params, x[s], y[s], t[s]).items():
            total[n] += transform(g).sum(0)
    return {n: v / len(y) for n, v in total.items()}


class ImportancePenalty(Strategy):
    """SI and MAS: one importance Omega summed over the experiences, anchored at the weights after
    the latest one. A subclass gives ``strength`` and adds to ``importance`` after each experience."""

    def __init__(self, config: StrategyConfig):
        super().__init__(config)
        self.importance: dict[str, Tensor] = {}  # Omega, summed over past experiences
        self.anchor: dict[str, Tensor] = {}  # the weights after the previous experience

    @property
    def strength(self) -> float:
        raise NotImplementedError

    def loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor | None:
        if not self.anchor:
            return None
        return self.strength * quadratic_penalty(ctx.model, self.anchor, self.importance)

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self.importance, self.anchor = state["importance"], state["anchor"]
