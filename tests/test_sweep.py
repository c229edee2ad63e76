"""End to end: `clgrid run` on a real local Ray instance with a real MLflow SQLite store."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import run_clgrid, tiny_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    spec = tiny_spec([{"name": "naive"}, {"name": "replay", "buffer_size": 40}], seeds=[0, 1], name="e2e")
    (root / "e2e.yaml").write_text(yaml.safe_dump(spec))
    proc = run_clgrid("run", "e2e.yaml", "--storage", str(root / "runs"), cwd=root)
    return root, proc


def test_run_prints_the_summary_table_and_the_ui_command(sweep) -> None:
    root, proc = sweep
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # rows labelled as in the report: by what varies in the grid (one replay configuration: "replay")
    report = (root / "runs" / "reports" / "e2e" / "report.md").read_text()
    rows = [line for line in proc.stdout.splitlines() if "split-digits" in line]
    assert [row.split()[5] for row in rows] == ["naive", "replay"], proc.stdout
    assert "| naive |" in report and "| replay |" in report
    assert all("2/2" in row for row in rows)  # seeds finished per row
    assert all(" ± " in row for row in rows)  # mean ± 95% CI over the two seeds
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'runs'}/mlflow.db" in proc.stdout


def test_one_child_run_per_trial_with_tags_params_metrics_and_artifacts(sweep) -> None:
    root, _ = sweep
    client = MlflowClient(f"sqlite:///{root / 'runs'}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("clgrid.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("clgrid.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["clgrid.trial_key"] for r in children}) == 4
    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["clgrid.benchmark"] == "split-digits" and tags["clgrid.scenario"] == "class-il"
        assert params["strategy.name"] == tags["clgrid.strategy"] and params["seed"] == tags["clgrid.seed"]
        for key in ("acc", "bwt", "fwt", "forgetting", "learning_acc", "train_flops", "train_seconds",
                    "device_seconds", "samples_seen", "peak_memory_bytes", "replay_bytes", "model_bytes",
                    "strategy_state_bytes"):
            assert key in metrics, key
        assert [m.step for m in client.get_metric_history(run.info.run_id, "acc")] == [0, 1]
        local = client.download_artifacts(run.info.run_id, "accuracy_matrix.json", str(root))
        matrix = json.loads(Path(local).read_text())
        assert len(matrix["R"]) == 2 and len(matrix["b"]) == 2
        assert metrics["acc"] == pytest.approx(sum(matrix["R"][-1]) / 2)
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"accuracy_matrix.json", "accuracy_matrix.png"} <= names
    replay_runs = [r for r in children if r.data.tags["clgrid.strategy"] == "replay"]
    assert all(r.data.metrics["replay_bytes"] > 0 for r in replay_runs)


def test_run_ends_with_a_report_whose_numbers_come_from_the_runs_matrices(sweep) -> None:
    root, proc = sweep
    report_dir = root / "runs" / "reports" / "e2e"
    assert f"{report_dir / 'report.html'}" in proc.stdout
    markdown = (report_dir / "report.md").read_text()
    client = MlflowClient(f"sqlite:///{root / 'runs'}/mlflow.db")
    exp = client.get_experiment_by_name("e2e")
    for strategy in ("naive", "replay"):
        runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("clgrid.strategy") == strategy]
        accs = []
        for run in runs:
            path = client.download_artifacts(run.info.run_id, "accuracy_matrix.json", str(root))
            R = json.loads(Path(path).read_text())["R"]
            accs.append(sum(R[-1]) / len(R[-1]))
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {strategy}"))
        acc_cell = row.split("|")[3].strip()
        assert acc_cell.startswith(f"{sum(accs) / len(accs):.3f} ±"), (row, accs)
    assert markdown.count(".png)") >= 3  # trade-off, matrices, stream plots
