"""Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

Every training batch is extended with a batch drawn from a fixed-size memory of past samples;
after each step the batch's new samples are offered to the memory (reservoir or class-balanced).
"""

from typing import Literal

from pydantic import Field

from clgrid.strategies.base import Batch, Context, MemoryConfig, Strategy


class ReplayConfig(MemoryConfig):
    name: Literal["replay"] = "replay"
    replay_batch_size: int | None = Field(None, ge=1, description="replayed samples per step; default: the batch size")
    policy: Literal["reservoir", "class_balanced"] = "reservoir"


class Replay(Strategy):
    Config = ReplayConfig
    needs_boundaries = ""

    def train_batch(self, batch: Batch, ctx: Context) -> Batch:
        self.n_new = len(batch)
        if len(ctx.replay) == 0:
            return batch
        rows = ctx.replay.sample(self.config.replay_batch_size or ctx.batch_size, ctx.rng)
        return batch.cat(Batch(rows["x"].to(ctx.device), rows["y"].to(ctx.device), rows["t"].to(ctx.device)))

    def after_step(self, batch: Batch, ctx: Context) -> None:
        new = slice(0, self.n_new)
        ctx.replay.insert({"x": batch.x[new], "y": batch.y[new], "t": batch.t[new]}, self.config.policy, ctx.rng)
