"""`clgrid report` imports no torch, and the end-of-sweep table speaks the report's language.

The store is written by the same helpers `clgrid run` uses (clgrid.tracking.start_sweep,
log_metrics, log_matrix, end_run) from real TrialSpecs, with made-up matrices.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_clgrid, tiny_spec

from clgrid import tracking
from clgrid.report import build_report
from clgrid.report.console import print_summary, rows
from clgrid.spec import PipelineSpec, expand
from clgrid.sweep.driver import SweepOutcome, TrialOutcome
from clgrid.train import metrics

STRATEGIES = [{"name": "ewc", "ewc_lambda": [10.0, 100.0]}, {"name": "naive"}, {"name": "joint"}]
SEEDS = [0, 1, 2]
FAILS = ("ewc", 100.0, 2)  # strategy, ewc_lambda, seed of the one trial that fails
TORCH_USERS = ("torch", "clgrid.spec", "clgrid.strategies", "clgrid.train.trainer")


def fails(trial) -> bool:
    return (trial.strategy.name, getattr(trial.strategy, "ewc_lambda", None), trial.seed) == FAILS


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished sweep: its MLflow store (through clgrid.tracking) and its SweepOutcome."""
    root = tmp_path_factory.mktemp("sweep")
    spec = PipelineSpec.model_validate(tiny_spec(STRATEGIES, seeds=SEEDS, storage={"root": str(root)}))
    trials, uri = expand(spec), spec.tracking_uri
    exp_id = tracking.experiment_id(uri, spec.experiment, str(root))
    parent, run_ids = tracking.start_sweep(uri, exp_id, "s1", spec.spec_hash, trials)
    rng = np.random.default_rng(0)
    outcomes = []
    for trial in trials:
        run_id = run_ids[trial.trial_key]
        if fails(trial):
            tracking.end_run(uri, run_id, "FAILED")
            outcomes.append(TrialOutcome(trial, run_id, None, "boom"))
            continue
        R = np.tril(rng.uniform(0.5, 1.0, (2, 2))).round(4).tolist()
        b = [0.1, 0.1]
        result = {"metrics": metrics.summary(R, b) | {"train_seconds": float(rng.uniform(1, 3))}, "R": R, "b": b}
        tracking.log_metrics(uri, run_id, 1, result["metrics"])
        tracking.log_matrix(uri, run_id, R, b, root / "matrices" / trial.trial_key)
        tracking.end_run(uri, run_id, "FINISHED")
        outcomes.append(TrialOutcome(trial, run_id, result))
    tracking.end_run(uri, parent, "FINISHED")
    sweep_dir = root / "sweeps" / "s1"
    return SweepOutcome("s1", sweep_dir, spec.experiment, uri, parent, outcomes, unsynced=[sweep_dir / "x"])


def imported(stderr: str) -> set[str]:
    """Module names from -X importtime's lines ("import time: self | cumulative | name")."""
    return {m.group(1) for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", stderr, re.MULTILINE)}


def test_clgrid_report_imports_no_torch(sweep, tmp_path):
    proc = run_clgrid("report", sweep.experiment, "--tracking-uri", sweep.tracking_uri, "--out", str(tmp_path),
                      env={"PYTHONPROFILEIMPORTTIME": "1"})  # -X importtime for the console script
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "report.html").exists()
    modules = imported(proc.stderr)
    assert "clgrid.report.collect" in modules  # the probe sees the report's own imports
    assert not modules & set(TORCH_USERS)


def test_the_console_table_imports_no_torch():
    code = f"import sys, clgrid.report.console; print([m for m in {TORCH_USERS!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_console_rows_match_the_report(sweep, tmp_path):
    """Same labels, same order, same ACC mean ± 95% CI as the report's table of the same runs."""
    report = build_report(sweep.experiment, sweep.tracking_uri, tmp_path).markdown.read_text()
    lines = [ln for ln in report.splitlines() if ln.startswith("| ")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    table = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[1:] if " | " in ln]
    table = table[: next(i for i, r in enumerate(table) if r[0] == "group")]  # before the missing-runs table
    acc = header.index("ACC")
    expected = [(r[0], r[acc].removesuffix("★").removesuffix("≈").removesuffix("n/a").strip()) for r in table]
    got = [(r[2], r[4]) for r in rows(sweep.trials)]
    assert got == expected
    assert [r[2] for r in rows(sweep.trials)] == [
        "ewc (ewc_lambda=10.0)", "ewc (ewc_lambda=100.0)", "joint", "naive"]
    assert [r[3] for r in rows(sweep.trials)] == ["3/3", "2/3", "3/3", "3/3"]


def test_print_summary(sweep, capsys):
    print_summary(sweep)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "ewc (ewc_lambda=100.0)" in out and " ± " in out
    (failed,) = [t for t in sweep.trials if fails(t.trial)]
    assert f"failed: {failed.trial.label} (MLflow run {failed.run_id}); see {sweep.sweep_dir / 'ray'}" in out
    assert f"clgrid sync {sweep.sweep_dir}" in out
    assert "mlflow ui" not in out  # the CLI prints the UI command once, after the table (test_mlflow_ui)
