"""ER-ACE (Caccia et al. 2022, "New Insights on Reducing Abrupt Representation Change in Online Continual Learning").

Experience replay with asymmetric cross-entropy: the loss on the incoming batch covers only the
classes present in that batch (the other scores are masked), so new classes do not push the old
ones' scores down; the loss on the replayed batch covers every class seen so far. The memory is a
reservoir filled from every incoming batch, and the seen classes are learned from the labels that
arrive: nothing needs an experience boundary.
"""

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from clgrid.strategies.base import Batch, Context, MemoryConfig, Strategy

MASKED = -1e9  # the score of a class a loss does not cover (finite: no NaN where a row is all masked)


class ERACEConfig(MemoryConfig):
    name: Literal["er_ace"] = "er_ace"
    replay_batch_size: int | None = Field(None, ge=1, description="replayed samples per step; default: the batch size")


def covered_cross_entropy(scores: Tensor, y: Tensor, covered: Tensor) -> Tensor:
    """Cross-entropy over the classes ``covered`` (a bool row over all classes) only."""
    return F.cross_entropy(scores.masked_fill(~covered, MASKED), y)


class ERACE(Strategy):
    Config = ERACEConfig
    needs_boundaries = ""

    def __init__(self, config: ERACEConfig):
        super().__init__(config)
        self.seen: Tensor | None = None  # bool [num_classes]: the classes any incoming batch carried

    def train_batch(self, batch: Batch, ctx: Context) -> Batch:
        if self.seen is None:
            self.seen = torch.zeros(ctx.stream.num_classes, dtype=torch.bool)
        self.seen[batch.y.cpu()] = True
        self.n_new = len(batch)
        if len(ctx.replay) == 0:
            return batch
        rows = ctx.replay.sample(self.config.replay_batch_size or ctx.batch_size, ctx.rng)
        return batch.cat(Batch(rows["x"].to(ctx.device), rows["y"].to(ctx.device), rows["t"].to(ctx.device)))

    def task_loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor:
        n, y = self.n_new, batch.y
        present = torch.zeros(output.shape[1], dtype=torch.bool, device=output.device)
        present[y[:n]] = True
        loss = covered_cross_entropy(output[:n], y[:n], present)
        if len(batch) > n:
            loss = loss + covered_cross_entropy(output[n:], y[n:], self.seen.to(output.device))
        return loss

    def after_step(self, batch: Batch, ctx: Context) -> None:
        new = slice(0, self.n_new)
        ctx.replay.insert({"x": batch.x[new], "y": batch.y[new], "t": batch.t[new]}, "reservoir", ctx.rng)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.seen is None else {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self.seen = state.get("seen")
