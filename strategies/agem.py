"""Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

After backward, the gradient g is compared with a reference gradient g_ref of the loss on a batch of
the episodic memory; if they conflict (g . g_ref < 0), g is projected onto the half-space where
the memory loss does not increase: g <- g - (g . g_ref / g_ref . g_ref) g_ref.
The memory holds random samples of every experience, split evenly over the experiences seen so far;
with hidden boundaries (task-free) it is a reservoir filled from every training batch instead.
"""

from typing import Literal

from pydantic import Field
from torch import Tensor

from clgrid.strategies.base import Batch, Context, MemoryConfig, Strategy
from clgrid.strategies.episodic import flat_grad, keep_experience_share, loss_grad, set_flat_grad, trainable


class AGEMConfig(MemoryConfig):
    name: Literal["agem"] = "agem"
    reference_batch_size: int = Field(256, ge=1, description="memory samples behind each reference gradient")


def project(g: Tensor, g_ref: Tensor) -> Tensor:
    """g itself if it agrees with g_ref, else its projection onto the plane orthogonal to g_ref."""
    dot = g @ g_ref
    if dot >= 0:
        return g
    return g - dot / (g_ref @ g_ref) * g_ref


class AGEM(Strategy):
    Config = AGEMConfig
    needs_boundaries = ""  # with hidden boundaries its memory is a reservoir (after_step)

    def after_backward(self, batch: Batch, ctx: Context) -> None:
        if len(ctx.replay) == 0:
            return
        params = trainable(ctx.model)
        g_ref = loss_grad(ctx, params, ctx.replay.sample(self.config.reference_batch_size, ctx.rng))
        set_flat_grad(params, project(flat_grad(params), g_ref))

    def after_step(self, batch: Batch, ctx: Context) -> None:
        if ctx.boundaries == "hidden":
            ctx.replay.insert({"x": batch.x, "y": batch.y, "t": batch.t}, "reservoir", ctx.rng)

    def after_experience(self, ctx: Context) -> None:
        keep_experience_share(ctx)
