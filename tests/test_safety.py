"""Hostile and broken inputs: tampered checkpoints, names that try to leave their folder, planted
credentials, an unreachable tracking server. Nothing runs that should not, nothing is written
outside the folders the user named, nothing secret is logged, and nothing starts in vain."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from clgrid import fsio, safepaths
from clgrid.train import checkpoint
from clgrid.errors import UsageError
from conftest import Exploit, free_port, run_clgrid, tiny_spec, write_sweep_json


def _trial_with_one_good_checkpoint(tmp_path: Path) -> Path:
    trial = tmp_path / "trial"
    checkpoint.save(trial, 0, {"model": {"w": torch.ones(3)}, "R": [[0.5]]})
    return trial


def _tampered(kind: str, marker: Path, good: bytes) -> bytes:
    if kind == "raw pickle":  # a plain pickle where a checkpoint should be
        return pickle.dumps({"format": checkpoint.FORMAT, "model": Exploit(marker)})
    if kind == "torch zip":  # torch's own zip format with the payload inside data.pkl
        buf = io.BytesIO()
        torch.save({"format": checkpoint.FORMAT, "model": Exploit(marker)}, buf)
        return buf.getvalue()
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "empty":
        return b""
    if kind == "not a dict":
        buf = io.BytesIO()
        torch.save([torch.zeros(2)], buf)
        return buf.getvalue()
    raise AssertionError(kind)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("force_env", [False, True], ids=["", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
@pytest.mark.parametrize("kind", ["raw pickle", "torch zip", "truncated", "empty", "not a dict"])
def test_tampered_or_torn_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture, kind: str,
                                                                  force_env: bool) -> None:
    if force_env:  # torch honours it only when a call site leaves weights_only unset; ours sets it
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    trial = _trial_with_one_good_checkpoint(tmp_path)
    good_path = trial / "checkpoints" / "exp-000.pt"
    bad_path = trial / "checkpoints" / "exp-001.pt"
    bad_path.write_bytes(_tampered(kind, marker, good_path.read_bytes()))

    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(bad_path)
    assert str(bad_path) in str(err.value)
    assert checkpoint.latest(trial)["R"] == [[0.5]], "the last good checkpoint must stay readable"
    assert str(bad_path) in capsys.readouterr().err  # the fallback names the refused file
    assert not marker.exists(), "unpickling a checkpoint ran code"
    good_path.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="exp-000"):  # none readable: the trial fails
        checkpoint.latest(trial)
    assert not marker.exists(), "unpickling a checkpoint ran code"


def test_an_unreadable_newest_checkpoint_resumes_from_the_one_before_with_the_same_matrix(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from clgrid.train.trainer import run_trial
    from conftest import tiny_trial

    trial = tiny_trial({"name": "replay", "buffer_size": 50})  # the Arrow replay store falls back with it
    reference = run_trial(trial, tmp_path / "undisturbed").R

    class Stop(Exception):
        pass

    def stop_after_experience_1(report) -> None:
        if report.experience == 1:
            raise Stop

    folder = tmp_path / "disturbed"
    with pytest.raises(Stop):
        run_trial(trial, folder, on_experience=stop_after_experience_1)
    newest = folder / "checkpoints" / "exp-001.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # torn
    capsys.readouterr()
    assert run_trial(trial, folder).R == reference
    warning = capsys.readouterr().err
    assert f"warning: {newest}: not a clgrid checkpoint" in warning and "the checkpoint before it" in warning


def test_a_cluster_sweep_refuses_sqlite_tracking_unless_told_it_is_on_local_disk(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from clgrid.cli import main

    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec([{"name": "naive"}])))
    storage = tmp_path / "runs"
    dashboard = f"http://127.0.0.1:{free_port()}"  # nothing listens: the refusal comes before any contact
    for argv in (["submit", str(spec), "--address", dashboard, "--storage", str(storage)],
                 ["run", str(spec), "--address", f"127.0.0.1:{free_port()}", "--storage", str(storage)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"clgrid {argv[0]}: tracking URI sqlite:///") and "infra/mlflow" in err, err
        assert "--sqlite-on-local-disk" in err and "\n" not in err
        assert not storage.exists()  # nothing started, nothing created
    assert main(["submit", str(spec), "--address", dashboard, "--storage", str(storage), "--sqlite-on-local-disk"]) == 2
    assert "cannot reach the Ray job API" in capsys.readouterr().err  # allowed: went on to the cluster


def test_torch_zip_payload_really_is_a_pickle_of_os_system(tmp_path: Path) -> None:
    """The tampered file of the test above is a real attack: an unrestricted load runs it."""
    marker = tmp_path / "pwned"
    data = _tampered("torch zip", marker, b"")
    assert any(name.endswith("data.pkl") for name in zipfile.ZipFile(io.BytesIO(data)).namelist())
    torch.load(io.BytesIO(data), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["..", ".", "../../etc", "a/b", "/abs", "x\x00y", "é", "", " ", "a" * 300])
def test_any_name_becomes_one_component_inside_its_folder(tmp_path: Path, name: str) -> None:
    part = safepaths.component(name)
    assert "/" not in part and "\x00" not in part and part not in (".", "..") and 0 < len(part) <= 100
    assert safepaths.inside(tmp_path, "reports", name).parent == (tmp_path / "reports").resolve()


def test_plain_names_are_kept_and_different_names_never_share_a_folder() -> None:
    assert safepaths.component("quickstart") == "quickstart"
    assert safepaths.component("a/b") != safepaths.component("a_b") != safepaths.component("a:b")


def test_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "reports").symlink_to(tmp_path)
    with pytest.raises(UsageError, match="is outside"):
        safepaths.inside(tmp_path / "root", "reports", "exp")


def test_unreachable_tracking_server_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec([{"name": "naive"}])))
    storage = tmp_path / "storage"
    start = time.monotonic()
    proc = run_clgrid("run", str(spec), "--tracking-uri", uri, "--storage", str(storage), timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"clgrid run: tracking server {uri} is unreachable (")
    assert "expected an MLflow tracking server" in line
    assert not storage.exists(), "nothing may be created before the tracking server answers"
    assert took < 120, f"{took:.0f}s: MLflow's client retries must not run before the check"

    proc = run_clgrid("report", "some-experiment", "--tracking-uri", uri, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and f"tracking server {uri} is unreachable" in proc.stderr

    sweep = tmp_path / "sweep"  # a sweep whose server is gone: resume says so before Ray starts
    write_sweep_json(sweep, uri)
    proc = run_clgrid("resume", str(sweep), cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(f"clgrid resume: tracking server {uri} is unreachable")


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "clgrid-fake-secret-123",
    "AWS_ACCESS_KEY_ID": "AKIACLGRIDFAKEKEY456",
    "MLFLOW_TRACKING_TOKEN": "clgrid-fake-token-789",
    "MLFLOW_TRACKING_PASSWORD": "clgrid-fake-password-321",
    "CLGRID_FAKE_API_TOKEN": "clgrid-fake-forwarded-654",  # CLGRID_* settings are forwarded to trials
}


@pytest.mark.slow
def test_a_real_sweep_and_report_leak_no_credentials_and_stay_in_their_folder(tmp_path: Path) -> None:
    """`clgrid run` + `clgrid report` with secrets in the environment: every output and every file
    they write (MLflow's SQLite DB, params, tags, artifacts, checkpoints, Ray's results and the Ray
    session logs, the report) is free of them; an experiment named ``../../escape`` gets its report
    inside ``<storage>/reports``."""
    storage = tmp_path / "storage"
    spec = tmp_path / "tiny.yaml"
    data = tiny_spec([{"name": "naive"}], tracking={"experiment": "../../escape"}, storage={"root": str(storage)})
    data["train"]["iterations"] = 2
    spec.write_text(yaml.safe_dump(data))
    # Ray's session logs go to RAY_TMPDIR; a short path, because Ray's unix sockets live under it
    ray_tmp = Path(tempfile.mkdtemp(prefix="clr", dir="/tmp"))
    env = {**SECRETS, "RAY_TMPDIR": str(ray_tmp)}
    try:
        run = run_clgrid("run", str(spec), "--no-report", env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        report = run_clgrid("report", str(spec), env=env, cwd=tmp_path)
        assert report.returncode == 0, report.stdout + report.stderr

        reports = list((storage / "reports").iterdir())
        assert len(reports) == 1 and reports[0].name.startswith("escape-"), reports
        assert (reports[0] / "report.html").is_file()
        assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()

        files = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        assert any(p.name == "mlflow.db" for p in files) and any(p.suffix == ".pt" for p in files)
        assert any("session_" in str(p) and p.suffix in (".log", ".out", ".err") for p in files), "no Ray logs seen"
        outputs = {"run stdout": run.stdout, "run stderr": run.stderr, "report stdout": report.stdout,
                   "report stderr": report.stderr}
        leaks = [f"{where}: {name}" for where, text in outputs.items() for name, secret in SECRETS.items() if secret in text]
        for path in files:
            content = path.read_bytes()
            leaks += [f"{path}: {name}" for name, secret in SECRETS.items() if secret.encode() in content]
        assert not leaks, f"credentials written to {len(leaks)} places: {leaks[:10]}"
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---- full and read-only storage -------------------------------------------------------------------


@pytest.fixture
def small_fs():
    """A fresh 1 MiB tmpfs: a disk that really fills up, and can be remounted read-only. Needs root
    with CAP_SYS_ADMIN (this project's machines and CI have it; chmod does not stop root)."""
    mnt = Path(tempfile.mkdtemp(prefix="clgrid-fs-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        mnt.rmdir()
        pytest.skip("cannot mount a tmpfs here; test_injected_enospc_* covers the same write path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def _rows(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, 100, 100, generator=g), "y": torch.randint(0, 5, (n,), generator=g)}


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".tmp", ".clgrid"))]


def test_full_disk_is_a_clear_error_and_the_last_checkpoint_and_manifest_stay_readable(small_fs: Path) -> None:
    from clgrid.replay.arrow_store import ArrowReplayStore

    trial = small_fs / "trial"
    checkpoint.save(trial, 0, {"model": {"w": torch.ones(3)}, "R": [[0.5]]})
    store = ArrowReplayStore(trial / "replay", capacity=40)
    store.insert(_rows(2, 0), generator=torch.Generator().manual_seed(0))
    committed, kept_rows = store.commit(), store.rows()

    with pytest.raises(OSError) as err:  # 2 MB into a 1 MiB disk
        checkpoint.save(trial, 1, {"model": {"w": torch.ones(512, 1024)}, "R": [[0.5], [0.6]]})
    assert err.value.errno == errno.ENOSPC and str(trial / "checkpoints" / "exp-001.pt") in str(err.value)
    store.insert(_rows(30, 1), generator=torch.Generator().manual_seed(1))
    with pytest.raises(OSError) as err:
        store.commit()
    assert err.value.errno == errno.ENOSPC

    assert checkpoint.latest(trial)["R"] == [[0.5]]
    reopened = ArrowReplayStore(trial / "replay")
    assert reopened.manifest_id == committed and torch.equal(reopened.rows()["x"], kept_rows["x"])
    assert _no_temp_files(trial)


def test_read_only_storage_is_refused_up_front_and_keeps_what_it_holds(small_fs: Path, tmp_path: Path) -> None:
    trial = small_fs / "trial"
    checkpoint.save(trial, 0, {"model": {"w": torch.ones(3)}, "R": [[0.5]]})
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(OSError) as err:
        checkpoint.save(trial, 1, {"model": {"w": torch.ones(3)}, "R": [[0.5], [0.6]]})
    assert err.value.errno == errno.EROFS
    assert checkpoint.latest(trial)["R"] == [[0.5]]

    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec([{"name": "naive"}])))
    proc = run_clgrid("run", str(spec), "--storage", str(small_fs / "runs"), timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"clgrid run: storage root {small_fs / 'runs'} is not writable (Read-only file system)")


def test_injected_enospc_on_the_atomic_write_path_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same guarantee without a mount: the disk fills up while the new checkpoint is flushed."""
    trial = _trial_with_one_good_checkpoint(tmp_path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsio.os, "fsync", full)
    with pytest.raises(OSError) as err:
        checkpoint.save(trial, 1, {"model": {"w": torch.zeros(3)}, "R": [[0.5], [0.6]]})
    assert err.value.errno == errno.ENOSPC and "exp-001.pt" in str(err.value)
    monkeypatch.undo()
    assert checkpoint.latest(trial)["R"] == [[0.5]] and _no_temp_files(trial)


def test_an_edited_replay_manifest_cannot_point_outside_its_store(tmp_path: Path) -> None:
    """Manifests carry their own sha256, which an editor can recompute: shard names are checked too."""
    from clgrid.replay import manifest as manifests
    from clgrid.replay.arrow_store import ArrowReplayStore
    from clgrid.replay.errors import ManifestError

    store = ArrowReplayStore(tmp_path / "replay", capacity=10)
    store.insert(_rows(2, 0), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "replay" / manifests.manifest_name(store.commit())
    doc = json.loads(path.read_text())
    del doc["sha256"]
    doc["shards"][0]["name"] = "../../outside.arrow"
    path.write_text(json.dumps({**doc, "sha256": manifests._digest(doc)}))
    with pytest.raises(ManifestError, match="'../../outside.arrow' is not shard-NNNNNN.arrow"):
        with pytest.warns(UserWarning):
            ArrowReplayStore(tmp_path / "replay")
