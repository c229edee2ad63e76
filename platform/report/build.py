"""MLflow runs of a sweep -> cost-vs-forgetting report (self-contained HTML, Markdown, PNGs).

Which runs: the trial runs of ONE sweep, the latest (by parent start time) unless `sweep_id`
names another. Sweeps of the same pipeline may come from different specs or code, so pooling
them would silently mix grids. An experiment without any sweep parent run (trials logged
directly) is reported as a whole.

The summary metrics are recomputed (clgrid.train.metrics) from each run's `accuracy_matrix.json` so
that every column, including intransigence against the group's `joint` reference, comes from one
source; the logged metrics are the fallback when the artifact is missing or malformed. Costs are
the logged metrics.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clgrid.report import plots
from clgrid.train import metrics
from clgrid.report.stats import ALPHA, paired_p_value, pareto_front, summarize

__all__ = ["BUDGET_KEYS", "ReportError", "ReportResult", "build_report", "pareto_front", "summarize"]

MATRIX_ARTIFACT = "accuracy_matrix.json"
ARTIFACT_DIR = "report"
JOINT = "joint"
FINISHED = "FINISHED"
STORAGE_PARTS = ("replay_bytes", "strategy_state_bytes", "model_bytes")
BUDGET_KEYS = ("compute_flops", "storage_bytes")


class ReportError(RuntimeError):
    """The report cannot be built (unknown experiment or sweep, no finished runs)."""


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it covers."""

    html: Path
    markdown: Path
    images: tuple[Path, ...]
    sweep_id: str | None
    parent_run_id: str | None
    n_runs: int
    n_finished: int
    n_configs: int
    n_issues: int


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    higher_is_better: bool
    scale: float | None = None  # costs: multiplier to the header's unit; None: a [0, 1] metric

    def fmt(self, v: float) -> str:
        if not math.isfinite(v):
            return "—"
        if self.scale is None:
            text = f"{v:.3f}"
        else:  # 3 significant digits, without switching to 1.1e+03 for large values
            text = f"{v * self.scale:.3g}" if abs(v * self.scale) < 1000 else f"{v * self.scale:.0f}"
        return text.removeprefix("-") if float(text) == 0 else text  # no "-0.000"


COLUMNS = (
    Column("acc", "ACC", True),
    Column("forgetting", "forgetting", False),
    Column("bwt", "BWT", True),
    Column("fwt", "FWT", True),
    Column("learning_acc", "LA", True),
    Column("intransigence", "intransigence", False),
    Column("train_flops", "train GFLOP", False, 1e-9),
    Column("train_seconds", "train s", False, 1.0),
    Column("device_seconds", "device s", False, 1.0),
    Column("peak_memory_bytes", "peak memory MB", False, 1e-6),
    Column("replay_bytes", "replay MB", False, 1e-6),
    Column("model_bytes", "model MB", False, 1e-6),
    Column("strategy_state_bytes", "strategy state MB", False, 1e-6),
)


# ---------------------------------------------------------------------------------------------
# Data read from MLflow


@dataclass
class Matrix:
    r: np.ndarray
    names: list[str]
    summary: dict[str, float]  # clgrid.train.metrics.summary of r and b


@dataclass
class Trial:
    run_id: str
    status: str
    end_time: int
    benchmark: str
    scenario: str
    strategy: str
    seed: str
    config_key: str
    params: dict[str, str]
    metrics: dict[str, float]
    matrix: Matrix | None = None
    matrix_problem: str | None = None


@dataclass
class Config:
    """One strategy configuration (config_key): its runs over seeds and their column values."""

    key: str
    runs: list[Trial]
    params: dict[str, str] = field(default_factory=dict)  # constant over the config's runs
    label: str = ""
    varying: dict[str, str] = field(default_factory=dict)  # hyperparameters the grid varies
    by_seed: dict[str, Trial] = field(default_factory=dict)  # the finished run used per seed
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # column -> seed -> value

    @property
    def strategy(self) -> str:
        return self.runs[0].strategy

    def summary(self, key: str) -> tuple[float, float]:
        return summarize(self.values.get(key, {}).values())


@dataclass
class Cell:
    mean: float
    hw: float
    mark: str  # "best", "tie" (not significantly worse), "n/a" (untestable) or ""
    p: float | None = None


@dataclass
class Image:
    path: Path
    title: str
    png: bytes


@dataclass
class Budget:
    text: str  # the budgets, and the verdict when nothing fits
    best: Config | None = None
    detail: str = ""  # what follows the chosen configuration's label


@dataclass
class Group:
    benchmark: str
    scenario: str
    configs: list[Config]  # configurations with at least one finished run, in table order
    seeds: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    budget: Budget | None = None
    images: list[Image] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.benchmark} / {self.scenario}"


@dataclass
class Issue:
    group: str
    label: str
    seed: str
    run_id: str
    problem: str


def _search(client: MlflowClient, exp_id: str, filter_string: str = "") -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _find_sweep(client: MlflowClient, exp_id: str, experiment: str, sweep_id: str | None) -> Run | None:
    parents = _search(client, exp_id, "tags.`clgrid.role` = 'sweep'")  # newest first
    if sweep_id is None:
        return parents[0] if parents else None
    for run in parents:
        if run.data.tags.get("clgrid.sweep_id") == sweep_id:
            return run
    known = ", ".join(sorted({r.data.tags.get("clgrid.sweep_id", "?") for r in parents})) or "none"
    raise ReportError(f"experiment {experiment!r} has no sweep {sweep_id!r} (sweeps: {known})")


def _trial_runs(client: MlflowClient, exp_id: str, parent: Run | None) -> list[Run]:
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}'" if parent else ""
    return [r for r in _search(client, exp_id, query) if r.data.tags.get("clgrid.role") == "trial"]


def _load_matrix(client: MlflowClient, run_id: str, tmp: Path) -> Matrix:
    local = client.download_artifacts(run_id, MATRIX_ARTIFACT, str(tmp / run_id))
    data = json.loads(Path(local).read_text())
    r = np.asarray(data["R"], dtype=float)
    b = [float(x) for x in data["b"]]
    if len(b) != len(r):
        raise ValueError(f"b has {len(b)} entries for {len(r)} experiences")
    summary = metrics.summary(r, b)  # ValueError unless R is square
    exps = data.get("experiences") or []
    # Experiences may be described by dicts; a short name is all the plots need.
    names = [str(e) if isinstance(e, (str, int, float)) else str(i) for i, e in enumerate(exps)]
    return Matrix(r, names if len(names) == len(r) else [str(i) for i in range(len(r))], summary)


def _trial(client: MlflowClient, run: Run, tmp: Path) -> Trial:
    tags, info = run.data.tags, run.info
    t = Trial(
        run_id=info.run_id, status=info.status, end_time=info.end_time or 0,
        benchmark=tags.get("clgrid.benchmark", "?"), scenario=tags.get("clgrid.scenario", "?"),
        strategy=tags.get("clgrid.strategy", run.data.params.get("strategy.name", "?")),
        seed=tags.get("clgrid.seed", run.data.params.get("seed", "?")),
        # Without a config key each run is its own configuration rather than a wrong pooling.
        config_key=tags.get("clgrid.config_key", info.run_id),
        params=dict(run.data.params), metrics=dict(run.data.metrics),
    )
    if t.status == FINISHED:
        try:
            t.matrix = _load_matrix(client, t.run_id, tmp)
        except (MlflowException, OSError, ValueError, KeyError, TypeError) as e:
            t.matrix_problem = f"no usable {MATRIX_ARTIFACT} ({type(e).__name__}): logged metrics used"
    return t


# ---------------------------------------------------------------------------------------------
# Metrics and aggregation


def _joint_reference(configs: list[Config]) -> np.ndarray | None:
    """Mean accuracy matrix of the group's joint strategy (the most accurate one if several)."""
    joints = [c for c in configs if c.strategy == JOINT and any(t.matrix for t in c.by_seed.values())]
    if not joints:
        return None
    best = max(joints, key=lambda c: np.nan_to_num(c.summary("acc")[0], nan=-1.0))
    mats = [t.matrix.r for t in best.by_seed.values() if t.matrix]
    return np.mean(mats, axis=0) if len({m.shape for m in mats}) == 1 else None


def _trial_values(t: Trial, joint: np.ndarray | None) -> dict[str, float]:
    vals = {c.key: t.metrics.get(c.key, math.nan) for c in COLUMNS}
    if t.matrix is not None:
        vals.update(t.matrix.summary)
        if joint is not None and joint.shape == t.matrix.r.shape:
            vals["intransigence"] = metrics.intransigence(t.matrix.r, joint)
    # An absent storage component is taken as zero bytes (e.g. no replay buffer).
    vals["storage_bytes"] = float(sum(t.metrics.get(k, 0.0) for k in STORAGE_PARTS))
    return vals


def _fill_values(configs: list[Config]) -> None:
    def collect(c: Config, joint: np.ndarray | None) -> None:
        per_seed = {s: _trial_values(t, joint) for s, t in c.by_seed.items()}
        keys = [col.key for col in COLUMNS] + ["storage_bytes"]
        c.values = {k: {s: v[k] for s, v in per_seed.items()} for k in keys}

    for c in configs:  # first pass gives the joint configs an ACC to choose the reference by
        collect(c, None)
    joint = _joint_reference(configs)
    if joint is not None:
        for c in configs:
            collect(c, joint)


def _mark_column(configs: list[Config], col: Column) -> dict[str, Cell]:
    """Cells of one column: best mean marked, others tested against it (paired over seeds)."""
    cells = {c.key: Cell(*c.summary(col.key), mark="") for c in configs}
    finite = [c for c in configs if math.isfinite(cells[c.key].mean)]
    if not finite:
        return cells
    pick = max if col.higher_is_better else min
    target = pick(cells[c.key].mean for c in finite)
    best = [c for c in finite if math.isclose(cells[c.key].mean, target, rel_tol=1e-12, abs_tol=1e-15)]
    for c in finite:
        cell = cells[c.key]
        if any(c.key == b.key for b in best):
            cell.mark = "best"
            continue
        cell.p = paired_p_value(c.values[col.key], best[0].values[col.key])
        cell.mark = "n/a" if cell.p is None else ("tie" if cell.p >= ALPHA else "")
    return cells


def _seed_order(seed: str) -> tuple:
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def _constant_params(runs: list[Trial]) -> dict[str, str]:
    first = runs[0].params
    return {k: v for k, v in first.items() if k != "seed" and all(r.params.get(k) == v for r in runs)}


def _short(key: str) -> str:
    return key.removeprefix("strategy.")


def _assign_labels(configs: list[Config]) -> None:
    """Label = strategy name + the hyperparameters that differ between its configurations."""
    by_strategy: dict[str, list[Config]] = defaultdict(list)
    for c in configs:
        c.params = _constant_params(c.runs)
        by_strategy[c.strategy].append(c)
    for strategy, cfgs in by_strategy.items():
        keys = sorted({k for c in cfgs for k in c.params})
        varying = [k for k in keys if len({c.params.get(k) for c in cfgs}) > 1]
        for c in cfgs:
            c.varying = {k: c.params.get(k, "—") for k in varying}
            args = ", ".join(f"{_short(k)}={v}" for k, v in c.varying.items())
            c.label = f"{strategy} ({args})" if args else strategy
    counts = Counter(c.label for c in configs)
    for c in configs:
        if counts[c.label] > 1:  # differ only in parameters that are not constant per config
            c.label += f" [{c.key[:8]}]"


def _value_order(v: str) -> tuple:
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def _config_order(c: Config) -> tuple:
    return (c.strategy, tuple(_value_order(v) for v in c.varying.values()))


def _select_runs(title: str, configs: list[Config], seeds: list[str], issues: list[Issue]) -> None:
    """Pick one finished run per (config, seed); list everything not averaged or incomplete."""
    for c in configs:
        for t in c.runs:
            if t.status != FINISHED:
                issues.append(Issue(title, c.label, t.seed, t.run_id, f"status {t.status}: not averaged"))
        for t in sorted((t for t in c.runs if t.status == FINISHED), key=lambda t: t.end_time):
            if t.seed in c.by_seed:
                old = c.by_seed[t.seed]
                issues.append(Issue(title, c.label, t.seed, old.run_id,
                                    f"duplicate finished run: superseded by {t.run_id}"))
            c.by_seed[t.seed] = t
        for t in c.by_seed.values():
            if t.matrix_problem:
                issues.append(Issue(title, c.label, t.seed, t.run_id, t.matrix_problem))
        missing = [s for s in seeds if s not in c.by_seed]
        if missing and c.by_seed:
            issues.append(Issue(title, c.label, ", ".join(missing), "",
                                f"no finished run for these seeds: mean over {len(c.by_seed)} of {len(seeds)} seeds"))
        elif missing:
            issues.append(Issue(title, c.label, ", ".join(missing), "", "no finished run: left out of the tables"))


def _build_groups(trials: list[Trial], issues: list[Issue]) -> list[Group]:
    by_group: dict[tuple[str, str], dict[str, list[Trial]]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        by_group[(t.benchmark, t.scenario)][t.config_key].append(t)
    groups = []
    for (benchmark, scenario), by_config in sorted(by_group.items()):
        configs = [Config(key, runs) for key, runs in by_config.items()]
        _assign_labels(configs)
        configs.sort(key=_config_order)
        seeds = sorted({t.seed for c in configs for t in c.runs}, key=_seed_order)
        group = Group(benchmark, scenario, [], seeds)
        _select_runs(group.title, configs, seeds, issues)
        group.configs = [c for c in configs if c.by_seed]
        if group.configs:
            _fill_values(group.configs)
            for col in COLUMNS:
                for key, cell in _mark_column(group.configs, col).items():
                    group.cells[(key, col.key)] = cell
            groups.append(group)
    return groups


# ---------------------------------------------------------------------------------------------
# Budget


def _fmt_flops(x: float) -> str:
    return f"{x / 1e9:.3g} GFLOP"


def _fmt_bytes(x: float) -> str:
    return f"{x / 1e6:.3g} MB"


def _choose_under_budget(group: Group, budgets: dict) -> Budget:
    """Highest mean ACC among configurations whose mean compute and storage fit the budgets."""
    flops = {c.key: c.summary("train_flops")[0] for c in group.configs}
    storage = {c.key: c.summary("storage_bytes")[0] for c in group.configs}

    def limit(name: str, costs: dict[str, float]) -> tuple[float, str]:
        if budgets.get(name) is not None:
            return float(budgets[name]), "given"
        finite = [v for v in costs.values() if math.isfinite(v)]
        return (float(np.median(finite)) if finite else math.nan), "median of the configurations"

    max_flops, flops_src = limit("compute_flops", flops)
    max_storage, storage_src = limit("storage_bytes", storage)
    fits = [c for c in group.configs if flops[c.key] <= max_flops and storage[c.key] <= max_storage
            and math.isfinite(c.summary("acc")[0])]
    text = (f"Compute budget {_fmt_flops(max_flops)} ({flops_src}), storage budget "
            f"{_fmt_bytes(max_storage)} ({storage_src}; replay + strategy state + model): ")
    if not fits:
        return Budget(text + "no configuration fits both budgets.")
    best = max(fits, key=lambda c: (c.summary("acc")[0], -flops[c.key]))
    acc, hw = best.summary("acc")
    ci = f" ± {hw:.3f}" if math.isfinite(hw) else ""
    partial = len(best.by_seed) < len(group.seeds)
    detail = (f": ACC {acc:.3f}{ci}, {_fmt_flops(flops[best.key])}, {_fmt_bytes(storage[best.key])}"
              + (f" (only {len(best.by_seed)} of {len(group.seeds)} seeds finished)." if partial else "."))
    return Budget(text + "the most accurate configuration that fits is ", best, detail)


# ---------------------------------------------------------------------------------------------
# Figures


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _series(configs: list[Config], key: str, scale: float = 1.0) -> plots.Series:
    sums = [c.summary(key) for c in configs]
    return [m * scale for m, _ in sums], [h * scale for _, h in sums]


def _mean_matrices(configs: list[Config]) -> list[tuple[str, np.ndarray, list[str]]]:
    mats = []
    for c in configs:
        ms = [t.matrix for t in c.by_seed.values() if t.matrix is not None]
        shapes = Counter(m.r.shape for m in ms)
        if shapes:  # seeds with another shape (a broken run) cannot be averaged in
            shape = shapes.most_common(1)[0][0]
            same = [m for m in ms if m.r.shape == shape]
            mats.append((c.label, np.mean([m.r for m in same], axis=0), same[0].names))
    return mats


def _draw(group: Group, out_dir: Path) -> None:
    base = _slug(f"{group.benchmark}-{group.scenario}")
    cfgs = group.configs

    def add(name: str, title: str, fig) -> None:
        path = out_dir / f"{base}-{name}.png"
        png = plots.png_bytes(fig)
        path.write_bytes(png)
        group.images.append(Image(path, title, png))

    add("tradeoff", "Accuracy and forgetting vs training compute and storage (Pareto front dashed)",
        plots.tradeoff_figure(
            [c.label for c in cfgs],
            {"training GFLOP": _series(cfgs, "train_flops", 1e-9),
             "storage MB (replay + strategy state + model)": _series(cfgs, "storage_bytes", 1e-6)},
            {"ACC": (_series(cfgs, "acc"), True), "forgetting": (_series(cfgs, "forgetting"), False)}))
    mats = _mean_matrices(cfgs)
    if mats:
        add("matrices", "Accuracy matrices (mean over seeds)", plots.heatmap_figure(mats))
        add("stream", "Accuracy on each experience over the stream (mean over seeds)", plots.stream_figure(mats))
    by_strategy: dict[str, list[Config]] = defaultdict(list)
    for c in cfgs:
        by_strategy[c.strategy].append(c)
    for strategy, group_cfgs in by_strategy.items():
        if len(group_cfgs) > 1 and len(group_cfgs[0].varying) == 1:
            (param,) = group_cfgs[0].varying
            ordered = sorted(group_cfgs, key=lambda c: _value_order(c.varying[param]))
            add(f"sensitivity-{_slug(strategy)}", f"Sensitivity of {strategy} to {_short(param)}",
                plots.sensitivity_figure(strategy, _short(param), [c.varying[param] for c in ordered],
                                         _series(ordered, "acc")))


# ---------------------------------------------------------------------------------------------
# Rendering

MARK_TEXT = {"best": "★", "tie": "≈", "n/a": "n/a", "": ""}
LEGEND = ("Mean ± 95% CI over seeds (Student t). ★ best in the column; ≈ not significantly different "
          "from the best (paired t-test over matching seeds, p ≥ 0.05); n/a: fewer than 2 paired seeds, "
          "no test. Higher is better for ACC, BWT, FWT, LA; lower for forgetting, intransigence "
          "and costs. Intransigence is against the group's joint strategy. ⚠: seeds missing, "
          "see Missing or failed runs.")


def _cell_text(col: Column, cell: Cell) -> str:
    text = col.fmt(cell.mean)
    if math.isfinite(cell.mean) and math.isfinite(cell.hw):
        text += " ± " + col.fmt(cell.hw)
    mark = MARK_TEXT[cell.mark]
    return f"{text} {mark}" if mark else text


def _seeds_text(group: Group, c: Config) -> str:
    n = len(c.by_seed)
    return f"{n}/{len(group.seeds)}" + (" ⚠" if n < len(group.seeds) else "")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(group: Group) -> list[str]:
    header = ["configuration", "seeds"] + [c.header for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in group.configs:
        cells = [_cell_text(col, group.cells[(c.key, col.key)]) for col in COLUMNS]
        lines.append("| " + " | ".join([_md_escape(c.label), _seeds_text(group, c)] + cells) + " |")
    return lines


def _html_table(group: Group) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["configuration", "seeds"] + [c.header for c in COLUMNS])
    rows = []
    for c in group.configs:
        tds = [f"<td class='label'>{html.escape(c.label)}</td>", f"<td>{_seeds_text(group, c)}</td>"]
        for col in COLUMNS:
            cell = group.cells[(c.key, col.key)]
            tip = f" title='paired t-test vs best: p = {cell.p:.3g}'" if cell.p is not None else ""
            css = {"best": "best", "tie": "tie"}.get(cell.mark, "")
            tds.append(f"<td class='{css}'{tip}>{html.escape(_cell_text(col, cell))}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


def _budget_text(budget: Budget, bold: Callable[[str], str], escape: Callable[[str], str]) -> str:
    if budget.best is None:
        return escape(budget.text)
    return escape(budget.text) + bold(escape(budget.best.label)) + escape(budget.detail)


def _issue_rows(issues: list[Issue]) -> list[list[str]]:
    return [[i.group, i.label, i.seed, i.run_id, i.problem] for i in issues]


ISSUE_HEADER = ["group", "configuration", "seed", "run id", "problem"]


def _header_text(experiment: str, parent: Run | None, n_runs: int, n_finished: int) -> str:
    source = (f"sweep {parent.data.tags.get('clgrid.sweep_id', '?')} (parent run {parent.info.run_id})"
              if parent else "all trial runs (no sweep parent run)")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Experiment {experiment}, {source}: {n_finished} of {n_runs} trial runs finished. Generated {when}."


def _render_md(experiment: str, intro: str, groups: list[Group], issues: list[Issue]) -> str:
    out = [f"# Cost-vs-forgetting report: {experiment}", "", intro, "", LEGEND, ""]
    for g in groups:
        out += [f"## {g.title}", "", *_md_table(g), "", "### Best under a budget", "",
                _budget_text(g.budget, lambda s: f"**{s}**", _md_escape), ""]
        out += [line for img in g.images for line in (f"### {img.title}", "", f"![{img.title}]({img.path.name})", "")]
    out += ["## Missing or failed runs", ""]
    if issues:
        out += ["| " + " | ".join(ISSUE_HEADER) + " |", "|" + "---|" * len(ISSUE_HEADER)]
        out += ["| " + " | ".join(_md_escape(x) for x in row) + " |" for row in _issue_rows(issues)]
    else:
        out.append("None: every configuration finished on every seed.")
    return "\n".join(out) + "\n"


CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td.label { text-align: left; }
td.best { background: #b9e4b9; font-weight: bold; }
td.tie { background: #e3f4e3; }
img { max-width: 100%; border: 1px solid #eee; }
.warn { color: #a33; }
"""


def _render_html(experiment: str, intro: str, groups: list[Group], issues: list[Issue]) -> str:
    e = html.escape
    body = [f"<h1>Cost-vs-forgetting report: {e(experiment)}</h1>", f"<p>{e(intro)}</p>"]
    if issues:
        body.append(f"<p class='warn'>{len(issues)} missing or failed run(s): "
                    "see <a href='#missing'>Missing or failed runs</a>.</p>")
    body.append(f"<p><small>{e(LEGEND)}</small></p>")
    for g in groups:
        body += [f"<h2>{e(g.title)}</h2>", _html_table(g), "<h3>Best under a budget</h3>",
                 f"<p>{_budget_text(g.budget, lambda s: f'<strong>{s}</strong>', e)}</p>"]
        for img in g.images:
            data = base64.b64encode(img.png).decode("ascii")
            body += [f"<h3>{e(img.title)}</h3>", f"<img alt='{e(img.title)}' src='data:image/png;base64,{data}'>"]
    body.append("<h2 id='missing'>Missing or failed runs</h2>")
    if issues:
        rows = "".join("<tr>" + "".join(f"<td class='label'>{e(x)}</td>" for x in row) + "</tr>"
                       for row in _issue_rows(issues))
        head = "".join(f"<th>{h}</th>" for h in ISSUE_HEADER)
        body.append(f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")
    else:
        body.append("<p>None: every configuration finished on every seed.</p>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>clgrid report: {e(experiment)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------
# Entry point


def _read_trials(client: MlflowClient, experiment: str, sweep_id: str | None) -> tuple[Run | None, list[Trial]]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no MLflow experiment named {experiment!r} at this tracking URI")
    parent = _find_sweep(client, exp.experiment_id, experiment, sweep_id)
    runs = _trial_runs(client, exp.experiment_id, parent)
    with tempfile.TemporaryDirectory(prefix="clgrid-report-") as tmp:
        trials = [_trial(client, run, Path(tmp)) for run in runs]
    return parent, trials


def _check_finished(experiment: str, parent: Run | None, trials: Iterable[Trial]) -> None:
    statuses = Counter(t.status for t in trials)
    if statuses[FINISHED]:
        return
    where = f"sweep {parent.data.tags.get('clgrid.sweep_id')!r} of " if parent else ""
    found = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no trial runs"
    raise ReportError(f"{where}experiment {experiment!r} has no finished trial runs ({found}); "
                      "nothing to report. Wait for the sweep, resume it, or pass another sweep id.")


def build_report(experiment: str, tracking_uri: str, out_dir: Path, budgets: dict | None = None,
                 sweep_id: str | None = None) -> ReportResult:
    """Write report.html (self-contained), report.md and its PNGs to `out_dir`.

    Reads the latest sweep of `experiment` (or `sweep_id`), and logs the files under `report/`
    of the sweep's parent run when there is one. `budgets` may hold `compute_flops` and
    `storage_bytes`; a missing one defaults to the median cost of the group's configurations.
    Raises ReportError when there is nothing finished to report on.
    """
    budgets = dict(budgets or {})
    if unknown := set(budgets) - set(BUDGET_KEYS):
        raise ReportError(f"unknown budget keys {sorted(unknown)}; expected {', '.join(BUDGET_KEYS)}")
    client = MlflowClient(tracking_uri)
    parent, trials = _read_trials(client, experiment, sweep_id)
    _check_finished(experiment, parent, trials)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    issues: list[Issue] = []
    groups = _build_groups(trials, issues)
    for g in groups:
        g.budget = _choose_under_budget(g, budgets)
        _draw(g, out_dir)
    n_finished = sum(t.status == FINISHED for t in trials)
    intro = _header_text(experiment, parent, len(trials), n_finished)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(_render_html(experiment, intro, groups, issues), encoding="utf-8")
    md_path.write_text(_render_md(experiment, intro, groups, issues), encoding="utf-8")
    images = tuple(img.path for g in groups for img in g.images)
    if parent is not None:
        for path in (html_path, md_path, *images):
            client.log_artifact(parent.info.run_id, str(path), ARTIFACT_DIR)
    return ReportResult(
        html=html_path, markdown=md_path, images=images,
        sweep_id=parent.data.tags.get("clgrid.sweep_id") if parent else None,
        parent_run_id=parent.info.run_id if parent else None,
        n_runs=len(trials), n_finished=n_finished,
        n_configs=sum(len(g.configs) for g in groups), n_issues=len(issues),
    )
