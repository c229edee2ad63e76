"""What a user finds in MLflow after `clgrid run`: quiet output that ends on the UI's runs page, an
experiment of the training kind, child runs named by the report's labels, the benchmark as each
run's dataset input, and the runs page as a real browser renders it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from clgrid import tracking
from clgrid.spec import TrialSpec
from clgrid.sweep.layout import SweepDir
from clgrid.sweep.trial import benchmark_dataset
from conftest import (
    CHROMIUM_ENV, MLFLOW_SERVER_ENV, REQUIRE_BROWSER, answers, chromium, free_port, run_chromium, run_clgrid,
    tiny_spec, wait_for,
)

NOISE = ("To visualize your results with TensorBoard", "Creating initial MLflow database tables",
         "Updating database tables")
NAMES = {f"{config}-seed{seed}" for config in ("naive", "replay-buffer_size=20", "replay-buffer_size=40")
         for seed in (0, 1)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real 6-trial sweep on digits: naive, and replay at two buffer sizes, 2 seeds."""
    root = tmp_path_factory.mktemp("ui")
    spec = tiny_spec([{"name": "naive"}, {"name": "replay", "buffer_size": [20, 40]}], seeds=[0, 1], name="ui")
    (root / "ui.yaml").write_text(yaml.safe_dump(spec))
    proc = run_clgrid("run", "ui.yaml", "--storage", str(root / "runs"), "--no-report", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = MlflowClient(f"sqlite:///{root / 'runs'}/mlflow.db")
    return root, proc, client, client.get_experiment_by_name("ui")


def children(client: MlflowClient, exp_id: str) -> list:
    return [r for r in client.search_runs([exp_id]) if r.data.tags.get("clgrid.role") == "trial"]


@pytest.mark.slow
def test_run_output_is_quiet_and_ends_with_the_ui_command_on_the_runs_page(sweep) -> None:
    root, proc, _, exp = sweep
    for line in NOISE:
        assert line not in proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-2:] == [
        f"Open the runs in the MLflow UI:  mlflow ui --backend-store-uri sqlite:///{root / 'runs'}/mlflow.db",
        f"  then http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs",
    ]


@pytest.mark.slow
def test_training_experiment_named_runs_dataset_inputs_and_parent_description(sweep) -> None:
    root, _, client, exp = sweep
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = children(client, exp.experiment_id)
    assert {r.info.run_name for r in runs} == NAMES
    digests: dict[str, set[str]] = {}
    for run in runs:
        (given,) = run.inputs.dataset_inputs
        assert given.dataset.name == "split-digits"
        assert {t.key: t.value for t in given.tags} == {"mlflow.data.context": "train"}
        layout = json.loads(given.dataset.profile)["experiences"]
        assert [e["classes"] for e in layout] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
        assert all(e["train"] > 0 and e["test"] > 0 for e in layout)
        digests.setdefault(run.data.params["seed"], set()).add(given.dataset.digest)
    # the trials of one seed see the same stream: one dataset; the validation split is drawn from the
    # seed, so each seed's is its own
    assert all(len(d) == 1 for d in digests.values()) and len(set.union(*digests.values())) == len(digests) > 1
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("clgrid.role") == "sweep"]
    note = parent.data.tags["mlflow.note.content"]
    assert "`ui`" in note and str(root / "runs" / "reports" / "ui" / "report.html") in note


@pytest.mark.slow
def test_dataset_input_is_logged_once_per_run(sweep) -> None:
    """A retried or resumed trial logs its dataset again: the run keeps one input."""
    root, _, client, exp = sweep
    (folder,) = (root / "runs" / "sweeps").iterdir()
    first = SweepDir(folder).meta().trials[0]
    uri = f"sqlite:///{root / 'runs'}/mlflow.db"
    tracking.log_dataset(uri, first.run_id, benchmark_dataset(TrialSpec.model_validate(first.trial)))
    assert len(client.get_run(first.run_id).inputs.dataset_inputs) == 1


def test_without_chromium_browser_tests_skip_saying_how_to_install_unless_required(monkeypatch) -> None:
    monkeypatch.setenv(CHROMIUM_ENV, "/nonexistent/chromium")
    monkeypatch.delenv(REQUIRE_BROWSER, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        chromium()
    monkeypatch.setenv(REQUIRE_BROWSER, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_BROWSER}=1 requires it"):
        chromium()


@pytest.mark.slow
def test_runs_page_opens_on_the_training_runs_in_headless_chromium(sweep, tmp_path) -> None:
    """The page `clgrid run` names, rendered: the training-runs view (not MLflow 3's GenAI overview)
    with the sweep's parent run and the Dataset column. The UI folds child runs under their parent
    until a click, which --dump-dom cannot give, so the children's names and datasets are read
    from the search API that the page calls when the parent is expanded, and one child's own run
    page is rendered with its name and dataset."""
    chromium()  # skip (or, in CI, fail) before starting a server
    root, _, _, exp = sweep
    port = free_port()
    log = tmp_path / "mlflow-ui.log"
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'runs'}/mlflow.db"]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **MLFLOW_SERVER_ENV})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(base + "/health"), "mlflow server", logs=(log,))
        url = f"{base}/#/experiments/{exp.experiment_id}/runs"
        dom = run_chromium(url, tmp_path, "--dump-dom", "--virtual-time-budget=20000", timeout=120).stdout
        request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [exp.experiment_id]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            served = json.load(answer)["runs"]
        child = next(r for r in served if {"key": "clgrid.role", "value": "trial"} in r["data"]["tags"])
        run_page = run_chromium(f"{url}/{child['info']['run_id']}", tmp_path, "--dump-dom",
                                "--virtual-time-budget=20000", timeout=120).stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    (sweep_dir,) = (root / "runs" / "sweeps").iterdir()
    assert "Training runs" in text and "Dataset" in text, text[-3000:]
    assert f"sweep-{sweep_dir.name}" in text and "7 matching runs" in text
    trials = [r for r in served if {"key": "clgrid.role", "value": "trial"} in r["data"]["tags"]]
    assert {r["info"]["run_name"] for r in trials} == NAMES
    assert {d["dataset"]["name"] for r in trials for d in r["inputs"]["dataset_inputs"]} == {"split-digits"}
    # a child run's own page, rendered: its name and its dataset
    run_text = " ".join(re.sub(r"<[^>]+>", " ", run_page).split())
    assert child["info"]["run_name"] in run_text and "split-digits" in run_text, run_text[-3000:]
