"""The table `clgrid run` and `clgrid resume` print when a sweep ends, in the report's conventions.

A configuration is labelled as the report labels it (aggregate.label_configs over the params
clgrid.tracking.flat_params logs to MLflow) and every value is a mean ± 95% Student-t CI over
seeds, formatted as the report's column. Imports no torch: the trials arrive as TrialSpecs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clgrid.report.aggregate import COLUMN, label_trials
from clgrid.report.stats import summarize
from clgrid.sweep.layout import UNSYNCED, SweepDir

if TYPE_CHECKING:  # the driver imports Ray and the spec (torch)
    from clgrid.sweep.driver import SweepOutcome, TrialOutcome

LEFT = ("benchmark", "scenario", "strategy")
METRICS = {"acc": "acc", "forgetting": "forgetting", "bwt": "bwt", "train_seconds": "train s"}  # key -> header


def rows(trials: list[TrialOutcome]) -> list[list[str]]:
    """One row per configuration, in the report's order: benchmark, scenario, label, finished/all
    seeds, then each of METRICS over the finished seeds."""
    out = []
    for benchmark, scenario, configs in label_trials(trials, lambda t: t.trial):
        for label, outcomes in configs:
            done = [t.result["metrics"] for t in outcomes if t.result is not None]
            cells = [COLUMN[k].mean_ci(*summarize(r[k] for r in done)) for k in METRICS]
            out.append([benchmark, scenario, label.text, f"{len(done)}/{len(outcomes)}", *cells])
    return out


def print_summary(outcome: SweepOutcome) -> None:
    """The table, the failed trials, and clgrid sync when the tracking server missed something."""
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
