"""The grid a spec names: the axes of a strategy entry, its points, and which trials exist.

Which trials exist is decided once, by ``pairs``: counting (``trial_count``), refusing
(problems.semantic_problems) and expanding (``expand``) all read it. Counting multiplies sizes and
never builds a point, so a spec whose grid has 10^15 points is refused in microseconds.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, NamedTuple

from pydantic import BaseModel

from clgrid.benchmarks import BenchmarkSpec
from clgrid.spec.schema import PipelineSpec, TrialSpec
from clgrid.strategies import REGISTRY, StrategyConfig


def axes(grid: BaseModel) -> dict[str, list]:
    """The list-valued hyperparameters of a strategy entry (a list-typed field is a value, not an axis)."""
    fields = REGISTRY[grid.name].Config.model_fields  # type: ignore[attr-defined]
    return {k: v for k, v in grid if isinstance(v, list) and getattr(fields[k].annotation, "__origin__", None) is not list}


def grid_size(grid: BaseModel) -> int:
    """How many Configs ``strategy_points(grid)`` would make, without making them."""
    return math.prod(len(v) for v in axes(grid).values())


def strategy_points(grid: BaseModel) -> list[StrategyConfig]:
    """The Configs of one strategy entry: the product of its axes, in the order the fields are declared.

    Built without validating again: the entry's model already checked every value against the
    Config's own field (schema._grid_model), where the spec's line of a bad value is known.
    """
    values = grid.model_dump()  # a copy: the Configs share no value with the spec
    names = list(axes(grid))
    config_cls = REGISTRY[grid.name].Config  # type: ignore[attr-defined]
    return [
        config_cls.model_construct(**{**values, **dict(zip(names, combo))})
        for combo in itertools.product(*(values[k] for k in names))
    ]


class Pair(NamedTuple):
    """A strategy entry of the spec paired with one of its benchmarks."""

    entry: int  # index in spec.strategies
    grid: BaseModel
    index: int  # index in spec.benchmarks
    benchmark: BenchmarkSpec
    supported: bool  # False only under `unsupported: error`: a pair the spec is refused for


def pairs(spec: PipelineSpec) -> Iterator[Pair]:
    """Every (strategy entry, benchmark) pair the spec asks for, in spec order; `unsupported: skip`
    leaves out those whose scenario the strategy does not apply to."""
    for i, grid in enumerate(spec.strategies):
        scenarios = REGISTRY[grid.name].scenarios
        for j, bench in enumerate(spec.benchmarks):
            supported = bench.scenario in scenarios
            if supported or spec.unsupported == "error":
                yield Pair(i, grid, j, bench, supported)


def trial_count(spec: PipelineSpec) -> int:
    """How many trials the spec asks for (refused pairs included), counted without expanding."""
    sizes = [grid_size(grid) for grid in spec.strategies]
    return len(spec.seeds) * sum(sizes[pair.entry] for pair in pairs(spec))


def expand(spec: PipelineSpec) -> list[TrialSpec]:
    """One TrialSpec per strategy configuration x supported benchmark x seed, in spec order."""
    benchmarks: dict[int, list[BenchmarkSpec]] = {}  # strategy entry -> its benchmarks, in spec order
    for pair in pairs(spec):
        if pair.supported:
            benchmarks.setdefault(pair.entry, []).append(pair.benchmark)
    spec_hash = spec.spec_hash  # a hash of the whole spec: once, not once per trial
    return [
        TrialSpec(
            pipeline=spec.name, experiment=spec.experiment, spec_hash=spec_hash, benchmark=bench,
            strategy=config, model=spec.model, train=spec.train, seed=seed,
            resources=spec.resources, storage=spec.storage, probes=spec.probes,
        )
        for entry, kept in benchmarks.items()
        for config in strategy_points(spec.strategies[entry])
        for bench in kept
        for seed in spec.seeds
    ]
