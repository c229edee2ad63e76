"""Benchmarks: a data source split into a stream of experiences by a scenario.

``load_stream(spec, seed)`` is the one entry point the trainer uses. Sources give raw train/test
tensors; scenarios cut them into experiences. Every split is a pure function of the spec and seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializationInfo, model_serializer, model_validator
from torch import Tensor

from clgrid.benchmarks.sources import NUM_CLASSES

SOURCES = tuple(NUM_CLASSES)
_UNSAID = {"boundaries": "given", "blurry": None}  # BenchmarkSpec._defaults_unsaid
# The context of the dumps that make config, trial and spec keys (clgrid.spec.schema): there,
# ``validation: 0`` (the behaviour before validation splits existed) is left out too. Other dumps
# keep it, since a dump without it loads back as the default 0.1.
KEYS = {"keys": True}


class BlurrySpec(BaseModel):
    """i-Blurry-N-M (Koh et al. 2022): ``disjoint`` = N/100 of the classes appear in one experience
    only; each other class has a home experience and ``blur`` = M/100 of its samples leak to others."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    disjoint: float = Field(ge=0, le=1, description="fraction of classes that appear in one experience only")
    blur: float = Field(ge=0, le=1, description="fraction of a blurry class's samples spread over the other experiences")


class BenchmarkSpec(BaseModel):
    """One benchmark of a pipeline: a source, a scenario and how to cut the stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["digits", "mnist5k", "mnist", "fashion-mnist", "cifar10", "cifar100"]
    scenario: Literal["class-il", "task-il", "domain-il"]
    experiences: int = Field(5, ge=1, le=1000)
    class_order: list[int] | Literal["per-seed"] | None = Field(
        None, description="split streams: an explicit class order, or per-seed: drawn from the trial seed")
    shuffle_classes: bool = Field(False, description="shuffle the class order with the trial seed (= class_order: per-seed)")
    validation: float = Field(0.1, ge=0, lt=0.5, description="fraction of each class's training samples in every "
                              "experience held out as its validation split, seeded; 0: no validation split")
    domain: Literal["permuted", "rotated", "split"] = Field(
        "permuted", description="domain-il only: pixel permutations, rotations, or split digits with shared labels"
    )
    permutation_seed: int | None = Field(None, description="permuted stream: seed of the pixel permutations; default: the trial seed")
    max_rotation: float = Field(180.0, gt=0, le=360, description="rotated stream: degrees of the last experience")
    boundaries: Literal["given", "hidden"] = Field(
        "given", description="hidden: strategies are told no experience boundary and no task id while training")
    blurry: BlurrySpec | None = Field(None, description="class-il only: an i-Blurry-N-M stream (Koh et al. 2022)")
    data_root: str = Field("~/.cache/clgrid/data", description="folder of the torchvision sources")
    download: bool = Field(False, description="allow torchvision sources to download into data_root")

    @property
    def id(self) -> str:
        """The benchmark name used in tags and reports, e.g. 'split-mnist5k' or 'permuted-mnist5k'."""
        kind = self.domain if self.scenario == "domain-il" else "blurry" if self.blurry else "split"
        return f"{kind}-{self.source}"

    @property
    def order_per_seed(self) -> bool:
        """Whether the class order is drawn from the trial seed."""
        return self.class_order == "per-seed" or self.shuffle_classes

    @property
    def splits_classes(self) -> bool:
        """Whether experiences are groups of classes (class-IL, task-IL, split domain-IL)."""
        return self.scenario != "domain-il" or self.domain == "split"

    @model_serializer(mode="wrap")
    def _defaults_unsaid(self, handler: Any, info: SerializationInfo) -> dict[str, Any]:
        """Fields added later are left out of dumps at their defaults: benchmarks that do not use
        them keep the config and trial keys they had before (a dump without them loads back the same)."""
        data = handler(self)
        for name, default in _UNSAID.items():
            if name in data and data[name] == default:
                del data[name]
        if info.context == KEYS and data.get("validation") == 0:
            del data["validation"]
        return data

    @model_validator(mode="after")
    def _check_online_settings(self) -> BenchmarkSpec:
        if self.boundaries == "hidden" and self.scenario == "task-il":
            raise ValueError("boundaries: hidden gives no task id at training time, which task-il needs; "
                             "use class-il or domain-il")
        if self.blurry is not None and self.scenario != "class-il":
            raise ValueError(f"blurry streams are class-il (classes shared across experiences), not {self.scenario}")
        return self

    @model_validator(mode="after")
    def _check_class_split(self) -> BenchmarkSpec:
        if not self.splits_classes:
            if self.class_order is not None or self.shuffle_classes:
                raise ValueError(f"class_order and shuffle_classes apply to split streams, not to {self.domain} domain-il")
            return self
        num_classes = NUM_CLASSES[self.source]
        if self.class_order is not None:
            if self.class_order != "per-seed" and sorted(self.class_order) != list(range(num_classes)):
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
    """A benchmark cut into experiences: train[i], test[i] and val[i] are experience i. ``val`` (empty
    when the spec's ``validation`` is 0) holds training samples that no train experience holds."""

    name: str
    scenario: str
    input_shape: tuple[int, int, int]
    num_classes: int
    train: list[Experience]
    test: list[Experience]
    val: list[Experience] = field(default_factory=list)

    @property
    def task_classes(self) -> list[tuple[int, ...]]:
        """The classes of each experience (task-IL masks the output to these)."""
        return [e.classes for e in self.train]


from clgrid.benchmarks.scenarios import load_stream  # noqa: E402  (needs the classes above)

__all__ = ["KEYS", "SOURCES", "BenchmarkSpec", "BlurrySpec", "Experience", "Stream", "load_stream"]
