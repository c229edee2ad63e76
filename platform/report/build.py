"""MLflow runs of a sweep -> cost-vs-forgetting report (self-contained HTML, Markdown, PNGs).

collect (MLflow) -> aggregate (configurations, marks, budgets) -> plots -> render; the files are
logged under `report/` of the sweep's parent run.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clgrid import fsio
from clgrid.report import plots, render
from clgrid.report.aggregate import BUDGET_KEYS, Group, Issue, aggregate
from clgrid.report.collect import ReportError, Sweep, collect
from clgrid.tracking.schema import REPORT_DIR, client, with_retries


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
    with _heap_frozen():
        sweep = collect(tracking_uri, experiment, sweep_id)
        groups, issues = aggregate(sweep.trials, budgets)
        html_path, md_path, images = _write(sweep, groups, issues, Path(out_dir))
        if sweep.parent_run_id is not None:
            c = client(tracking_uri)
            for path in (html_path, md_path, *images):
                with_retries(lambda: c.log_artifact(sweep.parent_run_id, str(path), REPORT_DIR))
    return ReportResult(
        html=html_path, markdown=md_path, images=images, sweep_id=sweep.sweep_id,
        parent_run_id=sweep.parent_run_id, n_runs=len(sweep.trials), n_finished=sweep.n_finished,
        n_configs=sum(len(g.configs) for g in groups), n_issues=len(issues),
    )


def _write(sweep: Sweep, groups: list[Group], issues: list[Issue],
           out_dir: Path) -> tuple[Path, Path, tuple[Path, ...]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [(g, plots.draw(g, out_dir)) for g in groups]
    intro = render.intro(sweep)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    # atomically: a reader (a browser, the MLflow upload, a concurrent `clgrid report`) sees a whole file
    fsio.atomic_write(html_path, render.html(sweep.experiment, intro, sections, issues).encode())
    fsio.atomic_write(md_path, render.markdown(sweep.experiment, intro, sections, issues).encode())
    return html_path, md_path, tuple(img.path for _, images in sections for img in images)


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Full collections skip what exists now: the figures' many allocations trigger several, and
    each would otherwise rescan every object that MLflow, matplotlib and scipy brought in (about a
    second of a 240-run report)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
