"""L2 regularization toward the previous weights (the baseline of Kirkpatrick et al. 2017; Hsu et al. 2018).

After each experience the weights are kept as an anchor; later training pays
lambda/2 * ||theta - theta*||^2: EWC with every weight equally important.
"""

from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from clgrid.strategies._penalty import quadratic_penalty, snapshot
from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig


class L2Config(StrategyConfig):
    """``l2_lambda`` 0.01 (of 0.01, 0.1, 1) is chosen on the validation split: the best mean val_acc over
    split-mnist5k task-IL and permuted-mnist5k domain-IL, 2 tuning seeds, MLP 400x400, 100 iterations
    of batch 128 per experience (docs/tuning.md "Defaults", with the spec that ran it);
    it replaced 0.1, chosen on test accuracy in an earlier release."""

    name: Literal["l2"] = "l2"
    l2_lambda: float = Field(0.01, ge=0, description="penalty strength")


class L2(Strategy):
    Config = L2Config

    def __init__(self, config: L2Config):
        super().__init__(config)
        self.anchor: dict[str, Tensor] = {}  # the weights after the previous experience

    def loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor | None:
        if not self.anchor:
            return None
        return 0.5 * self.config.l2_lambda * quadratic_penalty(ctx.model, self.anchor)

    def after_experience(self, ctx: Context) -> None:
        self.anchor = snapshot(ctx.model)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self.anchor = state["anchor"]
