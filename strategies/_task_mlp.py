"""Parts shared by the strategies that build their own task-IL MLP (progressive, hat)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from clgrid.strategies.base import Context


def spec_mlp_shape(ctx: Context, width_factor: float = 1.0) -> tuple[int, list[int]]:
    """Input features and hidden widths (x ``width_factor``) of the spec's MLP, read off the
    trainer's fresh model: the shape a strategy's own network follows."""
    linears = [m for m in ctx.model.backbone.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("this strategy needs an MLP backbone (model.name: mlp)")
    return math.prod(ctx.stream.input_shape), [max(1, round(m.out_features * width_factor)) for m in linears]


def place_task_scores(out: Tensor, scores: Tensor, t: Tensor, task: int, classes: list[int]) -> Tensor:
    """``out`` [B, all classes] with the rows of ``task``'s samples set to ``scores`` at its classes
    (``torch.where``, no data-dependent indexing, so autograd and vmap see one graph)."""
    cols = torch.tensor(classes, device=out.device)
    mine = (t == task).unsqueeze(1)
    return out.index_copy(1, cols, torch.where(mine, scores, out.index_select(1, cols)))
