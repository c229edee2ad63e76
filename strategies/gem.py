"""Gradient Episodic Memory (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning").

Every past experience k keeps an episodic memory and gives a gradient g_k of its loss. If the
current gradient g increases any of these losses (g . g_k < 0), g is replaced by the closest
gradient that increases none, found through the dual QP: min_v 1/2 v'GG'v + g'G'v s.t. v >= margin,
then g <- G'v + g (G: the rows g_k). A positive margin pushes the update towards the old tasks.
The memory holds random samples of every experience, split evenly over the experiences seen so far.
"""

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from clgrid.strategies.base import Batch, Context, MemoryConfig, Strategy
from clgrid.strategies.episodic import flat_grad, keep_experience_share, loss_grad, set_flat_grad, trainable


class GEMConfig(MemoryConfig):
    name: Literal["gem"] = "gem"
    margin: float = Field(0.5, ge=0, description="lower bound of the dual variables (the paper's memory strength)")


def project(g: Tensor, memory_grads: Tensor, margin: float, ridge: float = 1e-3) -> Tensor:
    """The GEM update for gradient g [p] under the constraints of memory_grads [k, p]."""
    # imported here: qpsolvers and scipy.linalg cost every process that loads the strategy
    # registry (each CLI command, each Ray worker) 50 ms, and only GEM's trials use them
    from qpsolvers import solve_qp

    G = memory_grads.double()
    identity = torch.eye(len(G), dtype=G.dtype)
    P = G @ G.T
    # quadprog needs P strictly convex; a ridge relative to P's scale leaves each constraint
    # violated by at most ~ridge of its size, whatever the gradients' magnitude
    P = 0.5 * (P + P.T) + ridge * P.diagonal().mean() * identity
    q = G @ g.double()
    # qpsolvers: min 1/2 v'Pv + q'v s.t. Gv <= h; here -v <= -margin
    v = solve_qp(P.numpy(), q.numpy(), -identity.numpy(), -margin * identity.sum(1).numpy(), solver="quadprog")
    if v is None:
        raise RuntimeError("GEM: quadprog found no solution of the dual QP")
    return (G.T @ torch.from_numpy(v) + g.double()).to(g.dtype)


class GEM(Strategy):
    Config = GEMConfig

    def after_backward(self, batch: Batch, ctx: Context) -> None:
        if len(ctx.replay) == 0:
            return
        params = trainable(ctx.model)
        experiences = ctx.replay.column("t")
        memory_grads = torch.stack([loss_grad(ctx, params, ctx.replay.rows(experiences == k))
                                    for k in experiences.unique().tolist()])
        g = flat_grad(params)
        if (memory_grads @ g < 0).any():
            set_flat_grad(params, project(g.cpu(), memory_grads.cpu(), self.config.margin).to(g.device))

    def after_experience(self, ctx: Context) -> None:
        keep_experience_share(ctx)
