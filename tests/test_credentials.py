"""Credentials inside a tracking URI (http://user:password@host) stay in the environment: never in
output, errors, sweep.json, the trials' folders or MLflow's params and tags (issue 19).

The job entrypoint of `clgrid submit` is checked on the real test cluster (test_cluster.py)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import yaml

from conftest import (MLFLOW_SERVER_ENV, answers, free_port, mlflow_server, run_clgrid, tiny_spec, wait_for,
                      write_sweep_json)

PASSWORD = "S3cret-pw"
ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture
def clean_env(monkeypatch):
    """Neither credential variable set, and both undone after the test (the code under test sets them)."""
    for name in ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_split_credentials_moves_them_to_the_environment(clean_env):
    from clgrid.errors import UsageError
    from clgrid.tracking.schema import split_credentials

    assert split_credentials("https://al%40ice:p%3Aw@mlflow.internal:5000/x") == "https://mlflow.internal:5000/x"
    assert (os.environ[ENV[0]], os.environ[ENV[1]]) == ("al@ice", "p:w")
    for uri in ("http://mlflow:5000", "sqlite:////tmp/m.db", "postgresql://mlflow@db/mlflow", "file:///tmp/r"):
        assert split_credentials(uri) == uri
    with pytest.raises(UsageError) as refused:
        split_credentials(f"postgresql://mlflow:{PASSWORD}@db:5432/mlflow")
    assert PASSWORD not in str(refused.value) and "postgresql://mlflow:***@db:5432/mlflow" in str(refused.value)


def test_sweep_json_never_holds_uri_credentials(tmp_path, clean_env):
    from clgrid.sweep.layout import SweepDir

    write_sweep_json(tmp_path, f"http://alice:{PASSWORD}@mlflow:5000")  # written by any caller
    assert PASSWORD not in (tmp_path / "sweep.json").read_text()
    assert SweepDir(tmp_path).meta().tracking_uri == "http://mlflow:5000"
    assert os.environ[ENV[1]] == PASSWORD


def test_refusals_never_echo_the_password(tmp_path, clean_env, capsys):
    from clgrid.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec([{"name": "naive"}])))
    closed = f"127.0.0.1:{free_port()}"
    assert main(["run", str(spec), "--storage", str(tmp_path / "r"), "--tracking-uri",
                 f"http://alice:{PASSWORD}@{closed}"]) == 2
    err = capsys.readouterr().err
    assert f"tracking server http://{closed} is unreachable" in err and PASSWORD not in err
    assert main(["reap", "tiny", "--tracking-uri", f"postgresql://u:{PASSWORD}@{closed}/m"]) == 2
    err = capsys.readouterr().err
    assert "postgresql://u:***@" in err and PASSWORD not in err


@pytest.mark.slow
def test_a_sweep_keeps_uri_credentials_out_of_every_record(tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    log = tmp_path / "mlflow.log"
    server = subprocess.Popen(mlflow_server(tmp_path, port), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              env={**os.environ, **MLFLOW_SERVER_ENV}, start_new_session=True)
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), "the MLflow server", timeout=300, logs=(log,))
        spec, storage = tmp_path / "s.yaml", tmp_path / "runs"
        spec.write_text(yaml.safe_dump(tiny_spec([{"name": "naive"}])))
        # MLflow without auth ignores the credentials: the sweep must run and record nothing of them.
        env = {name: "" for name in ENV}
        run = run_clgrid("run", str(spec), "--storage", str(storage), "--tracking-uri",
                         f"http://alice:{PASSWORD}@127.0.0.1:{port}", cwd=tmp_path, env=env)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert f"tracking http://127.0.0.1:{port}" in run.stdout
        assert PASSWORD not in run.stdout + run.stderr
        sweep_json = list(storage.glob("sweeps/*/sweep.json"))
        assert len(sweep_json) == 1 and f'"http://127.0.0.1:{port}"' in sweep_json[0].read_text()
        written = [p for p in storage.rglob("*") if p.is_file()] + [p for p in tmp_path.glob("mlartifacts/**/*") if p.is_file()]
        assert len(written) > 10 and not [p for p in written if PASSWORD.encode() in p.read_bytes()]

        c = MlflowClient(f"http://127.0.0.1:{port}")
        runs = c.search_runs([c.get_experiment_by_name("tiny").experiment_id])
        assert len(runs) == 2  # the sweep's parent and its one trial
        for r in runs:
            assert PASSWORD not in repr(r.data.params) + repr(r.data.tags) + repr(r.info)
        again = run_clgrid("sync", str(sweep_json[0].parent), "--tracking-uri",
                           f"http://alice:{PASSWORD}@127.0.0.1:{port}", cwd=tmp_path, env=env)
        assert again.returncode == 0 and PASSWORD not in again.stdout + again.stderr, again.stderr
        assert f"http://127.0.0.1:{port}" in again.stdout
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers: its own session
        server.wait()
