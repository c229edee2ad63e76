"""Benchmarks: a data source split into a stream of experiences by a scenario.

``load_stream(spec, seed)`` is the one entry point the trainer uses. Sources give raw train/test
tensors; scenarios cut them into experiences. Every split is a pure function of the spec and seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from clgrid.benchmarks.sources import NUM_CLASSES

SOURCES = tuple(NUM_CLASSES)


class BenchmarkSpec(BaseModel):
    """One benchmark of a pipeline: a source, a scenario and how to cut the stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["digits", "mnist5k", "mnist", "fashion-mnist", "cifar10", "cifar100"]
    scenario: Literal["class-il", "task-il", "domain-il"]
    experiences: int = Field(5, ge=1, le=1000)
    class_order: list[int] | None = Field(None, description="explicit class order for split streams")
    shuffle_classes: bool = Field(False, description="shuffle the class order with the trial seed")
    domain: Literal["permuted", "rotated", "split"] = Field(
        "permuted", description="domain-il only: pixel permutations, rotations, or split digits with shared labels"
    )
    permutation_seed: int | None = Field(None, description="permuted stream: seed of the pixel permutations; default: the trial seed")
    max_rotation: float = Field(180.0, gt=0, le=360, description="rotated stream: degrees of the last experience")
    data_root: str = Field("~/.cache/clgrid/data", description="folder of the torchvision sources")
    download: bool = Field(False, description="allow torchvision sources to download into data_root")

    @property
    def id(self) -> str:
        """The benchmark name used in tags and reports, e.g. 'split-mnist5k' or 'permuted-mnist5k'."""
        kind = self.domain if self.scenario == "domain-il" else "split"
        return f"{kind}-{self.source}"

    @property
    def splits_classes(self) -> bool:
        """Whether experiences are groups of classes (class-IL, task-IL, split domain-IL)."""
        return self.scenario != "domain-il" or self.domain == "split"

    @model_validator(mode="after")
    def _check_class_split(self) -> BenchmarkSpec:
        if not self.splits_classes:
            if self.class_order is not None or self.shuffle_classes:
                raise ValueError(f"class_order and shuffle_classes apply to split streams, not to {self.domain} domain-il")
            return self
        num_classes = NUM_CLASSES[self.source]
        if self.class_order is not None:
            if sorted(self.class_order) != list(range(num_classes)):
                raise ValueError(f"class_order must be a permutation of {self.source}'s classes 0..{num_classes - 1}")
            if self.shuffle_classes:
                raise ValueError("give either class_order or shuffle_classes, not both")
        if num_classes % self.experiences:
            raise ValueError(
                f"{self.source}'s {num_classes} classes do not split evenly into {self.experiences} experiences"
            )
        if self.scenario == "domain-il" and num_classes // self.experiences < 2:
            raise ValueError("split domain-il needs at least 2 classes per experience (its labels are positions in the group)")
        return self


@dataclass(frozen=True)
class Experience:
    """One experience of a stream: its samples and the classes they carry.

    x: float32 [N, C, H, W] in [0, 1]; y: int64 [N] labels in the stream's label space;
    classes: the labels present; index: position in the stream (also the task id in task-IL).
    """

    index: int
    x: Tensor
    y: Tensor
    classes: tuple[int, ...]


@dataclass(frozen=True)
class Stream:
    """A benchmark cut into experiences: train[i] and test[i] are experience i."""

    name: str
    scenario: str
    input_shape: tuple[int, int, int]
    num_classes: int
    train: list[Experience]
    test: list[Experience]

    @property
    def task_classes(self) -> list[tuple[int, ...]]:
        """The classes of each experience (task-IL masks the output to these)."""
        return [e.classes for e in self.train]


from clgrid.benchmarks.scenarios import load_stream  # noqa: E402  (needs the classes above)

__all__ = ["SOURCES", "BenchmarkSpec", "Experience", "Stream", "load_stream"]
