"""Trials -> per (benchmark, scenario) group: labelled configurations, marked cells, the budget's pick.

The summary metrics are recomputed (clgrid.train.metrics) from each run's accuracy matrix so that
every column, including intransigence against the group's `joint` reference, comes from one
source; the logged metrics are the fallback when the artifact is missing or malformed. Costs are
the logged metrics. Every value is a mean ± 95% Student-t CI over seeds (stats.summarize).

Nothing that chooses reads test data when the runs have a validation split: the marks of an accuracy
column and the budget's pick compare the validation metric (`val_acc`, ...), the cells still show the
test one. Tuning runs (phase `tune`) are no rows: they go to the group's `tuning` (report.tuning)
and their cost, logged on the final runs, to the tuning and total cost columns.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from clgrid.report.collect import FINISHED, Trial
from clgrid.report.stats import ALPHA, holm, paired_p_value, summarize
from clgrid.tracking.runs import flat_params
from clgrid.tracking.schema import TUNE
from clgrid.train import metrics

T = TypeVar("T")

JOINT = "joint"
STORAGE_PARTS = ("replay_bytes", "strategy_state_bytes", "model_bytes")
BUDGET_KEYS = ("compute_flops", "storage_bytes")
# Accuracy columns with a validation counterpart `val_<key>` (clgrid.train.metrics.validation).
VALIDATED = ("acc", "forgetting", "bwt", "fwt", "learning_acc")


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    higher_is_better: bool
    scale: float | None = None  # costs: multiplier to the header's unit; None: a [0, 1] metric
    optional: bool = False  # shown only in groups where some run has it

    def fmt(self, v: float) -> str:
        if not math.isfinite(v):
            return "—"
        if self.scale is None:
            text = f"{v:.3f}"
        else:  # 3 significant digits, without switching to 1.1e+03 for large values
            text = f"{v * self.scale:.3g}" if abs(v * self.scale) < 1000 else f"{v * self.scale:.0f}"
        return text.removeprefix("-") if float(text) == 0 else text  # no "-0.000"

    def mean_ci(self, mean: float, hw: float) -> str:
        """"mean ± CI half-width", or the mean alone when there is no spread to show."""
        text = self.fmt(mean)
        return text + " ± " + self.fmt(hw) if math.isfinite(mean) and math.isfinite(hw) else text


COLUMNS = (
    Column("acc", "ACC", True),
    Column("val_acc", "val ACC", True, optional=True),
    Column("forgetting", "forgetting", False),
    Column("bwt", "BWT", True),
    Column("fwt", "FWT", True),
    Column("learning_acc", "LA", True),
    Column("intransigence", "intransigence", False),
    # continual evaluation (issue 15; clgrid.train.metrics formulas, docs/design.md)
    Column("min_acc", "min-ACC", True, optional=True),
    Column("wc_acc", "WC-ACC", True, optional=True),
    Column("a_auc", "A_AUC", True, optional=True),
    Column("stability_gap", "stability gap", False, optional=True),
    Column("train_flops", "train GFLOP", False, 1e-9),
    Column("train_seconds", "train s", False, 1.0),
    Column("device_seconds", "device s", False, 1.0),
    Column("peak_memory_bytes", "peak memory MB", False, 1e-6),
    Column("replay_bytes", "replay MB", False, 1e-6),
    Column("model_bytes", "model MB", False, 1e-6),
    Column("strategy_state_bytes", "strategy state MB", False, 1e-6),
    Column("eval_seconds", "eval s", False, 1.0, optional=True),
    # tune-then-test sweeps: the tuning runs' sums, and tuning + this one final run
    Column("tuning_train_flops", "tuning GFLOP", False, 1e-9, optional=True),
    Column("tuning_device_seconds", "tuning device s", False, 1.0, optional=True),
    Column("total_flops", "total GFLOP", False, 1e-9, optional=True),
)
COLUMN = {c.key: c for c in COLUMNS}
SHOWN_WITH = {"total_flops": "tuning_train_flops"}  # an optional column shown when another has values
VALUE_KEYS = (*COLUMN, "storage_bytes", *(v for k in VALIDATED if (v := f"{metrics.VAL_PREFIX}{k}") not in COLUMN))


# ---------------------------------------------------------------------------------------------
# Labels: shared with the CLI's end-of-run table (clgrid.report.console)


@dataclass(frozen=True)
class Label:
    text: str
    varying: dict[str, str]  # the parameters the grid varies among the strategy's configurations


def label_trials(trials: Iterable[T], spec_of: Callable[[T], Any]) -> list[tuple[str, str, list[tuple[Label, list[T]]]]]:
    """Trials grouped as the report groups runs, for the CLI's table and the MLflow run names:
    (benchmark, scenario, [(label, the configuration's trials) in table order]) per group, sorted.
    ``spec_of(item)`` is the item's TrialSpec (labels come from its flat_params, as in MLflow)."""
    groups: dict[tuple[str, str], dict[str, list[T]]] = defaultdict(lambda: defaultdict(list))
    for item in trials:
        trial = spec_of(item)
        groups[(trial.benchmark.id, trial.benchmark.scenario)][trial.config_key].append(item)
    out = []
    for (benchmark, scenario), by_config in sorted(groups.items()):
        labels = label_configs({key: (spec_of(items[0]).strategy.name, [flat_params(spec_of(i)) for i in items])
                                for key, items in by_config.items()})
        out.append((benchmark, scenario, [(label, by_config[key]) for key, label in labels.items()]))
    return out


def label_configs(configs: Mapping[str, tuple[str, Sequence[Mapping[str, str]]]]) -> dict[str, Label]:
    """Labels of one group's configurations, in table order (by strategy, then varying values).

    `configs`: config key -> (strategy, the MLflow params of each of its runs, as
    clgrid.tracking.flat_params writes them). Label = strategy name + the parameters, constant
    within a configuration, that differ between that strategy's configurations. Configurations
    that would still share a label (they differ only in parameters that vary within one) get
    their key's first 8 characters.
    """
    constant = {key: _constant_params(runs) for key, (_, runs) in configs.items()}
    by_strategy: dict[str, list[str]] = defaultdict(list)
    for key, (strategy, _) in configs.items():
        by_strategy[strategy].append(key)
    labels = {}
    for strategy, keys in by_strategy.items():
        names = sorted({k for key in keys for k in constant[key]})
        varying = [k for k in names if len({constant[key].get(k) for key in keys}) > 1]
        for key in keys:
            values = {k: constant[key].get(k, "—") for k in varying}
            args = ", ".join(f"{short(k)}={readable(v)}" for k, v in values.items())
            labels[key] = Label(f"{strategy} ({args})" if args else strategy, values)
    counts = Counter(label.text for label in labels.values())
    labels = {key: Label(f"{label.text} [{key[:8]}]", label.varying) if counts[label.text] > 1 else label
              for key, label in labels.items()}

    def order(key: str) -> tuple:
        return configs[key][0], tuple(value_order(v) for v in labels[key].varying.values())

    return {key: labels[key] for key in sorted(configs, key=order)}


def _constant_params(runs: Sequence[Mapping[str, str]]) -> dict[str, str]:
    first = runs[0]
    return {k: v for k, v in first.items() if k != "seed" and all(r.get(k) == v for r in runs)}


def short(key: str) -> str:
    """A parameter's name in labels and figures: strategy hyperparameters without their section."""
    return key.removeprefix("strategy.")


def readable(v: str) -> str:
    """A value as labels show it: a number with more than 6 digits (a random search samples
    833.6105173474732) at 4 significant digits; anything else as it is."""
    if sum(c.isdigit() for c in v) <= 6:
        return v
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return v


def value_order(v: str) -> tuple:
    """Numbers by value, then anything else by text."""
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


# ---------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class Config:
    """One strategy configuration (config_key) with at least one finished run."""

    key: str
    strategy: str
    label: str
    varying: dict[str, str]
    by_seed: dict[str, Trial]  # the finished run used per seed
    values: dict[str, dict[str, float]]  # column (and storage_bytes) -> seed -> value

    def summary(self, key: str) -> tuple[float, float]:
        return summarize(self.values.get(key, {}).values())


@dataclass(frozen=True)
class Cell:
    mean: float
    hw: float
    mark: str  # "best", "tie" (not significantly worse), "n/a" (untestable) or ""
    p: float | None = None


@dataclass(frozen=True)
class Budget:
    text: str  # the budgets, and the verdict when nothing fits
    best: Config | None = None
    detail: str = ""  # what follows the chosen configuration's label


@dataclass(frozen=True)
class Group:
    benchmark: str
    scenario: str
    configs: list[Config]  # in table order
    seeds: list[str]
    cells: dict[tuple[str, str], Cell]  # (config key, column key) -> cell
    budget: Budget
    columns: list[Column]  # COLUMNS without the optional ones no run of the group has
    by_validation: bool  # the marks of accuracy columns and the budget's pick compare validation metrics
    tuning: list[Trial]  # the group's tuning runs (phase tune), finished or not

    @property
    def title(self) -> str:
        return f"{self.benchmark} / {self.scenario}"

    @property
    def trials(self) -> list[Trial]:
        """The runs behind the table's rows."""
        return [t for c in self.configs for t in c.by_seed.values()]


@dataclass(frozen=True)
class Issue:
    group: str
    label: str
    seed: str
    run_id: str
    problem: str


def aggregate(trials: list[Trial], budgets: Mapping[str, float | None]) -> tuple[list[Group], list[Issue]]:
    """The groups with at least one finished run, and every run not averaged or seed missing."""
    by_group: dict[tuple[str, str], dict[str, list[Trial]]] = defaultdict(lambda: defaultdict(list))
    tuning: dict[tuple[str, str], list[Trial]] = defaultdict(list)
    for t in trials:
        if t.phase == TUNE:
            tuning[(t.benchmark, t.scenario)].append(t)
        else:
            by_group[(t.benchmark, t.scenario)][t.config_key].append(t)
    groups, issues = [], []
    for (benchmark, scenario), by_config in sorted(by_group.items()):
        group, found = _group(benchmark, scenario, by_config, budgets, tuning[(benchmark, scenario)])
        issues += found
        if group is not None:
            groups.append(group)
    return groups, issues


def _group(benchmark: str, scenario: str, by_config: dict[str, list[Trial]],
           budgets: Mapping[str, float | None], tuning: list[Trial]) -> tuple[Group | None, list[Issue]]:
    title = f"{benchmark} / {scenario}"
    labels = label_configs({key: (runs[0].strategy, [t.params for t in runs]) for key, runs in by_config.items()})
    seeds = sorted({t.seed for runs in by_config.values() for t in runs}, key=_seed_order)
    chosen, issues = {}, []
    for key, label in labels.items():
        by_seed, found = _select_runs(title, label.text, by_config[key], seeds)
        issues += found
        if by_seed:
            chosen[key] = by_seed
    if not chosen:
        return None, issues
    strategy = {key: by_config[key][0].strategy for key in chosen}
    joint = _joint_reference([by_seed for key, by_seed in chosen.items() if strategy[key] == JOINT])
    configs = [Config(key, strategy[key], labels[key].text, labels[key].varying, by_seed, _values(by_seed, joint))
               for key, by_seed in chosen.items()]
    by_validation = all(math.isfinite(c.summary("val_acc")[0]) for c in configs)
    columns = [col for col in COLUMNS if not col.optional
               or any(math.isfinite(v) for c in configs for v in c.values[SHOWN_WITH.get(col.key, col.key)].values())]
    cells = {(key, col.key): cell for col in columns
             for key, cell in _column_cells(configs, col, by_validation).items()}
    budget = _choose_under_budget(configs, seeds, budgets, by_validation)
    return Group(benchmark, scenario, configs, seeds, cells, budget, columns, by_validation, tuning), issues


def _seed_order(seed: str) -> tuple:
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)


def _select_runs(title: str, label: str, runs: list[Trial], seeds: list[str]) -> tuple[dict[str, Trial], list[Issue]]:
    """One finished run per seed (the last to end), and what is not averaged or incomplete."""
    issues = [Issue(title, label, t.seed, t.run_id, f"status {t.status}: not averaged")
              for t in runs if t.status != FINISHED]
    by_seed: dict[str, Trial] = {}
    for t in sorted((t for t in runs if t.status == FINISHED), key=lambda t: t.end_time):
        if t.seed in by_seed:
            issues.append(Issue(title, label, t.seed, by_seed[t.seed].run_id,
                                f"duplicate finished run: superseded by {t.run_id}"))
        by_seed[t.seed] = t
    issues += [Issue(title, label, t.seed, t.run_id, t.matrix_problem) for t in by_seed.values() if t.matrix_problem]
    missing = [s for s in seeds if s not in by_seed]
    if missing and by_seed:
        issues.append(Issue(title, label, ", ".join(missing), "",
                            f"no finished run for these seeds: mean over {len(by_seed)} of {len(seeds)} seeds"))
    elif missing:
        issues.append(Issue(title, label, ", ".join(missing), "", "no finished run: left out of the tables"))
    return by_seed, issues


def _joint_reference(joints: list[dict[str, Trial]]) -> np.ndarray | None:
    """Mean accuracy matrix of the group's joint strategy (the most accurate one if several)."""
    joints = [by_seed for by_seed in joints if any(t.matrix for t in by_seed.values())]
    if not joints:
        return None
    best = max(joints, key=lambda by_seed: np.nan_to_num(
        summarize(trial_values(t, None)["acc"] for t in by_seed.values())[0], nan=-1.0))
    mats = [t.matrix.r for t in best.values() if t.matrix]
    return np.mean(mats, axis=0) if len({m.shape for m in mats}) == 1 else None


def _values(by_seed: dict[str, Trial], joint: np.ndarray | None) -> dict[str, dict[str, float]]:
    per_seed = {s: trial_values(t, joint) for s, t in by_seed.items()}
    return {k: {s: v[k] for s, v in per_seed.items()} for k in VALUE_KEYS}


def trial_values(t: Trial, joint: np.ndarray | None) -> dict[str, float]:
    vals = {key: t.metrics.get(key, math.nan) for key in VALUE_KEYS}
    if t.matrix is not None:
        vals.update(t.matrix.summary)
        if joint is not None and joint.shape == t.matrix.r.shape:
            vals["intransigence"] = metrics.intransigence(t.matrix.r, joint)
    # An absent storage component is taken as zero bytes (e.g. no replay buffer).
    vals["storage_bytes"] = float(sum(t.metrics.get(k, 0.0) for k in STORAGE_PARTS))
    # Without a tune phase (or a strategy with nothing tuned) the total is the run's own compute.
    vals["total_flops"] = vals["train_flops"] + t.metrics.get("tuning_train_flops", 0.0)
    return vals


def _column_cells(configs: list[Config], col: Column, by_validation: bool) -> dict[str, Cell]:
    """Cells of one column: best mean marked, others tested against it (paired over seeds, Holm-corrected
    over the column's tests). An accuracy column is judged on its validation metric when every row has
    one (`by_validation`): its cells show test values, its marks never read them."""
    judged = f"{metrics.VAL_PREFIX}{col.key}" if by_validation and col.key in VALIDATED else col.key
    sums = {c.key: c.summary(col.key) for c in configs}
    score = {c.key: c.summary(judged)[0] for c in configs}
    finite = [c for c in configs if math.isfinite(sums[c.key][0]) and math.isfinite(score[c.key])]
    if not finite:
        return {key: Cell(mean, hw, "") for key, (mean, hw) in sums.items()}
    target = (max if col.higher_is_better else min)(score[c.key] for c in finite)
    best = [c for c in finite if math.isclose(score[c.key], target, rel_tol=1e-12, abs_tol=1e-15)]
    best_keys = {c.key for c in best}
    raw = {c.key: paired_p_value(c.values[judged], best[0].values[judged]) for c in finite if c.key not in best_keys}
    adjusted = holm({k: p for k, p in raw.items() if p is not None})

    def cell(c: Config) -> Cell:
        mean, hw = sums[c.key]
        if c.key in best_keys:
            return Cell(mean, hw, "best")
        if c.key not in raw:
            return Cell(mean, hw, "")
        p = adjusted.get(c.key)
        return Cell(mean, hw, "n/a" if p is None else ("tie" if p >= ALPHA else ""), p)

    return {c.key: cell(c) for c in configs}


# ---------------------------------------------------------------------------------------------
# Budget


def fmt_flops(x: float) -> str:
    return f"{x / 1e9:.3g} GFLOP"


def fmt_bytes(x: float) -> str:
    return f"{x / 1e6:.3g} MB"


def _choose_under_budget(configs: list[Config], seeds: list[str], budgets: Mapping[str, float | None],
                         by_validation: bool) -> Budget:
    """Highest mean validation accuracy (test ACC without a validation split, and the text says so)
    among configurations whose mean compute (tuning + final) and storage fit the budgets.

    A budget not given defaults to the median cost of the group's configurations."""
    tuned = any(math.isfinite(v) for c in configs for v in c.values["tuning_train_flops"].values())
    flops = {c.key: c.summary("total_flops")[0] for c in configs}
    storage = {c.key: c.summary("storage_bytes")[0] for c in configs}

    def limit(name: str, costs: dict[str, float]) -> tuple[float, str]:
        if budgets.get(name) is not None:
            return float(budgets[name]), "given"
        finite = [v for v in costs.values() if math.isfinite(v)]
        return (float(np.median(finite)) if finite else math.nan), "median of the configurations"

    max_flops, flops_src = limit("compute_flops", flops)
    max_storage, storage_src = limit("storage_bytes", storage)
    fits = [c for c in configs if flops[c.key] <= max_flops and storage[c.key] <= max_storage
            and math.isfinite(c.summary("acc")[0])]
    compute = "tuning + final" if tuned else ""
    text = (f"Compute budget {fmt_flops(max_flops)} ({', '.join(filter(None, [flops_src, compute]))}), storage budget "
            f"{fmt_bytes(max_storage)} ({storage_src}; replay + strategy state + model): ")
    if not fits:
        return Budget(text + "no configuration fits both budgets.")
    best = max(fits, key=lambda c: (c.summary("val_acc" if by_validation else "acc")[0], -flops[c.key]))
    acc, hw = best.summary("acc")
    ci = f" ± {hw:.3f}" if math.isfinite(hw) else ""
    partial = len(best.by_seed) < len(seeds)
    how = (" Picked by mean validation accuracy; the ACC shown is on the test set." if by_validation else
           " Picked by test accuracy: no validation split ran, so this pick has seen the test set.")
    detail = (f": ACC {acc:.3f}{ci}, {fmt_flops(flops[best.key])}{' in total' if tuned else ''}, "
              f"{fmt_bytes(storage[best.key])}"
              + (f" (only {len(best.by_seed)} of {len(seeds)} seeds finished)." if partial else ".") + how)
    return Budget(text + "the most accurate configuration that fits is ", best, detail)
