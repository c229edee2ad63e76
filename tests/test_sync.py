"""A tracking server that goes away in the middle of a sweep, for real: a real `mlflow server`
(SQLite backend, loopback) is killed while a real `clgrid run` sweeps on a local Ray instance, a
trial worker is killed too, the server comes back on the same port and database, and `clgrid sync`
uploads what it missed: every point exactly once, equal to the trial folders, twice idempotent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import MLFLOW_SERVER_ENV, answers, free_port, mlflow_server, tiny_spec, wait_for, write_sweep_json

CLGRID = str(Path(sys.executable).with_name("clgrid"))
# One trial at a time: the hanging first trial holds the sweep until the server is down.
SPEC = tiny_spec([{"name": "naive"}, {"name": "replay", "buffer_size": 50}], seeds=[0, 1],
                 resources={"cpus_per_trial": 1, "max_failures": 2, "max_concurrent": 1})


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store; stop() kills it outright, start() brings
    it back on the same port and database."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "mlflow-server.log", "a")
        self.proc = subprocess.Popen(mlflow_server(self.root, self.port), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **MLFLOW_SERVER_ENV})
        wait_for(lambda: answers(f"{self.uri}/health"), "the MLflow server", logs=(self.root / "mlflow-server.log",))

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # a crash, not a shutdown: answers in flight are lost
        self.proc.wait()
        wait_for(lambda: not answers(f"{self.uri}/health"), "the MLflow server to stop answering")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    s.start()
    try:
        yield s
    finally:
        if s.proc and s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait()


def _snapshot(uri: str, run_ids: list[str]) -> dict:
    """Everything the runs hold: status, every metric's full history, artifact names."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    out = {}
    for run_id in run_ids:
        run = c.get_run(run_id)
        history = {k: sorted((m.step, m.value, m.timestamp) for m in c.get_metric_history(run_id, k))
                   for k in run.data.metrics}
        out[run_id] = (run.info.status, history, sorted(a.path for a in c.list_artifacts(run_id)))
    return out


@pytest.mark.slow
def test_a_server_lost_mid_sweep_loses_no_result_and_sync_uploads_each_point_once(server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from clgrid import tracking
    from clgrid.train import checkpoint
    from clgrid.cli import main
    from clgrid.spec import PipelineSpec, TrialSpec, expand

    from clgrid.spec.grid import expected_work

    # in the order Ray Tune starts them (the driver's longest_first): the first one hangs
    keys = [t.trial_key for t in sorted(expand(PipelineSpec.model_validate(SPEC)), key=lambda t: -expected_work(t))]
    spec, storage, faults, log = tmp_path / "spec.yaml", tmp_path / "runs", tmp_path / "faults", tmp_path / "run.log"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    faults.mkdir()
    (faults / f"{keys[0]}.0").write_text("hang")  # the first trial, once experience 0 is logged
    run = subprocess.Popen(
        [CLGRID, "run", str(spec), "--tracking-uri", server.uri, "--storage", str(storage), "--no-report"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "CLGRID_FAULT_ONCE": str(faults), "CLGRID_TRACKING_RETRY_SECONDS": "1"})
    try:
        pid = faults / f"{keys[0]}.0.pid"
        hung = int(wait_for(lambda: pid.exists() and pid.read_text(), "the first trial to log experience 0", timeout=300,
                              logs=(log,)))
        server.stop()  # fault 1: the tracking server, mid-sweep
        os.kill(hung, signal.SIGKILL)  # fault 2: the worker, mid-trial; Ray retries it with the server away
        assert run.wait(timeout=300) == 0, log.read_text()[-5000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    out = log.read_text()
    (sweep_dir,) = [p.parent for p in (storage / "sweeps").glob("*/sweep.json")]
    assert f"clgrid sync {sweep_dir}" in out, out[-3000:]
    assert [(sweep_dir / k / "result.json").exists() for k in keys] == [True] * 4  # every trial finished
    # no trial failed for want of a server: only the killed one ran twice
    assert [len((sweep_dir / k / "attempts.log").read_text().splitlines()) for k in keys] == [2, 1, 1, 1]
    unsynced = {k: json.loads((sweep_dir / k / "unsynced.json").read_text()) for k in keys}
    # all of it, as nothing reached the server after experience 0 of the first trial; that one is
    # listed too (re-reported offline after the retry): whether the server has it is sync's to check
    assert all(u["steps"] == [0, 1] and u["matrix"] and u["status"] == "FINISHED" for u in unsynced.values())
    assert json.loads((sweep_dir / "unsynced.json").read_text())["status"] == "FINISHED"

    server.start()  # same port, same database
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    run_ids = [t["run_id"] for t in meta["trials"]]
    hung_run = next(t["run_id"] for t in meta["trials"] if t["trial_key"] == keys[0])
    c = MlflowClient(server.uri)
    assert c.get_run(hung_run).info.status == "RUNNING"  # the server never heard the end
    assert [m.step for m in c.get_metric_history(hung_run, "acc")] == [0]

    # `clgrid sync` in this process, which has imported everything already (the CLI's start-up is
    # seconds on a busy 2-core machine; `clgrid run` above went through the console script)
    assert main(["sync", str(sweep_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"sweep {meta['sweep_id']}: uploaded ")
    assert not list(storage.rglob("unsynced.json"))
    for t in meta["trials"]:
        folder, run_id = sweep_dir / TrialSpec.model_validate(t["trial"]).trial_key, t["run_id"]
        history = checkpoint.latest(folder)["history"]
        expected: dict[str, list] = {}
        for h in history:
            for k, v in tracking.experience_metrics(**h).items():
                expected.setdefault(k, []).append((h["experience"], v))
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert set(run.data.metrics) == set(expected)
        for k, points in expected.items():  # every point of the folder's record, exactly once
            assert sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) == points, k
        local = json.loads((folder / "artifacts" / "accuracy_matrix.json").read_text())
        uploaded = json.loads(Path(c.download_artifacts(run_id, "accuracy_matrix.json", str(tmp_path))).read_text())
        result = json.loads((folder / "result.json").read_text())
        assert uploaded == local and (local["R"], local["b"]) == (result["R"], result["b"])
        local_files = {p.name for p in (folder / "artifacts").iterdir()}  # the matrix's, and the validation matrix's
        assert {a.path for a in c.list_artifacts(run_id)} == local_files >= {"accuracy_matrix.json", "accuracy_matrix.png"}
    assert c.get_run(meta["parent_run_id"]).info.status == "FINISHED"

    before = _snapshot(server.uri, run_ids + [meta["parent_run_id"]])
    # again, given the spec instead of the folder
    assert main(["sync", str(spec), "--storage", str(storage), "--tracking-uri", server.uri]) == 0
    assert "nothing to upload" in capsys.readouterr().out
    assert _snapshot(server.uri, run_ids + [meta["parent_run_id"]]) == before


@pytest.mark.slow
def test_a_short_outage_is_ridden_out_by_retries(server):
    """The server is away for a few seconds, less than the retry budget: the call waits and lands once."""
    from clgrid import tracking

    exp = tracking.experiment_id(server.uri, "outage", "/unused")
    run_id = tracking.with_retries(lambda: tracking.client(server.uri).create_run(exp)).info.run_id
    server.stop()
    restart = threading.Thread(target=lambda: (time.sleep(1.0), server.start()))
    restart.start()
    start = time.monotonic()
    tracking.log_experiences(server.uri, run_id, [{"experience": 0, "row": [0.5, 0.25], "metrics": {"acc": 0.5},
                                                   "costs": {"train_flops": 1.0}}], seconds=90)
    waited = time.monotonic() - start
    restart.join()
    assert waited > 1.0  # it did wait for the server
    assert [m.step for m in tracking.client(server.uri).get_metric_history(run_id, "acc")] == [0]


def test_sync_errors_are_one_line(tmp_path, capsys):
    from clgrid.cli import main

    assert main(["sync", str(tmp_path / "nowhere")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "nowhere: no such file" in line
    assert main(["sync", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err
    uri = f"http://127.0.0.1:{free_port()}"
    write_sweep_json(tmp_path, uri)
    assert main(["sync", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"clgrid sync: tracking server {uri} is unreachable (")

    start = time.monotonic()  # a store without the sweep's runs: said at once, not retried for a minute
    assert main(["sync", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/other.db"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's lines creating the empty store
    assert f"has no run {'0' * 32} (sweep s); expected the tracking server the sweep ran with ({uri})" in line
    assert time.monotonic() - start < 30


SYNC_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path

from clgrid.sweep import sync

done = sync.sync_sweep(Path(sys.argv[1]), sys.argv[2])
heavy = sorted({"torch", "ray"} & set(sys.modules))
assert not heavy, f"clgrid sync imported {heavy}"
print(done.points, done.artifacts, done.statuses)
"""


def test_sync_reads_the_folders_and_imports_neither_torch_nor_ray(tmp_path):
    """A trial that logged with its server away leaves history.json and an outbox; sync uploads them
    from a process that never imports torch or Ray (no checkpoint is read)."""
    from mlflow.tracking import MlflowClient

    from clgrid.spec import PipelineSpec
    from clgrid.sweep import driver
    from clgrid.sweep.layout import SweepDir
    from clgrid.sweep.outbox import record_end
    from clgrid.sweep.trial_logger import TrialLogger

    spec = PipelineSpec.model_validate(tiny_spec([{"name": "naive"}], storage={"root": str(tmp_path / "runs")}))
    sweep = SweepDir(driver.prepare(spec))
    meta = sweep.meta()
    (trial,) = meta.trials
    away = f"http://127.0.0.1:{free_port()}"
    log = TrialLogger(away, trial.run_id, sweep.trial(trial.trial_key), seconds=0)
    log.start(first=False)  # as a retried attempt: asks the server first
    R = [[0.5, 0.1], [0.4, 0.25]]
    for experience, row in enumerate(R):
        log.experience(experience, row, {"acc": row[experience]}, {"train_flops": 1.0})
    log.matrix(R, [0.1, 0.1])
    log.end("FINISHED")
    record_end(sweep, meta.parent_run_id, "FINISHED")  # the driver's end, which the server missed too
    assert not list(sweep.path.rglob("*.pt"))

    proc = subprocess.run([sys.executable, "-c", SYNC_IN_A_FRESH_PROCESS, str(sweep.path), meta.tracking_uri],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["7", "2", "2"]  # acc, train_flops and acc_on_exp_j of 2 experiences; matrix; ends
    c = MlflowClient(meta.tracking_uri)
    assert [(m.step, m.value) for m in c.get_metric_history(trial.run_id, "acc")] == [(0, 0.5), (1, 0.25)]
    assert {c.get_run(run_id).info.status for run_id in (trial.run_id, meta.parent_run_id)} == {"FINISHED"}
    assert not list(sweep.path.rglob("unsynced.json"))


def test_sync_beside_a_trials_logger_loses_nothing(tmp_path):
    """`clgrid sync` looping beside a trial's logger on one folder (threads): the logger lists each
    experience (its server is away), then the matrix, and the end; sync uploads and unlists them
    meanwhile. Both change the outbox item by item under its lock, so the run ends with every
    experience exactly once, the matrix, FINISHED, and no outbox."""
    from mlflow.tracking import MlflowClient

    from clgrid.spec import PipelineSpec
    from clgrid.sweep import driver, sync
    from clgrid.sweep.layout import SweepDir
    from clgrid.sweep.trial_logger import TrialLogger

    spec = PipelineSpec.model_validate(tiny_spec([{"name": "naive"}], storage={"root": str(tmp_path / "runs")}))
    sweep = SweepDir(driver.prepare(spec))
    meta = sweep.meta()
    (trial,) = meta.trials
    experiences, logged, uploads = 20, threading.Event(), []

    def trial_logs() -> None:
        log = TrialLogger(f"http://127.0.0.1:{free_port()}", trial.run_id, sweep.trial(trial.trial_key), seconds=0)
        log.start(first=False)  # a retried attempt: finds the server away at once
        for e in range(experiences):
            log.experience(e, [0.5], {"acc": e / 100}, {"train_flops": 1.0})
            time.sleep(0.25)  # a sync pass takes about as long
        log.matrix([[0.5]], [0.1])
        log.end("FINISHED")
        logged.set()

    logger = threading.Thread(target=trial_logs)
    logger.start()
    while not logged.is_set():
        uploads.append(sync.sync_sweep(sweep.path, meta.tracking_uri).points)
    logger.join()
    sync.sync_sweep(sweep.path, meta.tracking_uri)
    assert sum(1 for n in uploads if n) >= 2, f"sync never ran beside the logger: {uploads}"
    c = MlflowClient(meta.tracking_uri)
    assert sorted((m.step, m.value) for m in c.get_metric_history(trial.run_id, "acc")) == [
        (e, e / 100) for e in range(experiences)]
    assert c.get_run(trial.run_id).info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(trial.run_id)} >= {"accuracy_matrix.json"}
    assert not list(sweep.path.rglob("unsynced.json"))
