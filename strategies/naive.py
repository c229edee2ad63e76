"""Fine-tuning: train on each experience in turn with nothing against forgetting.

The lower bound every CL table starts from. ``lr_scale`` gives "fine-tune at 1/10 the learning
rate" as one setting.
"""

from typing import Any, Iterable, Literal

from pydantic import Field

from clgrid.strategies.base import Context, Strategy, StrategyConfig


class NaiveConfig(StrategyConfig):
    name: Literal["naive"] = "naive"
    lr_scale: float = Field(1.0, gt=0, description="multiplies the spec's learning rate")


class Naive(Strategy):
    Config = NaiveConfig
    needs_boundaries = ""

    def optimizer_params(self, ctx: Context) -> Iterable[Any]:
        if self.config.lr_scale == 1.0:
            return ctx.model.parameters()
        return [{"params": list(ctx.model.parameters()), "lr": ctx.lr * self.config.lr_scale}]
