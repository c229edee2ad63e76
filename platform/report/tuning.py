"""What tuning on test would have said (issue 14): how optimistic test-set tuning is.

Per strategy, among its configurations that finished on every tuning seed (as the protocol
requires: ASHA stops some after fewer seeds, and a mean over fewer seeds is not comparable), from
their tuning runs (which record test metrics for this comparison only): the configuration the
validation metric picked (the one the final runs name in `clgrid.selected_from`,
else the best mean `val_acc` over the tuning seeds, the protocol's rule) against the one the best
mean test accuracy would have picked, each with its mean test accuracy over the tuning seeds; then
the strategies ranked as a paper tuned on test would report them (the test pick's accuracy) and as
this sweep reports them (the final runs' accuracy), with Kendall's tau between the two rankings.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from clgrid.report.aggregate import Group, label_configs, trial_values
from clgrid.report.collect import FINISHED, Trial
from clgrid.report.stats import summarize
from clgrid.tracking.schema import SELECTED_FROM, TUNE_ENTRY


@dataclass(frozen=True)
class Pick:
    label: str  # the configuration's label among the strategy's tuning configurations
    tuning_acc: float  # its mean test accuracy over the tuning seeds


@dataclass(frozen=True)
class StrategyPicks:
    strategy: str
    n_configs: int  # configurations with a finished tuning run on every tuning seed
    n_runs: int  # tuning runs, finished or not
    n_finished: int
    by_validation: Pick | None  # None: no final run names its tuning runs and none has val_acc
    by_test: Pick
    final_acc: tuple[float, float]  # the final runs' mean test ACC ± CI (NaN without final runs)

    @property
    def optimism(self) -> float:
        """How much higher test-set tuning reports this strategy than the validation pick scores."""
        return self.by_test.tuning_acc - self.by_validation.tuning_acc if self.by_validation else math.nan

    @property
    def reported(self) -> float:
        """The strategy's accuracy as this sweep reports it: its final runs, else the validation pick's."""
        if math.isfinite(self.final_acc[0]) or self.by_validation is None:
            return self.final_acc[0]
        return self.by_validation.tuning_acc


@dataclass(frozen=True)
class Comparison:
    strategies: list[StrategyPicks]  # by strategy name
    by_validation: list[str]  # strategies ranked best first by what this sweep reports
    by_test: list[str]  # ... and by what tuning on test would have reported
    tau: float  # Kendall's tau between the two rankings (NaN with fewer than 2 strategies)
    p: float


def compare(group: Group) -> Comparison | None:
    """The comparison of the group's tuning runs; None when the sweep had no tune phase."""
    finished = [t for t in group.tuning if t.status == FINISHED and math.isfinite(_acc(t))]
    if not finished:
        return None
    entries: dict[tuple[str, str], dict[str, list[Trial]]] = defaultdict(lambda: defaultdict(list))
    for t in finished:
        entries[(t.strategy, t.tags.get(TUNE_ENTRY, ""))][t.config_key].append(t)
    names = _entry_names(entries)
    picks = [_picks(group, names[entry], entry, configs) for entry, configs in sorted(entries.items())]
    ranked = [p for p in picks if math.isfinite(p.reported)]
    by_validation = [p.strategy for p in sorted(ranked, key=lambda p: -p.reported)]
    by_test = [p.strategy for p in sorted(ranked, key=lambda p: -p.by_test.tuning_acc)]
    tau, p_value = math.nan, math.nan
    if len(ranked) >= 2:
        from scipy.stats import kendalltau  # imported only for a tuned sweep: half a second

        result = kendalltau([p.reported for p in ranked], [p.by_test.tuning_acc for p in ranked])
        tau, p_value = float(result.statistic), float(result.pvalue)
    return Comparison(picks, by_validation, by_test, tau, p_value)


def _acc(t: Trial) -> float:
    return trial_values(t, None)["acc"]


def _entry_names(entries: dict[tuple[str, str], dict[str, list[Trial]]]) -> dict[tuple[str, str], str]:
    """A strategy's name, or, for a strategy the spec tunes in several entries (LwF's two
    distillations), the name with what is constant within each entry and differs between them."""
    labels = label_configs({f"{s}#{e}": (s, [t.params for runs in configs.values() for t in runs])
                            for (s, e), configs in entries.items()})
    return {(s, e): labels[f"{s}#{e}"].text for s, e in entries}


def _picks(group: Group, name: str, entry: tuple[str, str], configs: dict[str, list[Trial]]) -> StrategyPicks:
    strategy, index = entry

    def ours(t: Trial) -> bool:  # runs without the tag (older sweeps): one entry per strategy
        return t.strategy == strategy and t.tags.get(TUNE_ENTRY, "") == index

    labels = label_configs({key: (strategy, [t.params for t in runs]) for key, runs in configs.items()})
    test_acc = {key: summarize(_acc(t) for t in runs)[0] for key, runs in configs.items()}
    val_acc = {key: summarize(t.metrics.get("val_acc", math.nan) for t in runs)[0] for key, runs in configs.items()}
    seeds = {t.seed for t in group.tuning if ours(t)}
    order = [k for k in labels if {t.seed for t in configs[k]} >= seeds] or list(labels)  # ties: the first
    by_test = max(order, key=lambda k: (test_acc[k], -order.index(k)))
    finals = [c for c in group.configs if any(ours(t) for t in c.by_seed.values())]
    named = {rid for c in finals for t in c.by_seed.values() for rid in t.tags.get(SELECTED_FROM, "").split(",") if rid}
    selected = [key for key, runs in configs.items() if any(t.run_id in named for t in runs)]
    with_val = [k for k in order if math.isfinite(val_acc[k])]
    chosen = selected[0] if selected else max(with_val, key=lambda k: (val_acc[k], -order.index(k)), default=None)
    all_runs = [t for t in group.tuning if ours(t)]
    return StrategyPicks(
        strategy=name, n_configs=len(order), n_runs=len(all_runs),
        n_finished=sum(len(runs) for runs in configs.values()),
        by_validation=Pick(labels[chosen].text, test_acc[chosen]) if chosen else None,
        by_test=Pick(labels[by_test].text, test_acc[by_test]),
        final_acc=finals[0].summary("acc") if finals else (math.nan, math.nan),
    )

