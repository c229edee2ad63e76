"""The pipeline spec: Pydantic models, YAML loading with line-numbered errors, and grid expansion.

A spec names benchmarks, strategies (each hyperparameter a value or a list: a list is a grid axis),
a model, training settings, seeds, resources, tracking, storage and report budgets. ``load_spec``
reports every problem at once as ``file:line: field.path: message``; ``expand`` turns a valid spec
into one ``TrialSpec`` per point of strategy x hyperparameters x benchmark x seed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic_core import PydanticUndefined
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_validator

from clgrid.benchmarks import BenchmarkSpec
from clgrid.models import ModelSpec
from clgrid.strategies import REGISTRY, StrategyConfig

MAX_TRIALS_DEFAULT = 10_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainSpec(Strict):
    """How each experience is trained. Give ``epochs`` or ``iterations`` (steps), not both."""

    epochs: int | None = Field(1, ge=1)
    iterations: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("iterations") is not None:
            if data.get("epochs") is not None:
                raise ValueError("give either epochs or iterations per experience, not both")
            data = {**data, "epochs": None}
        return data

    @property
    def steps(self) -> dict[str, int | None]:
        return {"epochs": self.epochs, "iterations": self.iterations}


class ResourcesSpec(Strict):
    """What each trial gets; fractions of a GPU let several small trials share one."""

    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent: int | None = Field(None, ge=1, description="default: as many as the resources allow")
    max_failures: int = Field(2, ge=0, description="retries of a failed trial, from its last checkpoint")


class TrackingSpec(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite file in the storage root")
    experiment: str | None = Field(None, description="MLflow experiment; default: the pipeline name")


class StorageSpec(Strict):
    root: str = Field("clgrid-runs", description="folder (or URI) for checkpoints, replay shards, Ray results")
    replay: Literal["arrow", "memory"] = Field(
        "arrow", description="replay memories in durable Arrow shards in the trial folder, or in process memory")


class ReportSpec(Strict):
    compute_budget_flops: float | None = Field(None, gt=0)
    storage_budget_bytes: float | None = Field(None, gt=0)


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _grid_model(config: type[StrategyConfig]) -> type[BaseModel]:
    """The spec-side twin of a strategy Config: every scalar hyperparameter may also be a list."""
    fields: dict[str, Any] = {}
    for name, info in config.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        is_list = getattr(info.annotation, "__origin__", None) is list
        default = info.default
        if name != "name" and not is_list:  # a scalar or a list of them: validated as a list
            annotation = Annotated[list[annotation], BeforeValidator(_as_list), Field(min_length=1)]  # type: ignore[valid-type]
            default = default if default is PydanticUndefined else [default]
        fields[name] = (annotation, Field(default, description=info.description))
    return create_model(f"{config.__name__}Grid", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


GRID_MODELS = {name: _grid_model(cls.Config) for name, cls in REGISTRY.items()}
StrategyGrid = Annotated[Union[tuple(GRID_MODELS.values())], Field(discriminator="name")]
StrategyConfigs = Annotated[Union[tuple(cls.Config for cls in REGISTRY.values())], Field(discriminator="name")]


class PipelineSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    description: str = ""
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    strategies: list[StrategyGrid] = Field(min_length=1)  # type: ignore[valid-type]
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    seeds: list[int] = Field([0], min_length=1)
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    report: ReportSpec = ReportSpec()
    max_trials: int = Field(MAX_TRIALS_DEFAULT, ge=1, description="refuse grids larger than this")

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{Path(self.storage.root).resolve()}/mlflow.db"

    @property
    def spec_hash(self) -> str:
        return _digest(self.model_dump(mode="json"))


class TrialSpec(Strict):
    """One trial: everything the trainer needs, resolved to scalars; JSON round-trips exactly."""

    pipeline: str
    experiment: str
    spec_hash: str
    benchmark: BenchmarkSpec
    strategy: StrategyConfigs  # type: ignore[valid-type]
    model: ModelSpec
    train: TrainSpec
    seed: int
    resources: ResourcesSpec
    storage: StorageSpec

    @property
    def config_key(self) -> str:
        """Hash of what is trained, without the seed: the seeds of one configuration share it."""
        return _digest(self.model_dump(mode="json", include={"benchmark", "strategy", "model", "train"}))

    @property
    def trial_key(self) -> str:
        """Hash of the resolved trial config: stable across runs of the same spec."""
        return _digest({"config": self.config_key, "seed": self.seed})

    @property
    def label(self) -> str:
        return f"{self.strategy.name}/{self.benchmark.id}/{self.benchmark.scenario}/seed{self.seed}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def strategy_points(grid: BaseModel) -> list[StrategyConfig]:
    """The Configs of one strategy entry: the product of its list-valued hyperparameters."""
    values = grid.model_dump()
    axes = {k: v for k, v in values.items() if isinstance(v, list) and not _is_list_field(grid, k)}
    config_cls = REGISTRY[values["name"]].Config
    return [
        config_cls(**{**values, **dict(zip(axes, combo))})
        for combo in itertools.product(*axes.values())
    ]


def _is_list_field(grid: BaseModel, key: str) -> bool:
    info = REGISTRY[grid.name].Config.model_fields[key]  # type: ignore[attr-defined]
    return getattr(info.annotation, "__origin__", None) is list


def expand(spec: PipelineSpec) -> list[TrialSpec]:
    """One TrialSpec per strategy configuration x benchmark x seed, in spec order."""
    configs = [c for grid in spec.strategies for c in strategy_points(grid)]
    return [
        TrialSpec(
            pipeline=spec.name, experiment=spec.experiment, spec_hash=spec.spec_hash, benchmark=bench,
            strategy=config, model=spec.model, train=spec.train, seed=seed,
            resources=spec.resources, storage=spec.storage,
        )
        for config in configs
        for bench in spec.benchmarks
        for seed in spec.seeds
    ]


# ---- loading and error reporting -------------------------------------------------------------


class SpecError(Exception):
    """A spec that cannot run; ``problems`` holds every ``file:line: field.path: message`` line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def bundled_pipelines() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("clgrid.pipelines").iterdir() if p.name.endswith(".yaml"))


def resolve_spec_path(spec: str | Path) -> Path:
    """A path to a YAML file, or the name of a bundled pipeline (``quickstart``)."""
    path = Path(spec)
    if path.is_file():
        return path
    bundled = resources.files("clgrid.pipelines") / f"{spec}.yaml"
    if bundled.is_file():
        return Path(str(bundled))
    raise SpecError([f"{spec}: no such file, and not a bundled pipeline (bundled: {', '.join(bundled_pipelines())})"])


def load_spec(spec: str | Path) -> PipelineSpec:
    """Reads and validates a spec; raises SpecError listing every problem with its line."""
    path = resolve_spec_path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}: cannot read: {exc}"]) from None
    return parse_spec(text, str(path))


def parse_spec(text: str, filename: str = "<spec>") -> PipelineSpec:
    loader = yaml.SafeLoader(text)  # safe: builds only plain Python scalars, lists and dicts
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise SpecError([f"{filename}:{line}: <yaml>: {getattr(exc, 'problem', None) or exc}"]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise SpecError([f"{filename}:1: <root>: expected a mapping of spec fields, got {type(data).__name__}"])
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_format_error(err, root, filename) for err in exc.errors()]) from None
    problems = [f"{filename}:{_line(root, loc)[1]}: {_line(root, loc)[0]}: {msg}" for loc, msg in semantic_problems(spec)]
    if problems:
        raise SpecError(problems)
    return spec


def semantic_problems(spec: PipelineSpec) -> list[tuple[tuple, str]]:
    """Cross-field problems: scenarios a strategy refuses, configs a strategy rejects, grid size."""
    problems: list[tuple[tuple, str]] = []
    n_configs = 0
    for i, grid in enumerate(spec.strategies):
        cls = REGISTRY[grid.name]
        for j, bench in enumerate(spec.benchmarks):
            if bench.scenario not in cls.scenarios:
                problems.append((("strategies", i, "name"),
                                 f"strategy '{grid.name}' supports {', '.join(cls.scenarios)}; "
                                 f"benchmarks.{j} ({bench.id}) is {bench.scenario}"))
        try:
            n_configs += len(strategy_points(grid))
        except ValidationError as exc:
            problems += [(("strategies", i, *e["loc"]), e["msg"]) for e in exc.errors()]
    n_trials = n_configs * len(spec.benchmarks) * len(spec.seeds)
    if n_trials > spec.max_trials:
        problems.append((("strategies",), f"the grid has {n_trials} trials, more than max_trials={spec.max_trials}"))
    return problems


def _format_error(err: dict, root: yaml.Node, filename: str) -> str:
    loc, msg = err["loc"], err["msg"]
    if err["type"] == "union_tag_invalid":
        loc = (*loc, "name")
        msg = f"unknown strategy '{err['ctx']['tag']}'; valid strategies: {', '.join(sorted(REGISTRY))}"
    elif err["type"] == "union_tag_not_found":
        msg = f"a strategy needs a 'name'; valid strategies: {', '.join(sorted(REGISTRY))}"
    path, line = _line(root, loc)
    return f"{filename}:{line}: {path}: {msg}"


def _line(root: yaml.Node, loc: tuple) -> tuple[str, int]:
    """Follows a Pydantic error location through the YAML node tree: (dotted path, line number).

    Location parts that are not in the YAML (union member names) are skipped; the line is that of
    the deepest node reached, or of its key when the field itself is missing.
    """
    node, line, parts = root, root.start_mark.line + 1, []
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    child, line = value, key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is not None:
            node = child
            parts.append(str(part))
        elif part not in GRID_MODELS:
            parts.append(str(part))
    return ".".join(parts) or "<root>", line
