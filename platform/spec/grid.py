"""The grid a spec names: the axes of a strategy entry, its points, and which trials exist.

Which trials exist is decided once, by ``pairs``: counting (``trial_count``), refusing
(problems.semantic_problems) and expanding (``expand``) all read it. Counting multiplies sizes and
never builds a point, so a spec whose grid has 10^15 points is refused in microseconds.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator, NamedTuple

from pydantic import BaseModel

from clgrid.benchmarks import BenchmarkSpec
from clgrid.spec.schema import PipelineSpec, TrainGrid, TrainSpec, TrialSpec
from clgrid.spec.spaces import Space
from clgrid.strategies import REGISTRY, MemoryConfig, Strategy, StrategyConfig


def axes(grid: BaseModel) -> dict[str, list]:
    """The list-valued hyperparameters of a strategy entry (a list-typed field is a value, not an axis)."""
    fields = REGISTRY[grid.name].Config.model_fields  # type: ignore[attr-defined]
    return {k: v for k, v in grid if isinstance(v, list) and getattr(fields[k].annotation, "__origin__", None) is not list}


def distributions(grid: BaseModel, train: TrainGrid) -> dict[tuple[str, str], Space]:
    """The distributions of a strategy entry and of ``train.lr``, by (section, field)."""
    found = {("strategy", k): v for k, v in grid if isinstance(v, Space)}
    return found | ({("train", "lr"): train.lr} if isinstance(train.lr, Space) else {})


def search_axes(grid: BaseModel, train: TrainGrid) -> dict[tuple[str, str], list | Space]:
    """What tuning searches over, by (section, field): the grid axes, ``train.lr``'s and the distributions."""
    found: dict[tuple[str, str], list | Space] = {("strategy", k): v for k, v in axes(grid).items() if len(v) > 1}
    if train.lrs is not None and len(train.lrs) > 1:
        found[("train", "lr")] = train.lrs
    return found | distributions(grid, train)


def point(grid: BaseModel, train: TrainGrid, values: dict[str, dict[str, Any]]) -> tuple[StrategyConfig, TrainSpec]:
    """The strategy Config and TrainSpec of one point of a search: ``values[section][field]`` over the
    entry's own values, validated again (a sampled value is checked like a written one)."""
    config_cls = REGISTRY[grid.name].Config  # type: ignore[attr-defined]
    fixed = {k: v[0] if k in axes(grid) else v for k, v in grid.model_dump(mode="json").items()
             if not isinstance(getattr(grid, k), Space)}
    lr = values.get("train", {}).get("lr", train.lrs[0] if train.lrs else None)
    return config_cls.model_validate({**fixed, **values.get("strategy", {})}), train.at(lr)


def grid_size(grid: BaseModel) -> int:
    """How many Configs ``strategy_points(grid)`` would make, without making them."""
    return math.prod(len(v) for v in axes(grid).values())


def tuning_size(spec: PipelineSpec, grid: BaseModel) -> int:
    """How many configurations tuning tries for a strategy entry (per benchmark)."""
    assert spec.tune is not None
    if spec.tune.search == "grid":
        return grid_size(grid) * len(spec.train.lrs or [None])
    return spec.tune.num_samples


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


def unsupported(name: str, bench: BenchmarkSpec) -> str:
    """Why strategy ``name`` cannot run on ``bench`` (its scenario, or hidden boundaries); "" if it can."""
    cls = REGISTRY[name]
    if bench.scenario not in cls.scenarios:
        return f"supports {', '.join(cls.scenarios)}; the benchmark ({bench.id}) is {bench.scenario}"
    if bench.boundaries == "hidden" and cls.needs_boundaries:
        return (f"({cls.__name__}) needs experience boundaries: it {cls.needs_boundaries}; the benchmark "
                f"({bench.id}) has boundaries: hidden")
    return ""


def pairs(spec: PipelineSpec) -> Iterator[Pair]:
    """Every (strategy entry, benchmark) pair the spec asks for, in spec order; `unsupported: skip`
    leaves out those the strategy cannot run (``unsupported``)."""
    for i, grid in enumerate(spec.strategies):
        for j, bench in enumerate(spec.benchmarks):
            supported = not unsupported(grid.name, bench)
            if supported or spec.unsupported == "error":
                yield Pair(i, grid, j, bench, supported)


def trial_count(spec: PipelineSpec) -> int:
    """How many trials the spec asks for (refused pairs included), counted without expanding; with
    ``tune:``, the tuning trials and one final configuration per pair."""
    if spec.tune is not None:
        tuning = {i: tuning_size(spec, grid) * len(spec.tune.seeds) for i, grid in enumerate(spec.strategies)}
        return sum(tuning[pair.entry] + len(spec.seeds) for pair in pairs(spec))
    sizes = [grid_size(grid) * len(spec.train.lrs or [None]) for grid in spec.strategies]  # a distribution: refused
    return len(spec.seeds) * sum(sizes[pair.entry] for pair in pairs(spec))


def expand(spec: PipelineSpec) -> list[TrialSpec]:
    """One TrialSpec per strategy configuration x learning rate x supported benchmark x seed, in spec
    order. A tuned spec names its trials as tuning picks them (clgrid.sweep.tune_phase): none here."""
    if spec.tune is not None:
        return []
    benchmarks: dict[int, list[BenchmarkSpec]] = {}  # strategy entry -> its benchmarks, in spec order
    for pair in pairs(spec):
        if pair.supported:
            benchmarks.setdefault(pair.entry, []).append(pair.benchmark)
    spec_hash = spec.spec_hash  # a hash of the whole spec: once, not once per trial
    return [
        TrialSpec(
            pipeline=spec.name, experiment=spec.experiment, spec_hash=spec_hash, benchmark=bench,
            strategy=config, model=spec.model, train=spec.train.at(lr), seed=seed,
            resources=spec.resources, storage=spec.storage, probes=spec.probes, evaluate=spec.evaluate,
        )
        for entry, kept in benchmarks.items()
        for config in strategy_points(spec.strategies[entry])
        for lr in spec.train.lrs or []
        for bench in kept
        for seed in spec.seeds
    ]


def expected_work(trial: TrialSpec) -> float:
    """A trial's training work relative to the other trials of its sweep, from the spec alone (no
    data, no torch): sweeps start the longest trials first, so that none runs alone at the end.
    Counts passes over experience-sized data (epochs x an experience's share of the source, or
    iterations) and what the strategy adds to them, with factors measured on the quickstart: joint
    training's epochs run over all the experiences seen (1 + 2 + ... + T), a memory's replay batch rides along
    from the second experience on (x1.2), a loss term of its own (a penalty, distillation) x1.6.
    Only the order matters."""
    bench, train = trial.benchmark, trial.train
    cls = REGISTRY[trial.strategy.name]
    T = bench.experiences
    per_experience = (train.epochs or 1) / T if bench.splits_classes and train.iterations is None else \
        float(train.iterations or train.epochs or 1)
    refits = trial.strategy.name == "joint" and train.iterations is None  # epochs over the union
    experiences = T * (T + 1) / 2 if refits else T
    work = per_experience * experiences
    if isinstance(trial.strategy, MemoryConfig):
        work *= 1 + 0.2 * (T - 1) / T
    if cls.loss is not Strategy.loss:
        work *= 1.6
    return work
