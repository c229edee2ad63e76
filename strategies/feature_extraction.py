"""Feature extraction: learn the backbone on the first experience(s), then freeze it and train only
the head(s) (the "frozen pre-trained features" baseline, e.g. Razavian et al. 2014; in CL, the
lower-plasticity end of the stability-plasticity trade-off).

Task-IL only: with one head per task (or the shared head masked to each task's classes) a task's
head sees no gradient from other tasks, so nothing is forgotten once the backbone is frozen. In
class- or domain-IL the shared head would still be overwritten by every new experience.
"""

from typing import Literal

from pydantic import Field

from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig


class FeatureExtractionConfig(StrategyConfig):
    name: Literal["feature_extraction"] = "feature_extraction"
    frozen_from: int = Field(1, ge=1, description="first experience trained with the backbone frozen")


class FeatureExtraction(Strategy):
    Config = FeatureExtractionConfig
    scenarios = ("task-il",)

    def frozen(self, ctx: Context) -> bool:
        return ctx.experience_index >= self.config.frozen_from

    def before_experience(self, ctx: Context) -> None:
        if self.frozen(ctx):
            ctx.model.backbone.requires_grad_(False)
            ctx.reset_optimizer([p for p in ctx.model.parameters() if p.requires_grad])

    def train_batch(self, batch: Batch, ctx: Context) -> Batch:
        if self.frozen(ctx):  # the trainer sets train mode; batch-norm statistics must not move either
            ctx.model.backbone.eval()
        return batch
