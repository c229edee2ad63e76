"""MIR (Aljundi et al. 2019, "Online Continual Learning with Maximally Interfered Retrieval").

Experience replay that chooses what to replay: from a random subset of the reservoir memory it
replays the samples whose loss would rise most after a virtual SGD step (learning rate: the spec's)
on the incoming batch. The virtual step runs on a functional copy of the parameters in eval mode
(no batch-norm statistics move, no dropout draws); its forward and backward passes are inside the
training step, so the FLOP meter counts them. Nothing needs an experience boundary.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from clgrid.strategies.base import Batch, Context, MemoryConfig, Strategy


class MIRConfig(MemoryConfig):
    name: Literal["mir"] = "mir"
    replay_batch_size: int | None = Field(None, ge=1, description="replayed samples per step; default: the batch size")
    candidates: int = Field(50, ge=1, description="random memory samples scored per step (the paper's subsample)")


def interference(model: nn.Module, mask, batch: Batch, candidates: dict[str, Tensor], lr: float) -> Tensor:
    """Per candidate: its loss after one virtual SGD step of ``lr`` on ``batch`` minus its loss now."""
    was_training = model.training
    model.eval()
    try:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        loss = F.cross_entropy(mask(model(batch.x, batch.t), batch.t), batch.y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        with torch.no_grad():
            stepped = {name: p if g is None else p - lr * g for (name, p), g in zip(params.items(), grads)}
            x, y, t = candidates["x"], candidates["y"], candidates["t"]
            before = F.cross_entropy(mask(model(x, t), t), y, reduction="none")
            after = F.cross_entropy(mask(functional_call(model, stepped, (x, t)), t), y, reduction="none")
    finally:
        model.train(was_training)
    return after - before


class MIR(Strategy):
    Config = MIRConfig
    needs_boundaries = ""

    def train_batch(self, batch: Batch, ctx: Context) -> Batch:
        self.n_new = len(batch)
        if len(ctx.replay) == 0:
            return batch
        rows = {k: v.to(ctx.device) for k, v in ctx.replay.sample(self.config.candidates, ctx.rng).items()}
        scores = interference(ctx.model, ctx.mask, batch, rows, ctx.lr)
        k = min(self.config.replay_batch_size or ctx.batch_size, len(scores))
        pick = scores.topk(k).indices
        return batch.cat(Batch(rows["x"][pick], rows["y"][pick], rows["t"][pick]))

    def after_step(self, batch: Batch, ctx: Context) -> None:
        new = slice(0, self.n_new)
        ctx.replay.insert({"x": batch.x[new], "y": batch.y[new], "t": batch.t[new]}, "reservoir", ctx.rng)
