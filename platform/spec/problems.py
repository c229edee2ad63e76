"""Loading a spec: every problem at once, each one line ``file:line: field.path: message``.

``load_spec`` reads a file (or a bundled pipeline: clgrid.pipelines), the hardened loader (yaml_safe) parses it,
Pydantic checks each field (schema) and ``semantic_problems`` what spans fields: scenarios a
strategy does not apply to, the grid's size, configurations, benchmarks or seeds given twice.
``_Lines`` follows each problem's location back through the YAML tree to its line.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from clgrid import pipelines
from clgrid.errors import SpecError
from clgrid.spec.grid import axes, distributions, grid_size, pairs, strategy_points, trial_count, unsupported
from clgrid.spec.schema import GRID_MODELS, PipelineSpec, digest
from clgrid.spec.spaces import KINDS
from clgrid.spec.yaml_safe import MAX_SPEC_CHARS, compose
from clgrid.strategies import REGISTRY

MAX_PROBLEMS = 50  # problems listed; the rest are counted in one last line


def load_spec(spec: str | Path) -> PipelineSpec:
    """Reads and validates a spec; raises SpecError listing every problem with its line."""
    path = pipelines.resolve(spec)
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
    try:
        root, data = compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise SpecError([f"{filename}:{line}: <yaml>: {_one_line(getattr(exc, 'problem', None) or exc)}"]) from None
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


def semantic_problems(spec: PipelineSpec) -> list[tuple[tuple, str]]:
    """Cross-field problems: scenarios a strategy refuses, grid size, trials given twice (they
    would share one folder and one MLflow run)."""
    problems: list[tuple[tuple, str]] = []
    for pair in pairs(spec):
        if not pair.supported:
            why = unsupported(pair.grid.name, pair.benchmark).replace("the benchmark", f"benchmarks.{pair.index}", 1)
            problems.append((("strategies", pair.entry, "name"),
                             f"strategy '{pair.grid.name}' {why} (set `unsupported: skip` to skip such pairs)"))
    if spec.train.online and (given := [k for k in ("iterations", "epochs") if k in spec.train.model_fields_set]):
        problems.append((("train", given[0]), "online: true trains one pass over each experience; "
                         f"remove {given[0]} (or set online: false)"))
    if spec.model.name == "mlp" and not spec.model.hidden:
        problems += [(("strategies", i, "name"), f"strategy '{grid.name}' {why}; model.hidden is [] (the linear "
                      "model): give the MLP at least one hidden layer")
                     for i, grid in enumerate(spec.strategies) if (why := REGISTRY[grid.name].needs_hidden_layers)]
    tuning = _tuning_problems(spec)
    problems += tuning
    n_trials = trial_count(spec)
    if n_trials > spec.max_trials:
        configs = sum(grid_size(grid) for grid in spec.strategies)
        problems.append((("strategies",), f"the grid has {n_trials} trials ({configs:,} strategy configurations, "
                         f"{len(spec.benchmarks)} benchmarks, {len(spec.seeds)} seeds), more than "
                         f"max_trials={spec.max_trials}"))
        return problems
    if n_trials == 0:
        problems.append((("strategies",), "no trial left: every strategy is skipped on every benchmark "
                         "(`unsupported: skip`)"))
    # tuning's points are not known yet; distributions without `tune:` are no configurations
    twice = _configurations_twice(spec) if spec.tune is None and not tuning else []
    return problems + twice + _benchmarks_or_seeds_twice(spec)


def _tuning_problems(spec: PipelineSpec) -> list[tuple[tuple, str]]:
    """A tuned spec's refusals: tuning seeds shared with the final ones, a stream shorter than
    first-experiences, no validation split to score on, distributions under grid search; and
    distributions in a spec without ``tune:``."""
    tune, problems = spec.tune, []
    where = {(("strategies", i, k) if section == "strategy" else ("train", k)): space
             for i, grid in enumerate(spec.strategies) for (section, k), space in distributions(grid, spec.train).items()}
    if tune is None:
        return [(loc, f"{{{space.kind}: ...}} is a search space: give the spec a `tune:` section (docs/tuning.md), "
                 "or a value or list here") for loc, space in where.items()]
    problems += [(loc, f"{{{space.kind}: ...}}: search grid takes values and lists only; use search random or "
                  "optuna for distributions") for loc, space in where.items() if tune.search == "grid"]
    final = set(spec.seeds)
    problems += [(("tune", "seeds", k), f"seed {seed} is also in `seeds`; tuning seeds must not overlap the final "
                  "seeds (the final trials would not be independent of the choice)")
                 for k, seed in enumerate(tune.seeds) if seed in final]
    for j, bench in enumerate(spec.benchmarks):
        if tune.experiences is not None and tune.experiences > bench.experiences:
            problems.append((("tune", "experiences"), f"{tune.experiences} experiences, but benchmarks.{j} "
                             f"({bench.id}) has {bench.experiences}; expected at most {bench.experiences}"))
        if bench.validation == 0:
            problems.append((("benchmarks", j, "validation"), "tuning scores on the validation split; "
                             "expected a fraction > 0 (default 0.1) in a spec with `tune:`"))
    return problems


def _configurations_twice(spec: PipelineSpec) -> list[tuple[tuple, str]]:
    """The first configuration of each strategy entry that an earlier point already gave. Only the
    entries paired with a benchmark are built: max_trials bounds them, and a skipped entry's
    configurations name no trial."""
    problems: list[tuple[tuple, str]] = []
    configs: dict[str, int] = {}  # configuration hash -> the strategies entry that gave it first
    for i in dict.fromkeys(pair.entry for pair in pairs(spec)):
        grid = spec.strategies[i]
        for config in strategy_points(grid):
            key = digest(config.model_dump(mode="json"))
            if key in configs:
                where = "twice in this entry" if configs[key] == i else f"also by strategies.{configs[key]}"
                values = ", ".join(f"{k}={getattr(config, k)!r}" for k in axes(grid)) or "its defaults"
                problems.append((("strategies", i), f"the configuration {grid.name} ({values}) is given {where}; "
                                 "each configuration must appear once"))
                break
            configs[key] = i
    return problems


def _benchmarks_or_seeds_twice(spec: PipelineSpec) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
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
    if err["type"] == "union_tag_invalid" and len(loc) == 2:  # strategies.i: deeper ones are search spaces
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


_UNION_TAGS = {"grid", "value", "list", *KINDS}  # members of the search-space unions (spaces, schema): not in the YAML


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
            elif part not in GRID_MODELS and part not in _UNION_TAGS:
                parts.append(_path_part(part))
        return ".".join(parts) or "<root>", line


def _path_part(part: Any) -> str:
    text = _escaped(str(part), also=" .:")
    return text if len(text) <= 80 else text[:80] + "..."
