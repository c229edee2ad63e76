"""Shared pieces of the episodic-memory strategies (iCaRL, A-GEM, GEM).

``regroup`` keeps a memory split evenly over groups (classes or experiences) as groups arrive;
``keep_experience_share`` is A-GEM's and GEM's use of it; the flat-gradient helpers let A-GEM and GEM compare and edit the whole gradient as one vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clgrid.strategies.base import Context


def regroup(ctx: Context, column: str, keep: int, new_rows: dict[str, Tensor]) -> None:
    """Keeps the first ``keep`` stored rows of every group of ``column`` and appends ``new_rows``.

    Slot order is each group's priority order (herding order, or random), so shrinking a group
    drops its least important rows; the memory is rewritten compactly from slot 0.
    """
    memory = ctx.replay
    if len(memory):
        stored = memory.rows()
        groups = stored[column]
        kept = torch.zeros(len(groups), dtype=torch.bool)
        for g in groups.unique():
            kept[(groups == g).nonzero().squeeze(1)[:keep]] = True
        rows = {k: torch.cat([v[kept], new_rows[k].to(v.device, v.dtype)]) for k, v in stored.items()}
    else:
        rows = new_rows
    n = len(rows["y"])
    memory.write(torch.arange(n), rows)
    memory.truncate(n)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _flatten(grads: list[Tensor | None], params: list[nn.Parameter]) -> Tensor:
    """One vector; zeros where a parameter got no gradient (another task's head, say)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def flat_grad(params: list[nn.Parameter]) -> Tensor:
    """The parameters' .grad as one vector."""
    return _flatten([p.grad for p in params], params)


def set_flat_grad(params: list[nn.Parameter], flat: Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def loss_grad(ctx: Context, params: list[nn.Parameter], rows: dict[str, Tensor]) -> Tensor:
    """Flat gradient of the task loss on stored rows; leaves the parameters' .grad untouched."""
    x, y, t = (rows[k].to(ctx.device) for k in ("x", "y", "t"))
    loss = F.cross_entropy(ctx.mask(ctx.model(x, t), t), y)
    return _flatten(list(torch.autograd.grad(loss, params, allow_unused=True)), params)


def experience_sample(ctx: Context, n: int) -> dict[str, Tensor]:
    """``n`` random samples of the current experience as memory rows (in random order)."""
    exp = ctx.experience
    pick = torch.randperm(len(exp.y), generator=ctx.rng)[:n]
    return {"x": exp.x[pick], "y": exp.y[pick], "t": torch.full((len(pick),), exp.index, dtype=torch.long)}


def keep_experience_share(ctx: Context) -> None:
    """After an experience: the memory split evenly over the experiences seen, this one's share
    a random sample of it (older shares shrink to their first rows)."""
    per_experience = ctx.replay.capacity // len(ctx.seen)
    regroup(ctx, "t", per_experience, experience_sample(ctx, per_experience))
