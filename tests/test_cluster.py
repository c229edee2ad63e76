"""Cluster sweeps for real, on this machine: a two-node Ray cluster (two `ray start`), an MLflow
server, `clgrid submit` with a trial that raises and a worker SIGKILLed mid-trial, a driver killed
mid-sweep, `clgrid reap` and `clgrid resume`; plus the fast refusals (bad spec, unreachable cluster).

The dashboard and MLflow listen on 127.0.0.1. Ray's GCS and raylets bind all interfaces whatever
--node-ip-address says, so the test cluster requires a fresh token (RAY_AUTH_MODE=token). Teardown
kills only the processes these tests started (their sessions and descendants), never `ray stop`,
which stops every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import MLFLOW_SERVER_ENV, REPO, answers, free_port, mlflow_server, run_clgrid, tiny_spec, wait_for

CLGRID = str(Path(sys.executable).with_name("clgrid"))
SPEC = tiny_spec([{"name": "naive"}, {"name": "replay", "buffer_size": 50}], seeds=[0, 1],
                 resources={"cpus_per_trial": 1, "max_failures": 2})


def _trial_keys(spec: dict = SPEC) -> list[str]:
    from clgrid.spec import PipelineSpec, expand

    return [t.trial_key for t in expand(PipelineSpec.model_validate(spec))]


def _write_spec(path: Path) -> Path:
    path.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    return path


# ---- fast: refusals before anything starts -----------------------------------------------------


def test_submit_refuses_a_bad_spec_before_contacting_the_cluster(tmp_path, capsys):
    from clgrid.cli import main

    bad = tiny_spec([{"name": "naive", "bogus": 1}])
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(bad))
    assert main(["submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "strategies.0.bogus" in err and "cannot reach" not in err


def test_submit_to_an_unreachable_cluster_is_one_clear_line(tmp_path, capsys):
    from clgrid.cli import main

    address = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", str(_write_spec(tmp_path / "s.yaml")), "--address", address, "--storage", str(tmp_path),
                 "--sqlite-on-local-disk"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clgrid submit: cannot reach the Ray job API at {address}") and "\n" not in err


def test_submit_needs_storage_every_node_sees(tmp_path, capsys):
    from clgrid.cli import main

    spec = str(_write_spec(tmp_path / "s.yaml"))
    assert main(["submit", spec, "--address", "http://127.0.0.1:1", "--storage", "relative/runs"]) == 2
    assert "expected an absolute path" in capsys.readouterr().err
    assert main(["submit", spec, "--address", "http://127.0.0.1:1", "--storage", "s3://bucket/runs"]) == 2
    assert "expected a filesystem path" in capsys.readouterr().err


def test_resume_names_what_it_expected(tmp_path, capsys):
    from clgrid.cli import main

    assert main(["resume", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err
    assert main(["resume", str(_write_spec(tmp_path / "s.yaml")), "--storage", str(tmp_path / "none")]) == 2
    assert "no sweep of tiny" in capsys.readouterr().err


def _parent(status: str = "RUNNING", driver: dict | None = None, heartbeat: float | None = None,
            started: float = 0.0) -> SimpleNamespace:
    tags = {}
    if driver is not None:
        tags["clgrid.driver"] = json.dumps(driver)
    if heartbeat is not None:
        tags["clgrid.heartbeat"] = str(heartbeat)
    return SimpleNamespace(info=SimpleNamespace(status=status, start_time=started * 1000), data=SimpleNamespace(tags=tags))


def test_liveness_rule():
    from clgrid.sweep import liveness

    now = time.time()
    me = liveness.driver_identity()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_local = {**me, "pid": gone.pid}  # same machine, a pid that has exited
    elsewhere = {**me, "host": "another-host"}
    assert not liveness.judge(_parent("FINISHED", me, now)).alive  # the driver ended
    assert liveness.judge(_parent(driver=me, heartbeat=now - 3600)).alive  # running here: no clock needed
    assert not liveness.judge(_parent(driver=dead_local, heartbeat=now)).alive  # gone here: no waiting
    assert liveness.judge(_parent(driver=elsewhere, heartbeat=now - 60), older_than=180).alive
    assert not liveness.judge(_parent(driver=elsewhere, heartbeat=now - 600), older_than=180).alive
    assert not liveness.judge(_parent(started=now - 600), older_than=180).alive  # never got to run


def _log_experiences(uri: str, run_id: str, steps: int) -> None:
    from clgrid import tracking

    tracking.client.cache_clear()  # a forked child opens its own database connections
    for step in range(steps):
        tracking.log_experiences(uri, run_id, [{"experience": step, "row": [0.5] * 4, "metrics": {"acc": 0.5, "bwt": 0.0},
                                                "costs": {"train_flops": 1.0}}])
        tracking.client(uri).set_tag(run_id, "clgrid.heartbeat", str(step))


@pytest.mark.slow
def test_sqlite_takes_concurrent_trial_writes(tmp_path):
    """Two trial processes logging every experience to one SQLite file at once: none fails."""
    import multiprocessing

    from mlflow.tracking import MlflowClient

    from clgrid import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = tracking.experiment_id(uri, "concurrency", str(tmp_path))
    runs = [MlflowClient(uri).create_run(exp).info.run_id for _ in range(2)]
    fork = multiprocessing.get_context("fork")  # no re-import of torch and MLflow per child
    procs = [fork.Process(target=_log_experiences, args=(uri, run, 30)) for run in runs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]
    for run in runs:
        assert tracking.logged_steps(uri, run) == set(range(30))


# ---- slow: a real two-node cluster -------------------------------------------------------------


@dataclass
class Cluster:
    root: Path
    gcs: str  # for `clgrid run --address`
    dashboard: str  # the job API, for `clgrid submit`
    mlflow: str
    env: dict[str, str]  # what every clgrid command against this cluster needs (the token)
    worker: subprocess.Popen | None = None  # the second node's `ray start --block` (its session: the whole node)

    def clgrid(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return run_clgrid(*args, cwd=self.root, env={**self.env, **env})

    def popen(self, args: list[str], log: Path, **env: str) -> subprocess.Popen:
        return subprocess.Popen(args, cwd=self.root, env={**os.environ, **self.env, **env}, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill_sessions(leaders: set[int]) -> None:
    """SIGKILLs the sessions these processes lead and every descendant (Ray reparents none of
    its workers out of our sessions, but a job's driver gets a session of its own)."""
    procs = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        procs[int(entry)] = (int(fields[1]), int(fields[3]))  # ppid, session id
    doomed = {pid for pid, (_, sid) in procs.items() if sid in leaders}
    while grown := {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed:
        doomed |= grown
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive_nodes(dashboard: str, token: str) -> int:
    request = urllib.request.Request(f"{dashboard}/api/v0/nodes", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            nodes = json.load(reply)["data"]["result"]["result"]
    except Exception:
        return 0
    return sum(n["state"] == "ALIVE" for n in nodes)


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="clr-", dir="/tmp"))  # short: Ray's unix sockets live in it
    token = secrets.token_hex(16)
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", **MLFLOW_SERVER_ENV}
    gcs, dash, mlflow = free_port(), free_port(), free_port()

    def ports() -> list[str]:  # two nodes on one machine: no default port may be shared
        return [f"--{name}={free_port()}" for name in ("node-manager-port", "object-manager-port", "metrics-export-port",
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")]

    c = Cluster(root, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{mlflow}", env)
    logs = (root / "head.log", root / "worker.log", root / "mlflow.log")
    ray = str(Path(sys.executable).with_name("ray"))
    procs = [
        c.popen([ray, "start", "--block", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                 f"--ray-client-server-port={free_port()}",  # not the default 10001, maybe taken
                 f"--temp-dir={root / 'head'}", "--disable-usage-stats", *ports()], logs[0]),
        c.popen(mlflow_server(root, mlflow), logs[2]),
    ]
    try:
        wait_for(lambda: answers(f"{c.dashboard}/api/version"), "the head's dashboard", timeout=300, logs=logs)
        # Its own --temp-dir: on one machine the nodes would otherwise share runtime_resources/ and
        # one node re-extracting the job's working_dir would pull the driver's cwd from under it.
        c.worker = c.popen([ray, "start", "--block", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                            "--num-cpus=1", f"--temp-dir={root / 'worker'}", "--disable-usage-stats", *ports()], logs[1])
        procs.append(c.worker)
        wait_for(lambda: _alive_nodes(c.dashboard, token) == 2, "two alive Ray nodes", timeout=300, logs=logs)
        wait_for(lambda: answers(f"{c.mlflow}/health"), "the MLflow server", timeout=300, logs=logs)
        yield c
    finally:
        _kill_sessions({p.pid for p in procs})
        for p in procs:
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, list[list[float]]]:
    """The accuracy matrices of undisturbed trials (the trainer itself, in this process)."""
    from clgrid.spec import PipelineSpec, expand
    from clgrid.train.trainer import run_trial

    folder = tmp_path_factory.mktemp("reference")
    return {t.trial_key: run_trial(t, folder / t.trial_key).R for t in expand(PipelineSpec.model_validate(SPEC))}


def _sweep_dir(storage: Path) -> Path | None:
    found = list((storage / "sweeps").glob("*/sweep.json"))
    return found[0].parent if found else None


def _attempts(sweep_dir: Path, key: str) -> list[str]:
    path = sweep_dir / key / "attempts.log"
    return path.read_text().splitlines() if path.exists() else []


def _matrices(sweep_dir: Path) -> dict[str, list[list[float]]]:
    return {p.parent.name: json.loads(p.read_text())["R"] for p in sweep_dir.glob("*/result.json")}


def _runs(uri: str, sweep_dir: Path) -> dict[str, list]:
    """The sweep's MLflow runs by role: {"sweep": [parent], "trial": [children]}."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    sweep_id = sweep_dir.name
    exp = c.get_experiment_by_name("tiny")
    found = c.search_runs([exp.experiment_id], f"tags.`clgrid.sweep_id` = '{sweep_id}'", max_results=1000)
    return {role: [r for r in found if r.data.tags["clgrid.role"] == role] for role in ("sweep", "trial")}


@pytest.mark.slow
def test_submitted_sweep_survives_a_raising_trial_and_a_killed_worker(cluster, reference):
    from mlflow.tracking import MlflowClient

    from clgrid.sweep import liveness

    keys = _trial_keys()
    spec, storage, faults, log = cluster.root / "spec.yaml", cluster.root / "submitted", cluster.root / "faults-1", cluster.root / "submit.log"
    _write_spec(spec)
    faults.mkdir()
    (faults / f"{keys[0]}.0").write_text("hang")  # the first trial: holds its node's only CPU until killed
    (faults / f"{keys[1]}.0").write_text("raise")
    # From the repo root, as a developer would: the job must still not ship it (platform/ shadows the stdlib).
    # Credentials in the URI (this MLflow ignores them) must reach neither the job nor its log.
    with_password = cluster.mlflow.replace("http://", f"http://alice:{PASSWORD}@")
    submit = subprocess.Popen([CLGRID, "submit", str(spec), "--address", cluster.dashboard, "--tracking-uri",
                               with_password, "--storage", str(storage), "--follow"], cwd=REPO, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, env={**os.environ, **cluster.env, "CLGRID_FAULT_ONCE": str(faults)})
    hung = int(wait_for(lambda: _read(faults / f"{keys[0]}.0.pid"), "the hanging trial", timeout=300, logs=(log,)))
    hung_since = (faults / f"{keys[0]}.0.pid").stat().st_mtime
    sweep_dir = wait_for(lambda: _sweep_dir(storage), "the sweep folder", timeout=300, logs=(log,))
    wait_for(lambda: any(p.stat().st_mtime > hung_since for p in sweep_dir.glob("*/result.json")),
             "a trial finished on the other node (the hung one holds its node's only CPU)", timeout=300, logs=(log,))
    reaped, alive = liveness.reap(cluster.mlflow, "tiny")
    assert (reaped, alive) == ([], [sweep_dir.name])  # a live sweep is left alone
    os.kill(hung, signal.SIGKILL)  # the Ray worker running the trial, mid-trial
    assert submit.wait(timeout=900) == 0, log.read_text()[-5000:]

    job_id = next(line for line in log.read_text().splitlines() if line.startswith("clgrid-tiny-"))
    job = _api(cluster, f"/api/jobs/{job_id}")  # what the job API shows anyone with the token
    assert cluster.mlflow in shlex.split(job["entrypoint"])
    assert PASSWORD not in json.dumps(job) + log.read_text()
    status = cluster.clgrid("status", job_id, "--address", cluster.dashboard)
    assert (status.returncode, status.stdout.split()[1]) == (0, "SUCCEEDED"), status.stderr
    runs = _runs(cluster.mlflow, sweep_dir)
    assert sorted(r.data.tags["clgrid.trial_key"] for r in runs["trial"]) == sorted(keys)  # one run per trial
    assert {r.info.status for r in runs["trial"] + runs["sweep"]} == {"FINISHED"}
    assert {a.path for a in MlflowClient(cluster.mlflow).list_artifacts(runs["trial"][0].info.run_id)} >= {"accuracy_matrix.json"}
    attempts = {k: _attempts(sweep_dir, k) for k in keys}
    assert [len(attempts[k]) for k in keys] == [2, 2, 1, 1]  # the two faulted trials ran twice, the others once
    assert len({line.split("node=")[1] for lines in attempts.values() for line in lines}) == 2
    assert _matrices(sweep_dir) == reference
    extracted = list((cluster.root / "head").glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*/"))
    assert extracted and all(sorted(p.name for p in d.iterdir()) == ["spec.yaml"] for d in extracted)


PASSWORD = "S3cret-pw"


def _api(cluster: Cluster, path: str):
    """The dashboard's JSON answer at ``path``, asked with the cluster's token."""
    request = urllib.request.Request(f"{cluster.dashboard}{path}",
                                     headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


@pytest.mark.slow
def test_killed_driver_then_reap_and_resume(cluster, reference, capsys):
    from clgrid.cli import main

    keys = _trial_keys()
    spec, storage, faults, log = cluster.root / "spec.yaml", cluster.root / "killed", cluster.root / "faults-2", cluster.root / "driver.log"
    _write_spec(spec)
    faults.mkdir()
    (faults / f"{keys[0]}.0").write_text("hang")  # keeps the sweep from finishing before the kill
    driver = cluster.popen([CLGRID, "run", str(spec), "--storage", str(storage), "--address", cluster.gcs, "--no-report",
                            "--sqlite-on-local-disk"],  # SQLite in the storage root: both nodes are this machine
                           log, CLGRID_FAULT_ONCE=str(faults))
    hung = int(wait_for(lambda: _read(faults / f"{keys[0]}.0.pid"), "the hanging trial", timeout=300, logs=(log,)))
    sweep_dir = wait_for(lambda: _sweep_dir(storage), "the sweep folder", timeout=300, logs=(log,))
    wait_for(lambda: _matrices(sweep_dir), "a finished trial", timeout=300, logs=(log,))
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = {k: len(_attempts(sweep_dir, k)) for k in keys}
    finished = set(_matrices(sweep_dir))
    assert keys[0] not in finished
    if _wait_gone(hung):  # Ray ends a dead driver's workers; make sure, so nothing trains twice
        os.kill(hung, signal.SIGKILL)

    uri = f"sqlite:///{storage}/mlflow.db"
    assert main(["reap", str(spec), "--storage", str(storage)]) == 0  # in this process: no Ray involved
    assert "marked KILLED (driver pid" in capsys.readouterr().out
    runs = _runs(uri, sweep_dir)
    assert {r.data.tags["clgrid.trial_key"]: r.info.status for r in runs["trial"]} == {
        k: "FINISHED" if k in finished else "KILLED" for k in keys}
    assert runs["sweep"][0].info.status == "KILLED"

    resume = cluster.clgrid("resume", str(sweep_dir), "--address", cluster.gcs, "--sqlite-on-local-disk")
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert f"{len(finished)}/4 trials finished" in resume.stdout
    after = {k: len(_attempts(sweep_dir, k)) for k in keys}
    assert {k: after[k] for k in finished} == {k: before[k] for k in finished}  # finished trials did not rerun
    assert after[keys[0]] == 2  # the interrupted one continued from its checkpoint
    runs = _runs(uri, sweep_dir)
    assert sorted(r.data.tags["clgrid.trial_key"] for r in runs["trial"]) == sorted(keys)
    assert {r.info.status for r in runs["trial"] + runs["sweep"]} == {"FINISHED"}
    assert _matrices(sweep_dir) == reference


def _wait_gone(pid: int, timeout: float = 60) -> bool:
    """Whether process ``pid`` still runs after ``timeout`` seconds (a zombie counts as gone)."""
    def running() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    deadline = time.time() + timeout
    while time.time() < deadline and running():
        time.sleep(0.5)
    return running()


# ---- authentication: Ray's token, on a local instance and on the test cluster -------------------

# Ray's own GCS client, asked once: `ray.init` retries a refused connection for ~20 s before raising.
GCS_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    print(len(GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)), "nodes")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def _without_ray_auth(home: Path, **auth: str) -> dict[str, str]:
    """This environment without Ray's auth settings, HOME=``home`` (its ~/.ray/auth_token), plus ``auth``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", **auth}


def _gcs_probe(address: str, home: Path, **auth: str) -> str:
    """What a client with only ``auth`` (RAY_AUTH_*) and ``home`` gets from the GCS: "N nodes" or the error."""
    done = subprocess.run([sys.executable, "-c", GCS_PROBE, address], cwd=home, env=_without_ray_auth(home, **auth),
                          capture_output=True, text=True, timeout=120)
    return done.stdout.strip()


def _http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


WRONG_TOKEN = "0" * 32

# clgrid's way of starting Ray on one machine (driver.connect without an address), in a process that
# prints the GCS address and keeps the instance until its stdin closes.
LOCAL_DRIVER = """
import sys
import ray
from clgrid.sweep.driver import connect
connect(None)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_local_ray_refuses_a_client_without_the_token(tmp_path):
    """Ray 2.60 turns token auth on for the local instance clgrid starts (RAY_AUTH_MODE unset) and
    writes the token to ~/.ray/auth_token, here in a fresh HOME: only a client with it gets in."""
    home, stranger, log = tmp_path / "home", tmp_path / "stranger", tmp_path / "driver.log"
    home.mkdir()
    stranger.mkdir()
    driver = subprocess.Popen([sys.executable, "-c", LOCAL_DRIVER], cwd=home, env=_without_ray_auth(home),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                              start_new_session=True)
    try:
        address = driver.stdout.readline().strip()
        assert address, log.read_text()[-3000:]
        assert (home / ".ray" / "auth_token").read_text().strip()
        assert _gcs_probe(address, stranger).startswith("AuthenticationError")  # no token at all
        assert _gcs_probe(address, stranger, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=WRONG_TOKEN).startswith(
            "AuthenticationError")
        assert _gcs_probe(address, home, RAY_AUTH_MODE="token") == "1 nodes"  # the driver user's token file
    finally:
        _kill_sessions({driver.pid})
        driver.wait()


@pytest.mark.slow
def test_cluster_refuses_clients_and_nodes_without_the_token(cluster, tmp_path):
    token = cluster.env["RAY_AUTH_TOKEN"]
    assert _gcs_probe(cluster.gcs, tmp_path).startswith("AuthenticationError")
    assert _gcs_probe(cluster.gcs, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=WRONG_TOKEN).startswith(
        "AuthenticationError")
    assert _gcs_probe(cluster.gcs, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) == "2 nodes"
    # the job API runs arbitrary code on the cluster: 401 without a token, 403 with a wrong one
    jobs = f"{cluster.dashboard}/api/jobs/"
    assert [_http_status(jobs, t) for t in (None, WRONG_TOKEN, token)] == [401, 403, 200]
    # a third node without the token cannot join (infra/ hands every node the token for this)
    ray = str(Path(sys.executable).with_name("ray"))
    joined = subprocess.run([ray, "start", f"--address={cluster.gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                             f"--temp-dir={tmp_path / 'stranger-node'}", "--disable-usage-stats"], cwd=tmp_path,
                            env=_without_ray_auth(tmp_path), capture_output=True, text=True, timeout=300)
    assert joined.returncode != 0 and "Authentication token is missing or incorrect" in joined.stdout + joined.stderr
    assert _alive_nodes(cluster.dashboard, token) == 2


# ---- node loss: the worker node goes away mid-trial (last: the cluster keeps one node after it) ----


def _metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_worker_node_lost_mid_trial_resumes_on_the_head(cluster, reference, tmp_path):
    """Ray Tune's node-removal case (test_remove_node_before_result) for clgrid: both trials hang
    after their first experience's checkpoint, one per node; the worker node's processes are killed
    (raylet, its workers, the trial) and the head's hung trial too. Both continue on the head from
    the checkpoint of experience 0 (not rewritten), each in its one MLflow run, with the accuracy
    matrix of an undisturbed run."""
    spec = {**SPEC, "strategies": [SPEC["strategies"][0]]}  # naive, seeds 0 and 1: the reference's first two
    keys = _trial_keys(spec)
    path, storage, faults, log = tmp_path / "spec.yaml", tmp_path / "runs", tmp_path / "faults", tmp_path / "driver.log"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    faults.mkdir()
    for key in keys:
        (faults / f"{key}.0").write_text("hang")
    driver = cluster.popen([CLGRID, "run", str(path), "--storage", str(storage), "--address", cluster.gcs,
                            "--tracking-uri", cluster.mlflow, "--no-report"], log, CLGRID_FAULT_ONCE=str(faults))
    hung = {k: int(wait_for(lambda k=k: _read(faults / f"{k}.0.pid"), f"trial {k} hanging", timeout=600, logs=(log,)))
            for k in keys}
    sweep_dir = _sweep_dir(storage)
    nodes = {k: _attempts(sweep_dir, k)[0].split("node=")[1] for k in keys}
    assert len(set(nodes.values())) == 2, nodes  # one trial per node (each has one CPU)
    head = _head_node(cluster)
    (lost,) = [k for k in keys if nodes[k] != head]
    checkpoint = sweep_dir / lost / "checkpoints" / "exp-000.pt"
    written = checkpoint.stat().st_mtime_ns

    _kill_sessions({cluster.worker.pid})  # the worker node: raylet, object manager, its workers
    cluster.worker.wait()
    (stays,) = set(keys) - {lost}
    os.kill(hung[stays], signal.SIGKILL)  # frees the head's only CPU
    assert driver.wait(timeout=900) == 0, log.read_text()[-5000:]

    assert [line.split("node=")[1] for line in _attempts(sweep_dir, lost)] == [nodes[lost], head]
    assert checkpoint.stat().st_mtime_ns == written  # resumed after experience 0, not started over
    assert _matrices(sweep_dir) == {k: reference[k] for k in keys}
    runs = _runs(cluster.mlflow, sweep_dir)
    assert sorted(r.data.tags["clgrid.trial_key"] for r in runs["trial"]) == sorted(keys)  # no duplicate run
    assert {r.info.status for r in runs["trial"] + runs["sweep"]} == {"FINISHED"}
    for r in runs["trial"]:
        assert _metric_steps(cluster.mlflow, r.info.run_id, "acc") == [0, 1]  # every point once


def _head_node(cluster: Cluster) -> str:
    (head,) = [n["node_id"] for n in _api(cluster, "/api/v0/nodes")["data"]["result"]["result"] if n["is_head_node"]]
    return head
