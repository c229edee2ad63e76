"""Independent sweeps that overlap: two creators of one experiment, two sweeps drawing one id, a
report rewritten while it is read. Each gets its own result, none a traceback or a torn file."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from clgrid import fsio, tracking
from clgrid.errors import UsageError
from clgrid.sweep import driver
from clgrid.sweep.layout import SweepDir, sqlite_uri
from conftest import write_sweep_json
from report_store import EXPERIMENT  # the experiment of conftest's `store` fixture


def test_two_concurrent_creators_of_one_experiment_get_the_same_id(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLGRID_TRACKING_RETRY_SECONDS", "5")  # a loser retrying "already exists" would fail here
    uri = sqlite_uri(tmp_path)
    c = tracking.client(uri)
    c.search_experiments()  # the database and its tables exist before the race
    both_looked = threading.Barrier(2)
    lookup = c.get_experiment_by_name

    def look_then_wait(name: str):  # both see "no such experiment" before either creates it
        found = lookup(name)
        if found is None:
            both_looked.wait(timeout=30)
        return found

    monkeypatch.setattr(c, "get_experiment_by_name", look_then_wait)
    ids, errors = [], []

    def create() -> None:
        try:
            ids.append(tracking.experiment_id(uri, "raced", str(tmp_path)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(ids) == 2 and ids[0] == ids[1], (errors, ids)
    assert [e.name for e in c.search_experiments()].count("raced") == 1


def test_sweep_json_is_never_overwritten(tmp_path: Path) -> None:
    write_sweep_json(tmp_path, "sqlite:///first.db")
    with pytest.raises(UsageError, match="already exists"):
        write_sweep_json(tmp_path, "sqlite:///second.db")
    assert SweepDir(tmp_path).meta().tracking_uri == "sqlite:///first.db"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json"]  # no temp file left


def test_a_sweep_id_already_taken_is_drawn_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = iter(["20260101-000000-aaaa", "20260101-000000-aaaa", "20260101-000000-bbbb"])
    monkeypatch.setattr(driver, "new_sweep_id", lambda: next(ids))
    first, second = driver.new_sweep_folder(tmp_path), driver.new_sweep_folder(tmp_path)
    assert (first.path.name, second.path.name) == ("20260101-000000-aaaa", "20260101-000000-bbbb")
    assert first.path.is_dir() and second.path.is_dir()


def test_a_report_is_written_atomically_and_leaves_no_temp_files(store, tmp_path: Path,  # noqa: F811
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from clgrid.report import build_report

    written = []
    atomic_write = fsio.atomic_write

    def recording(path: Path, data: bytes) -> None:
        written.append(path.name)
        atomic_write(path, data)

    monkeypatch.setattr(fsio, "atomic_write", recording)
    out = tmp_path / "out"
    result = build_report(EXPERIMENT, store["uri"], out)
    assert {"report.html", "report.md"} <= set(written)
    assert result.html.stat().st_size and result.markdown.stat().st_size
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
