"""What keeps short sweeps efficient: the longest expected trials start first, and a Ray worker
loading the trainable does not import torch before a trial needs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from clgrid.spec import PipelineSpec, expand, load_spec
from clgrid.spec.grid import expected_work
from clgrid.sweep.layout import SweepDir
from conftest import run_clgrid, tiny_spec


def test_expected_work_orders_the_quickstart_joint_ewc_replay_naive() -> None:
    work = {t.strategy.name: expected_work(t) for t in expand(load_spec("quickstart"))}
    assert work["joint"] > work["ewc"] > work["replay"] > work["naive"] > 0


def test_expected_work_grows_with_epochs_and_with_domain_il_experiences() -> None:
    def work(scenario: str, experiences: int, epochs: int) -> float:
        spec = tiny_spec([{"name": "naive"}], scenario, train={"epochs": epochs, "batch_size": 32})
        spec["benchmarks"][0]["experiences"] = experiences
        return expected_work(expand(PipelineSpec.model_validate(spec))[0])

    assert work("class-il", 2, 2) == 2 * work("class-il", 2, 1)
    assert work("class-il", 5, 1) == work("class-il", 2, 1)  # the same data, split finer
    assert work("domain-il", 4, 1) == 2 * work("domain-il", 2, 1)  # every experience holds all of it


def test_trials_start_longest_expected_first(tmp_path: Path) -> None:
    spec = tiny_spec([{"name": "naive"}, {"name": "replay", "buffer_size": 20}, {"name": "ewc"}, {"name": "joint"}],
                     resources={"cpus_per_trial": 1, "max_concurrent": 1}, train={"epochs": 1, "batch_size": 64})
    spec["benchmarks"][0]["experiences"] = 5  # joint's epochs over the union: 1 + 2 + ... + 5 experiences
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = run_clgrid("run", str(tmp_path / "spec.yaml"), "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = next((tmp_path / "runs" / "sweeps").iterdir())
    keys = {t["trial_key"]: t["trial"]["strategy"]["name"] for t in json.loads((sweep / "sweep.json").read_text())["trials"]}
    started = sorted(keys, key=lambda k: float(SweepDir(sweep).trial(k).attempts.read_text().split()[0]))
    assert [keys[k] for k in started] == ["joint", "ewc", "replay", "naive"]


def test_loading_the_trainable_does_not_import_torch() -> None:
    """A Ray worker unpickles the trainable by importing clgrid.sweep.trial: torch (and the trainer)
    load when the first trial runs, not while the worker waits."""
    code = "import sys, clgrid.sweep.trial; print(sorted(m for m in ('torch', 'clgrid.train.trainer') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_short_experiences_reach_mlflow_in_one_upload_and_slow_ones_as_they_end(tmp_path: Path, monkeypatch) -> None:
    """The trial logger uploads an experience at once only when the last upload is UPLOAD_SECONDS
    old; the others wait for the next upload (one log_batch for all), at the latest its flush."""
    from mlflow.tracking import MlflowClient

    from clgrid.sweep import driver, trial_logger

    spec = PipelineSpec.model_validate(tiny_spec([{"name": "naive"}], storage={"root": str(tmp_path / "runs")}))
    sweep = SweepDir(driver.prepare(spec))
    (trial,) = sweep.meta().trials
    client = MlflowClient(sweep.meta().tracking_uri)
    batches: list[list] = []
    log_batch = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, run_id, metrics=(), **kw: (
        batches.append(list(metrics)), log_batch(self, run_id, metrics=metrics, **kw))[1])
    monkeypatch.setattr(trial_logger, "UPLOAD_SECONDS", 3600.0)

    def steps() -> list[int]:
        return sorted(m.step for m in client.get_metric_history(trial.run_id, "acc"))

    log = trial_logger.TrialLogger(sweep.meta().tracking_uri, trial.run_id, sweep.trial(trial.trial_key), seconds=5)
    log.start(first=True)
    for e in range(3):
        log.experience(e, [0.5, 0.1, 0.2], {"acc": e / 10, "bwt": 0.0}, {"train_flops": 1.0})
    assert steps() == [] and batches == []  # waiting, and in history.json already
    assert [h["experience"] for h in json.loads(sweep.trial(trial.trial_key).history.read_text())] == [0, 1, 2]
    log.flush()
    assert steps() == [0, 1, 2] and len(batches) == 1
    # each experience's acc after its other metrics: a run with an experience's acc has all of it
    keys = [(m.step, m.key) for m in batches[0]]
    assert all(keys.index((s, "acc")) > keys.index((s, k)) for s, k in keys if k != "acc")
    monkeypatch.setattr(trial_logger, "UPLOAD_SECONDS", 0.0)  # experiences slower than that: each at once
    log.experience(3, [0.5, 0.1, 0.2, 0.3], {"acc": 0.3, "bwt": 0.0}, {"train_flops": 1.0})
    assert steps() == [0, 1, 2, 3] and len(batches) == 2
    log.end("FINISHED")
    assert client.get_run(trial.run_id).info.status == "FINISHED"
    assert not sweep.trial(trial.trial_key).unsynced.exists()
