"""Continual evaluation (``evaluate: {every, subset}``): accuracy between the boundaries too.

Every ``every`` stream steps (training batches drawn, whether or not the strategy trained on one)
and at every experience's end, the trainer measures the accuracy on a fixed seeded subset of each
test experience seen so far. It runs in eval mode under ``torch.inference_mode``, draws no random
number of training's, and its time is kept apart (``eval_seconds``): a run's accuracy matrix, costs
aside, is the same with it as without. The trace is checkpointed with the trial, so a resumed trial
continues it. Summary metrics of the trace: clgrid.train.metrics.continual_summary.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from clgrid.benchmarks import Experience


class EvaluateSpec(BaseModel):
    """Continual evaluation: off unless the spec has an ``evaluate:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(ge=1, description="stream steps (training batches) between evaluations")
    subset: int = Field(200, ge=1, description="test samples per experience, a fixed seeded subset")


class ContinualEval:
    """The subsets and the trace: ``steps``, ``acc`` (per seen experience) and ``boundaries``
    (the step at which experience i starts), as written to result.json under "continual"."""

    def __init__(self, spec: EvaluateSpec, test: list[Experience], seed: int):
        self.every = spec.every
        generator = torch.Generator().manual_seed(seed)  # its own stream: training's RNGs are untouched
        picks = [torch.randperm(len(e.y), generator=generator)[: spec.subset].sort().values for e in test]
        self.test = [Experience(e.index, e.x[p], e.y[p], e.classes) for e, p in zip(test, picks)]
        self.steps: list[int] = []
        self.acc: list[list[float]] = []
        self.boundaries: list[int] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def boundary(self, experience: int, step: int) -> None:
        """Experience ``experience`` starts at ``step`` (kept once: a resumed trial says it again)."""
        del self.boundaries[experience:]
        self.boundaries.append(step)

    def record(self, step: int, row: list[float]) -> None:
        """A point; the experience's end point replaces a periodic one at the same step."""
        if self.steps and self.steps[-1] == step:
            self.steps.pop()
            self.acc.pop()
        self.steps.append(step)
        self.acc.append(row)

    def trace(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "acc": [list(r) for r in self.acc], "boundaries": list(self.boundaries)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a ``trace()``."""
        self.steps, self.acc, self.boundaries = list(state["steps"]), [list(r) for r in state["acc"]], list(state["boundaries"])
