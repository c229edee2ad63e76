"""Dark Experience Replay (Buzzega et al. 2020, "Dark Experience for General Continual Learning").

A reservoir memory keeps every stored sample with the logits the network gave it when it was seen;
training adds alpha * MSE(current logits, stored logits) on a memory batch (DER) and, with
beta > 0, beta * cross-entropy on the stored labels of a second memory batch (DER++, the default).
"""

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from clgrid.strategies.base import Batch, Context, MemoryConfig, Strategy


class DERConfig(MemoryConfig):
    name: Literal["der"] = "der"
    alpha: float = Field(0.5, ge=0, description="weight of the logit-matching (MSE) term")
    beta: float = Field(0.5, ge=0, description="weight of the stored-label CE term; 0 gives DER, > 0 DER++")
    replay_batch_size: int | None = Field(None, ge=1,
                                          description="memory samples per term and step; default: the batch size")


class DER(Strategy):
    Config = DERConfig
    needs_boundaries = ""

    def _memory_scores(self, ctx: Context) -> tuple[Tensor, dict[str, Tensor]]:
        rows = ctx.replay.sample(self.config.replay_batch_size or ctx.batch_size, ctx.rng)
        rows = {k: v.to(ctx.device) for k, v in rows.items()}
        return ctx.mask(ctx.model(rows["x"], rows["t"]), rows["t"]), rows

    def loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor | None:
        self.logits = output.detach()  # stored with the batch after the step: the logits it was seen with
        if len(ctx.replay) == 0:
            return None
        scores, rows = self._memory_scores(ctx)
        loss = self.config.alpha * F.mse_loss(scores, rows["logits"])
        if self.config.beta > 0:
            scores, rows = self._memory_scores(ctx)
            loss = loss + self.config.beta * F.cross_entropy(scores, rows["y"])
        return loss

    def after_step(self, batch: Batch, ctx: Context) -> None:
        ctx.replay.insert({"x": batch.x, "y": batch.y, "t": batch.t, "logits": self.logits}, "reservoir", ctx.rng)
