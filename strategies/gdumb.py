"""GDumb (Prabhu et al. 2020, "GDumb: A Simple Approach that Questions Our Progress in Continual Learning").

The stream only fills a greedy class-balanced memory (each sample offered once) and is never trained
on; before each evaluation the model is re-initialised and trained from scratch on the memory alone.
With hidden boundaries every training batch is offered (a task-free learner cannot tell a repeat).
Not for domain-IL: the balanced sampler admits nothing of a class already at its share, so once
full it never stores a sample of a later experience that repeats the labels (Avalanche issue #765).
"""

from typing import Literal

from pydantic import Field

from clgrid.strategies.base import Batch, Context, MemoryConfig, Strategy


class GDumbConfig(MemoryConfig):
    name: Literal["gdumb"] = "gdumb"
    epochs: int = Field(30, ge=1, description="passes over the memory after each experience")


class GDumb(Strategy):
    Config = GDumbConfig
    scenarios = ("class-il", "task-il")
    needs_boundaries = ""  # it trains when evaluated (before_evaluation), not at boundaries

    def __init__(self, config: GDumbConfig):
        super().__init__(config)
        self.offered = 0  # samples of this experience offered so far (given boundaries)

    def before_experience(self, ctx: Context) -> None:
        self.offered = 0

    def train_batch(self, batch: Batch, ctx: Context) -> None:
        # only the first pass over the experience: later epochs would offer the same samples again
        if ctx.boundaries == "hidden" or self.offered < len(ctx.experience.y):
            ctx.replay.insert({"x": batch.x, "y": batch.y, "t": batch.t}, "class_balanced", ctx.rng)
            self.offered += len(batch)
        return None

    def before_evaluation(self, ctx: Context) -> None:
        for module in ctx.model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        rows = ctx.replay.rows()
        ctx.fit(rows["x"], rows["y"], rows["t"], epochs=self.config.epochs)
