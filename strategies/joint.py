"""Joint training on everything seen so far: the upper bound of a CL table.

After each experience the model trains on the union of all training experiences seen so far:
``cumulative`` continues from the current weights, ``offline`` re-initialises the model first
(offline training on the data available at that point). The stream's own batches are not trained.
"""

from typing import Literal

import torch
from pydantic import Field

from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig


class JointConfig(StrategyConfig):
    name: Literal["joint"] = "joint"
    mode: Literal["cumulative", "offline"] = Field("cumulative", description="continue, or retrain from scratch")


class Joint(Strategy):
    Config = JointConfig

    def retained_data_bytes(self, ctx: Context) -> int:
        return sum(e.x.nbytes + e.y.nbytes for e in ctx.seen)  # it keeps every experience seen

    def train_batch(self, batch: Batch, ctx: Context) -> None:
        return None  # trained on the union in after_experience

    def after_experience(self, ctx: Context) -> None:
        if self.config.mode == "offline":
            for module in ctx.model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        x = torch.cat([e.x for e in ctx.seen])
        y = torch.cat([e.y for e in ctx.seen])
        t = torch.cat([torch.full((len(e.y),), e.index, dtype=torch.long) for e in ctx.seen])
        ctx.fit(x, y, t)
