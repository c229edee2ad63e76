"""The table `clgrid run` and `clgrid resume` print when a sweep ends, in the report's conventions.

A configuration is labelled as the report labels it (aggregate.label_configs over the params
clgrid.tracking.flat_params logs to MLflow) and every value is a mean ± 95% Student-t CI over
seeds, formatted as the report's column. Imports no torch: the trials arrive as TrialSpecs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from clgrid.report.aggregate import COLUMN, label_configs
from clgrid.report.stats import summarize
from clgrid.sweep.layout import UNSYNCED, SweepDir
from clgrid.tracking.runs import flat_params

if TYPE_CHECKING:  # the driver imports Ray and the spec (torch)
    from clgrid.sweep.driver import SweepOutcome, TrialOutcome

LEFT = ("benchmark", "scenario", "strategy")
METRICS = {"acc": "acc", "forgetting": "forgetting", "bwt": "bwt", "train_seconds": "train s"}  # key -> header


def rows(trials: list[TrialOutcome]) -> list[list[str]]:
    """One row per configuration, in the report's order: benchmark, scenario, label, finished/all
    seeds, then each of METRICS over the finished seeds."""
    groups: dict[tuple[str, str], dict[str, list[TrialOutcome]]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        groups[(t.trial.benchmark.id, t.trial.benchmark.scenario)][t.trial.config_key].append(t)
    out = []
    for (benchmark, scenario), by_config in sorted(groups.items()):
        labels = label_configs({key: (ts[0].trial.strategy.name, [flat_params(t.trial) for t in ts])
                                for key, ts in by_config.items()})
        for key, label in labels.items():
            done = [t.result["metrics"] for t in by_config[key] if t.result is not None]
            cells = [COLUMN[k].mean_ci(*summarize(r[k] for r in done)) for k in METRICS]
            out.append([benchmark, scenario, label.text, f"{len(done)}/{len(by_config[key])}", *cells])
    return out


def print_summary(outcome: SweepOutcome) -> None:
    """The table, the failed trials, and where to go next (clgrid sync, the MLflow UI)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{outcome.experiment} (sweep {outcome.sweep_id})")
    for header in (*LEFT, "seeds", *METRICS.values()):
        table.add_column(header, justify="left" if header in LEFT else "right")
    for row in rows(outcome.trials):
        table.add_row(*map(Text, row))  # Text: a label such as "mlp (hidden=[64])" is not rich markup
    console = Console(width=140)
    console.print(table)
    ray = SweepDir(outcome.sweep_dir).ray
    for t in outcome.failed:
        console.print(f"[red]failed[/red]: {t.trial.label} (MLflow run {t.run_id}); see {ray}")
    if outcome.unsynced:
        print(f"The tracking server did not get everything: {len(outcome.unsynced)} folder(s) keep the rest "
              f"({UNSYNCED}). Once it answers, run:  clgrid sync {outcome.sweep_dir}", flush=True)
    console.print(f"Open the runs in the MLflow UI:  mlflow ui --backend-store-uri {outcome.tracking_uri}"
                  if not outcome.tracking_uri.startswith("http") else f"Runs are at {outcome.tracking_uri}")
