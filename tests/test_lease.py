"""One writer per sweep (clgrid.sweep.lease): the lease refuses a second command, is taken over
from a dead holder by exactly one contender, and a takeover waits for the old holder's trials. Then
for real: commands overlapping a running `clgrid run`, and two `clgrid resume` of a killed driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from clgrid import fsio
from clgrid.errors import UsageError
from clgrid.sweep import lease
from clgrid.sweep.layout import SweepDir, TrialDir
from conftest import tiny_spec, wait_for

CLGRID = str(Path(sys.executable).with_name("clgrid"))


def _gone_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def _plant(sweep: SweepDir, generation: int, **fields) -> dict:
    """A lease generation written by someone else (the fields override this process's identity)."""
    now = time.time()
    record = {"command": "clgrid run", **lease.identity(), "since": now - 50, "renewed": now, "renew_every": 10.0,
              "released": False, **fields}
    fsio.write_json(sweep.lease / f"{generation:06d}.json", record)
    return record


def _generations(sweep: SweepDir) -> list[dict]:
    return [fsio.read_json(p) for p in sorted(sweep.lease.glob("*.json"))]


def test_a_held_lease_refuses_a_second_command_in_one_line_naming_its_holder(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path / "s1")
    with lease.SweepLease(sweep, "clgrid run"):
        with pytest.raises(UsageError) as err:
            lease.SweepLease(sweep, "clgrid sync").__enter__()
        line = str(err.value)
        assert "\n" not in line and line.startswith("sweep s1 is held by `clgrid run` (pid ")
        assert f"pid {os.getpid()} on {lease.identity()['host']}, since 20" in line and "is running" in line
        assert "wait for it to end or stop it" in line and lease.TIMEOUT_ENV in line
        assert len(_generations(sweep)) == 1  # the refused command wrote nothing
    (released,) = _generations(sweep)
    assert released["released"] and released["command"] == "clgrid run"
    with lease.SweepLease(sweep, "clgrid sync") as held:  # released: the next command takes generation 2
        assert held.previous[1] == "ended, releasing its lease" and held.path.name == "000002.json"


def test_renewal_advances_while_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
    sweep = SweepDir(tmp_path)
    with lease.SweepLease(sweep, "clgrid run") as held:
        first = fsio.read_json(held.path)["renewed"]
        wait_for(lambda: fsio.read_json(held.path)["renewed"] > first + 0.1, "two renewals", timeout=10)
    last = fsio.read_json(held.path)
    time.sleep(0.3)
    assert fsio.read_json(held.path) == last and last["released"]  # no renewal after release


def test_a_holder_whose_lease_was_taken_over_is_warned(tmp_path: Path, monkeypatch, capsys) -> None:
    """A holder elsewhere that stalled past the timeout (a paused VM, storage away) and was taken
    over learns it at its next renewal."""
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
    sweep = SweepDir(tmp_path)
    with lease.SweepLease(sweep, "clgrid run"):
        _plant(sweep, 2, command="clgrid resume", host="another-host", boot="b", pid=77)
        deadline, err = time.time() + 10, ""
        while "took over" not in err and time.time() < deadline:
            time.sleep(0.05)
            err += capsys.readouterr().err
        time.sleep(0.3)  # several renewals more
        err += capsys.readouterr().err
    assert "warning: `clgrid resume` (pid 77 on another-host) took over this command's lease" in err
    assert err.count("took over") == 1  # said once


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path)
    sweep.lease.mkdir()
    _plant(sweep, 1, pid=_gone_pid())
    with lease.SweepLease(sweep, "clgrid resume", timeout=3600) as held:  # no clock involved
        assert held.path.name == "000002.json" and "on this machine is gone" in held.previous[1]
    me = lease.identity()
    _plant(sweep, 3, start=me["start"] + 1)  # this pid, but another process (the pid was reused)
    with lease.SweepLease(sweep, "clgrid resume", timeout=3600) as held:
        assert held.path.name == "000004.json" and "is gone" in held.previous[1]
    assert [g["command"] for g in _generations(sweep)] == ["clgrid run", "clgrid resume"] * 2  # the history stays


def test_a_holder_elsewhere_is_dead_only_after_the_timeout_without_renewal(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path)
    sweep.lease.mkdir()
    elsewhere = {"host": "another-host", "boot": "another-boot", "pid": 1}
    _plant(sweep, 1, **elsewhere, renewed=time.time() - 60)
    with pytest.raises(UsageError, match=r"pid 1 on another-host.*renewed 60s ago"):
        lease.SweepLease(sweep, "clgrid resume", timeout=120).__enter__()
    _plant(sweep, 1, **elsewhere, renewed=time.time() - 121)
    with lease.SweepLease(sweep, "clgrid resume", timeout=120) as held:
        assert held.path.name == "000002.json" and "not renewed for 121s (> 120s)" in held.previous[1]


def test_of_simultaneous_takers_of_a_dead_lease_exactly_one_wins(tmp_path: Path) -> None:
    sweep = SweepDir(tmp_path)
    sweep.lease.mkdir()
    _plant(sweep, 1, pid=_gone_pid())
    start, release = threading.Barrier(8), threading.Event()
    won, refused = [], []

    def take() -> None:
        start.wait(timeout=30)
        try:
            with lease.SweepLease(sweep, "clgrid resume") as held:
                won.append(held.path.name)
                release.wait(timeout=30)
        except UsageError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(won) + len(refused) == 8, "every taker to win or be refused", timeout=30)
    release.set()
    for t in threads:
        t.join(timeout=30)
    assert won == ["000002.json"] and len(refused) == 7
    assert all("held by `clgrid resume`" in r for r in refused)
    assert len(_generations(sweep)) == 2


def test_a_takeover_waits_for_the_old_holders_trials_to_stop_writing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(lease, "POLL_SECONDS", 0.05)
    sweep = SweepDir(tmp_path)
    sweep.lease.mkdir()
    _plant(sweep, 1, pid=_gone_pid())
    worker = subprocess.Popen(["sleep", "60"])  # a trial of the dead driver, still running
    try:
        trial = TrialDir(tmp_path / "trial-a")
        fsio.write_json(trial.writer, {"command": "trial", **lease.identity(), "pid": worker.pid,
                                       "start": lease.start_ticks(worker.pid), "renewed": time.time()})
        fsio.write_json(TrialDir(tmp_path / "trial-b").writer, {"command": "trial", **lease.identity(),
                                                                "pid": _gone_pid(), "renewed": time.time()})
        taken = threading.Event()

        def take() -> None:
            with lease.SweepLease(sweep, "clgrid resume"):
                taken.set()

        taker = threading.Thread(target=take)
        taker.start()
        assert not taken.wait(1.0), "took over while a trial of the dead driver was still writing"
        worker.kill()
        worker.wait()
        assert taken.wait(10)
        taker.join()
    finally:
        worker.kill()


def test_a_trial_attempt_marks_its_folder_and_waits_for_an_earlier_live_attempt(tmp_path: Path,
                                                                                monkeypatch) -> None:
    monkeypatch.setattr(lease, "POLL_SECONDS", 0.05)
    trial = TrialDir(tmp_path / "t")
    with lease.TrialWriter(trial):
        mark = fsio.read_json(trial.writer)
        assert (mark["pid"], mark["host"]) == (os.getpid(), lease.identity()["host"])
    assert not trial.writer.exists()  # removed at the attempt's end

    elsewhere = {"command": "trial", "host": "another-host", "boot": "b", "pid": 1, "start": 1}
    fsio.write_json(trial.writer, {**elsewhere, "renewed": time.time() - 2})  # an attempt on a lost node
    start = time.monotonic()
    with lease.TrialWriter(trial, timeout=3):  # waits until that one is 3 s without renewal
        assert fsio.read_json(trial.writer)["pid"] == os.getpid()
    assert time.monotonic() - start >= 0.9


def test_a_bad_lease_timeout_is_refused_naming_the_variable(tmp_path: Path, monkeypatch) -> None:
    for bad in ("soon", "5", "inf", "-1"):
        monkeypatch.setenv(lease.TIMEOUT_ENV, bad)
        with pytest.raises(UsageError, match=rf"^{lease.TIMEOUT_ENV}={bad}: expected seconds, at least 30"):
            lease.SweepLease(SweepDir(tmp_path), "clgrid sync")
    monkeypatch.setenv(lease.TIMEOUT_ENV, "300")
    assert lease.SweepLease(SweepDir(tmp_path), "clgrid sync").timeout == 300


def test_resume_on_a_cluster_refuses_sqlite_tracking_unless_told_it_is_on_local_disk(tmp_path: Path, capsys) -> None:
    from clgrid.cli import main
    from conftest import free_port, write_sweep_json

    sweep = SweepDir(tmp_path / "sweep")
    write_sweep_json(sweep.path, f"sqlite:///{tmp_path}/mlflow.db")
    address = f"127.0.0.1:{free_port()}"
    assert main(["resume", str(sweep.path), "--address", address]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"clgrid resume: tracking URI sqlite:///{tmp_path}/mlflow.db: SQLite written by several")
    assert "infra/mlflow" in line and "--sqlite-on-local-disk" in line
    assert not sweep.lease.exists()  # refused before the lease (and Ray)
    with lease.SweepLease(sweep, "clgrid run"):  # allowed: it goes on to the lease, which is held
        assert main(["resume", str(sweep.path), "--address", address, "--sqlite-on-local-disk"]) == 2
    assert "is held by `clgrid run`" in capsys.readouterr().err


def test_reap_judges_a_sweep_by_its_lease_not_by_mlflow(tmp_path: Path) -> None:
    """A sweep whose MLflow parent run looks alive (started a moment ago, no heartbeat yet): reap
    leaves it alone while its lease is held, and reaps it once the lease's holder is dead."""
    from mlflow.tracking import MlflowClient

    from clgrid.spec import PipelineSpec
    from clgrid.sweep import driver, liveness

    spec = PipelineSpec.model_validate(tiny_spec([{"name": "naive"}], storage={"root": str(tmp_path / "runs")}))
    sweep = SweepDir(driver.prepare(spec))
    meta = sweep.meta()
    parent = MlflowClient(meta.tracking_uri).get_run(meta.parent_run_id)
    assert liveness.judge(parent).alive  # by MLflow alone, a live sweep
    with lease.SweepLease(sweep, "clgrid run"):
        assert liveness.reap(meta.tracking_uri, "tiny", root=tmp_path / "runs") == ([], [meta.sweep_id])
    _plant(sweep, 2, pid=_gone_pid())  # a driver that took the lease, then died
    (reaped,), alive = liveness.reap(meta.tracking_uri, "tiny", root=tmp_path / "runs")
    assert alive == [] and reaped.sweep_id == meta.sweep_id and "on this machine is gone" in reaped.reason
    c = MlflowClient(meta.tracking_uri)
    assert {c.get_run(r).info.status for r in reaped.run_ids} == {"KILLED"} and len(reaped.run_ids) == 2
    assert _generations(sweep)[-1]["command"] == "clgrid reap" and _generations(sweep)[-1]["released"]


# ---- for real: a local Ray sweep, `clgrid` as a user runs it ----------------------------------------

# One trial at a time: the first (with an Arrow replay store), hanging once its experience 0 is
# logged, holds the sweep open.
SPEC = tiny_spec([{"name": "replay", "buffer_size": 50}, {"name": "naive"}],
                 resources={"cpus_per_trial": 1, "max_failures": 2, "max_concurrent": 1})


def _keys() -> list[str]:
    """The trial keys in the order Ray Tune starts them (the driver's longest_first)."""
    from clgrid.spec import PipelineSpec, expand
    from clgrid.spec.grid import expected_work

    return [t.trial_key for t in sorted(expand(PipelineSpec.model_validate(SPEC)), key=lambda t: -expected_work(t))]


def _start_hanging_sweep(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path, int]:
    """`clgrid run` of SPEC whose first trial hangs after experience 0: (process, sweep folder, log, hung pid)."""
    spec, storage, faults, log = tmp_path / "tiny.yaml", tmp_path / "runs", tmp_path / "faults", tmp_path / "run.log"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    faults.mkdir()
    (faults / f"{_keys()[0]}.0").write_text("hang")
    run = subprocess.Popen([CLGRID, "run", str(spec), "--storage", str(storage), "--no-report"],
                           stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                           env={**os.environ, "CLGRID_FAULT_ONCE": str(faults)})
    pid = faults / f"{_keys()[0]}.0.pid"
    hung = int(wait_for(lambda: pid.exists() and pid.read_text(), "the first trial to hang", timeout=300, logs=(log,)))
    (sweep_dir,) = [p.parent for p in (storage / "sweeps").glob("*/sweep.json")]
    return run, sweep_dir, log, hung


def _end_session(proc: subprocess.Popen) -> None:
    """SIGKILLs what is left of a process's session (the Ray processes a killed driver started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _runs(sweep_dir: Path) -> tuple[list, list]:
    """The sweep's MLflow runs: (sweep run, trial runs)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{sweep_dir.parents[1]}/mlflow.db")
    exp = c.get_experiment_by_name("tiny")
    found = c.search_runs([exp.experiment_id], f"tags.`clgrid.sweep_id` = '{sweep_dir.name}'")
    return ([r for r in found if r.data.tags["clgrid.role"] == "sweep"],
            [r for r in found if r.data.tags["clgrid.role"] == "trial"])


def _assert_finished_once_without_duplicates(sweep_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{sweep_dir.parents[1]}/mlflow.db")
    parents, trials = _runs(sweep_dir)
    assert len(parents) == 1 and sorted(r.data.tags["clgrid.trial_key"] for r in trials) == sorted(_keys())
    assert {r.info.status for r in parents + trials} == {"FINISHED"}
    for run in trials:
        assert len(run.data.metrics) > 5
        for key in run.data.metrics:
            steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), f"{key}: duplicate points {steps}"
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "acc")) == [0, 1]
    assert all((sweep_dir / k / "result.json").exists() for k in _keys())
    assert not list(sweep_dir.rglob("unsynced.json")) and not list(sweep_dir.rglob("writer.json"))


@pytest.mark.slow
def test_resume_sync_and_reap_beside_a_running_sweep_exit_2_and_it_ends_intact(tmp_path: Path) -> None:
    from clgrid.replay.arrow_store import ArrowReplayStore
    from clgrid.replay.storage import TEMP_PREFIX
    from conftest import run_clgrid

    run, sweep_dir, log, hung = _start_hanging_sweep(tmp_path)
    try:
        parents, trials = _runs(sweep_dir)
        before = sorted((r.info.run_id, r.info.status) for r in parents + trials)
        for command in ("resume", "sync", "reap"):
            start = time.monotonic()
            proc = run_clgrid(command, str(sweep_dir), timeout=300)
            took = time.monotonic() - start
            assert proc.returncode == 2, proc.stdout + proc.stderr
            (line,) = proc.stderr.strip().splitlines()
            assert line.startswith(f"clgrid {command}: sweep {sweep_dir.name} is held by `clgrid run` "
                                   f"(pid {run.pid} on "), line
            assert took < 60, f"clgrid {command} took {took:.0f}s to refuse"
            print(f"clgrid {command} refused in {took:.1f}s")
        parents, trials = _runs(sweep_dir)
        assert sorted((r.info.run_id, r.info.status) for r in parents + trials) == before  # reap marked nothing
        assert [g["command"] for g in _generations(SweepDir(sweep_dir))] == ["clgrid run"]
        assert not list(sweep_dir.rglob("unsynced.json"))
        os.kill(hung, signal.SIGKILL)  # Ray retries the trial: the sweep goes on to its end
        assert run.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        _end_session(run)
    _assert_finished_once_without_duplicates(sweep_dir)
    assert len((sweep_dir / _keys()[0] / "attempts.log").read_text().splitlines()) == 2
    replay = sweep_dir / _keys()[0] / "replay"  # Ray's retry of the killed attempt wrote on in its store
    assert ArrowReplayStore(replay).seen > 0 and not [p for p in replay.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert _generations(SweepDir(sweep_dir))[-1]["released"]


@pytest.mark.slow
def test_a_killed_drivers_sweep_is_taken_over_by_exactly_one_of_two_resumes(tmp_path: Path) -> None:
    run, sweep_dir, log, hung = _start_hanging_sweep(tmp_path)
    os.kill(run.pid, signal.SIGKILL)  # the driver only: its trial may live on
    run.wait()
    logs = [tmp_path / f"resume-{i}.log" for i in range(2)]
    resumes = [subprocess.Popen([CLGRID, "resume", str(sweep_dir)], stdout=open(out, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True) for out in logs]
    try:
        loser = wait_for(lambda: next((r for r in resumes if r.poll() is not None), None), "a resume to end",
                         timeout=300, logs=tuple(logs))
        winner = resumes[1 - resumes.index(loser)]
        lost = logs[resumes.index(loser)].read_text().strip()
        assert loser.returncode == 2 and lost.startswith(
            f"clgrid resume: sweep {sweep_dir.name} is held by `clgrid resume` (pid {winner.pid} on "), lost
        won = logs[resumes.index(winner)]
        if lease.start_ticks(hung) is not None:  # the dead driver's trial still runs: the winner waits for it
            wait_for(lambda: f"waiting for the attempt writing {sweep_dir / _keys()[0]} to stop (pid {hung} "
                     in won.read_text(), "the winner to wait for the old trial", timeout=120, logs=(won,))
            time.sleep(1)
            attempts = (sweep_dir / _keys()[0] / "attempts.log").read_text().splitlines()
            assert len(attempts) == 1, "a second attempt started beside the old one"
            os.kill(hung, signal.SIGKILL)
        assert winner.wait(timeout=600) == 0, won.read_text()[-5000:]
    finally:
        for proc in (run, *resumes):
            _end_session(proc)
    _assert_finished_once_without_duplicates(sweep_dir)
    assert [g["command"] for g in _generations(SweepDir(sweep_dir))] == ["clgrid run", "clgrid resume"]
