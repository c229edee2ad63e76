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
import math
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic_core import PydanticUndefined
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_validator

from clgrid.benchmarks import BenchmarkSpec
from clgrid.sweep import layout
from clgrid.train.models import ModelSpec
from clgrid.strategies import REGISTRY, StrategyConfig

MAX_TRIALS_DEFAULT = 10_000
MAX_TRIALS_LIMIT = 1_000_000  # the largest max_trials a spec may ask for: beyond it no sweep is meant
# A spec is a page of YAML. These bounds are far above any real one and keep a hostile one (a
# billion-laughs alias bomb, 10,000 nested brackets, a 1 GB file) from eating time or memory:
# PyYAML's pure-Python loader needs about 65 us per value: the worst accepted text takes 1-3 s.
MAX_SPEC_CHARS = 250_000
MAX_DEPTH = 32  # nesting, counted after aliases are expanded
MAX_NODES = 20_000  # scalars, lists and mappings, counted after aliases are expanded
MAX_PROBLEMS = 50  # problems listed; the rest are counted in one last line
_NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"


class Strict(BaseModel):
    # inf or nan pass `gt=0` checks and would only fail once a trial trains
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
    experiment: str | None = Field(None, min_length=1, max_length=256, pattern=_NO_CONTROL,
                                   description="MLflow experiment; default: the pipeline name")


class StorageSpec(Strict):
    root: str = Field(layout.DEFAULT_ROOT, min_length=1, max_length=4096, pattern=_NO_CONTROL,
                      description="folder (or URI) for checkpoints, replay shards, Ray results")
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
    return create_model(f"{config.__name__}Grid", __config__=Strict.model_config, **fields)


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
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field([0], min_length=1)
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    report: ReportSpec = ReportSpec()
    max_trials: int = Field(MAX_TRIALS_DEFAULT, ge=1, le=MAX_TRIALS_LIMIT, description="refuse grids larger than this")
    unsupported: Literal["error", "skip"] = Field(
        "error", description="a strategy paired with a benchmark whose scenario it does not apply to: "
                             "refuse the spec, or skip those pairs (studies over several scenarios)")

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or layout.sqlite_uri(self.storage.root)

    @property
    def spec_hash(self) -> str:
        """Hash of what the sweep computes. Where it stores and logs, how many trials run at once
        and how often they retry do not change it, so `clgrid resume SPEC --max-concurrent 4` still
        finds the sweep that `clgrid run SPEC --max-concurrent 2` started."""
        operational = {"resources": {"max_concurrent", "max_failures"}, "storage": {"root"},
                       "tracking": True, "report": True}
        return _digest(self.model_dump(mode="json", exclude=operational))


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


def _axes(grid: BaseModel) -> dict[str, list]:
    values = grid.model_dump()
    return {k: v for k, v in values.items() if isinstance(v, list) and not _is_list_field(grid, k)}


def grid_size(grid: BaseModel) -> int:
    """How many Configs ``strategy_points(grid)`` would make, without making them."""
    return math.prod(len(v) for v in _axes(grid).values())


def strategy_points(grid: BaseModel) -> list[StrategyConfig]:
    """The Configs of one strategy entry: the product of its list-valued hyperparameters."""
    values = grid.model_dump()
    axes = _axes(grid)
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
    spec_hash = spec.spec_hash  # a hash of the whole spec: once, not once per trial
    return [
        TrialSpec(
            pipeline=spec.name, experiment=spec.experiment, spec_hash=spec_hash, benchmark=bench,
            strategy=config, model=spec.model, train=spec.train, seed=seed,
            resources=spec.resources, storage=spec.storage,
        )
        for config in configs
        for bench in spec.benchmarks
        if bench.scenario in REGISTRY[config.name].scenarios
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
    """Validates a spec's YAML text; raises SpecError listing every problem with its line."""
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError([f"{filename}:1: <yaml>: the spec is {len(text):,} characters; "
                         f"expected at most {MAX_SPEC_CHARS:,}"])
    loader = None
    try:
        loader = _SpecLoader(text)  # reads the text at once: a NUL byte is refused here
        root = loader.get_single_node()
        if root is not None:
            _check_tree(root)
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise SpecError([f"{filename}:{line}: <yaml>: {_one_line(getattr(exc, 'problem', None) or exc)}"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise SpecError([f"{filename}:1: <root>: expected a mapping of spec fields, got {type(data).__name__}"])
    lines = _Lines(root)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise SpecError(_capped([_format_error(err, lines, filename) for err in errors[:MAX_PROBLEMS]],
                                len(errors), filename)) from None
    problems = semantic_problems(spec)
    if problems:
        raise SpecError(_capped([_problem(filename, lines, loc, msg) for loc, msg in problems[:MAX_PROBLEMS]],
                                len(problems), filename))
    return spec


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain scalars, lists and mappings only: ``!!python/...`` tags are
    refused), made to stop at MAX_DEPTH before its recursive composer reaches Python's stack limit
    and at MAX_NODES before a long text costs seconds, and to report a bad scalar
    (``!!timestamp 2001-02-30``, a 5,000-digit int) with its line."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        depth = self._depth
        if depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES:,} values in the spec",
                                              self.peek_event().start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:  # YAMLError is a plain Exception: not caught
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {exc}", node.start_mark) from None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_tree(root: yaml.Node) -> None:
    """Refuses recursive aliases, trees that aliases expand past MAX_NODES or MAX_DEPTH (the
    billion-laughs bomb: 9 aliases to 9 aliases to ... is tiny as text and huge once expanded),
    and keys given twice in one mapping (YAML keeps the last one silently).

    Each distinct node is visited once and its expanded size and depth are memoised, so this costs
    the size of the text, not of the expansion; the walk uses its own stack, not Python's.
    """
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth) once aliases are expanded
    open_: set[int] = set()  # nodes whose children are still being measured: meeting one is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = [measured[id(k)] for k in _children(node)]
            size, depth = 1 + sum(n for n, _ in kids), 1 + max((d for _, d in kids), default=0)
            if size > MAX_NODES or depth > MAX_DEPTH:  # the text itself was within both: aliases did it
                what = f"{size:,} values" if size > MAX_NODES else f"{depth} levels of nesting"
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand this to {what}; expected at most {MAX_NODES:,} values "
                    f"and {MAX_DEPTH} levels", node.start_mark)
            measured[key] = (size, depth)
            open_.discard(key)
            continue
        if key in measured:
            continue
        if key in open_:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a collection that contains it",
                                              node.start_mark)
        open_.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node))


def _check_unique_keys(node: yaml.MappingNode) -> None:
    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if (key.tag, key.value) in seen:
                raise yaml.composer.ComposerError(None, None, f"key {key.value!r} is given twice in this mapping",
                                                  key.start_mark)
            seen.add((key.tag, key.value))


def semantic_problems(spec: PipelineSpec) -> list[tuple[tuple, str]]:
    """Cross-field problems: scenarios a strategy refuses, configs a strategy rejects, grid size,
    trials given twice (they would share one folder and one MLflow run)."""
    problems: list[tuple[tuple, str]] = []
    for i, grid in enumerate(spec.strategies):
        cls = REGISTRY[grid.name]
        for j, bench in enumerate(spec.benchmarks):
            if bench.scenario not in cls.scenarios and spec.unsupported == "error":
                problems.append((("strategies", i, "name"),
                                 f"strategy '{grid.name}' supports {', '.join(cls.scenarios)}; "
                                 f"benchmarks.{j} ({bench.id}) is {bench.scenario} (set `unsupported: skip` to skip such pairs)"))
    # counted, not expanded: a spec with 10^15 grid points is refused in microseconds
    sizes = [grid_size(grid) for grid in spec.strategies]
    n_trials = len(spec.seeds) * sum(
        size * sum(spec.unsupported == "error" or b.scenario in REGISTRY[grid.name].scenarios for b in spec.benchmarks)
        for size, grid in zip(sizes, spec.strategies))
    if n_trials > spec.max_trials:
        problems.append((("strategies",), f"the grid has {n_trials} trials ({sum(sizes):,} strategy configurations, "
                         f"{len(spec.benchmarks)} benchmarks, {len(spec.seeds)} seeds), more than "
                         f"max_trials={spec.max_trials}"))
        return problems
    if n_trials == 0:
        problems.append((("strategies",), "no trial left: every strategy is skipped on every benchmark "
                         "(`unsupported: skip`)"))
    configs: dict[str, int] = {}  # configuration hash -> the strategies entry that gave it first
    for i, grid in enumerate(spec.strategies):
        try:
            points = strategy_points(grid)
        except ValidationError as exc:
            problems += [(("strategies", i, *e["loc"]), e["msg"]) for e in exc.errors(include_url=False)]
            continue
        for config in points:
            digest = _digest(config.model_dump(mode="json"))
            if digest in configs:
                where = "twice in this entry" if configs[digest] == i else f"also by strategies.{configs[digest]}"
                values = ", ".join(f"{k}={getattr(config, k)!r}" for k in _axes(grid)) or "its defaults"
                problems.append((("strategies", i), f"the configuration {grid.name} ({values}) is given {where}; "
                                 "each configuration must appear once"))
                break
            configs[digest] = i
    for field, items in (("benchmarks", [b.model_dump_json() for b in spec.benchmarks]), ("seeds", spec.seeds)):
        first: dict[Any, int] = {}
        for k, item in enumerate(items):
            if first.setdefault(item, k) != k:
                problems.append(((field, k), f"same as {field}.{first[item]}; each must appear once "
                                 "(two identical trials would share one folder and one MLflow run)"))
    return problems


def _capped(problems: list[str], total: int, filename: str) -> list[str]:
    if total > len(problems):
        problems.append(f"{filename}:1: <root>: {total - len(problems)} more problems not listed "
                        f"(only the first {len(problems)} are)")
    return problems


def _problem(filename: str, lines: _Lines, loc: tuple, msg: str) -> str:
    path, line = lines.locate(loc)
    return f"{filename}:{line}: {path}: {_one_line(msg)}"


def _format_error(err: dict, lines: _Lines, filename: str) -> str:
    loc, msg = err["loc"], err["msg"]
    if err["type"] == "union_tag_invalid":
        loc = (*loc, "name")
        msg = f"unknown strategy {_shown(err['ctx']['tag'])}; valid strategies: {', '.join(sorted(REGISTRY))}"
    elif err["type"] == "union_tag_not_found":
        msg = f"a strategy needs a 'name'; valid strategies: {', '.join(sorted(REGISTRY))}"
    return _problem(filename, lines, loc, msg)


def _shown(value: Any, limit: int = 60) -> str:
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


# Characters that would split a problem over lines, or make `file:line: path: message` ambiguous.
_BREAKS = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}


def _escaped(text: str, also: str = "") -> str:
    return "".join(_escape(c) if (unicodedata.category(c) in _BREAKS and c != " ") or c in also else c for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _one_line(msg: Any, limit: int = 400) -> str:
    text = _escaped(str(msg))
    return text if len(text) <= limit else text[:limit] + "..."


class _Lines:
    """Follows Pydantic error locations through the YAML node tree to a dotted path and a line."""

    def __init__(self, root: yaml.Node):
        self.root = root
        self._keys: dict[int, dict[Any, tuple[yaml.Node, yaml.Node]]] = {}

    def _lookup(self, node: yaml.MappingNode, part: Any) -> tuple[yaml.Node, yaml.Node] | None:
        if id(node) not in self._keys:  # an index per mapping: a 50,000-key mapping is not scanned per error
            self._keys[id(node)] = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        return self._keys[id(node)].get(part) if isinstance(part, str) else None

    def locate(self, loc: tuple) -> tuple[str, int]:
        """(dotted path, line number). Location parts that are not in the YAML (union member names)
        are skipped; the line is that of the deepest node reached, or of its key when the field
        itself is missing. Keys are shown with spaces, dots, colons and control characters escaped."""
        node, line, parts = self.root, self.root.start_mark.line + 1, []
        for part in loc:
            child = None
            if isinstance(node, yaml.MappingNode):
                found = self._lookup(node, part)
                if found is not None:
                    child, line = found[1], found[0].start_mark.line + 1
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                child = node.value[part]
                line = child.start_mark.line + 1
            if child is not None:
                node = child
                parts.append(_path_part(part))
            elif part not in GRID_MODELS:
                parts.append(_path_part(part))
        return ".".join(parts) or "<root>", line


def _path_part(part: Any) -> str:
    text = _escaped(str(part), also=" .:")
    return text if len(text) <= 80 else text[:80] + "..."
