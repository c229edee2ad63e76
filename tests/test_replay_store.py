"""The Arrow replay store: content, durability, integrity errors, garbage collection, inspection."""

from __future__ import annotations

import json
import os
import re
import runpy
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pytest
import torch

from clgrid.replay import manifest as manifest_mod
from clgrid.replay.arrow_store import MIN_LIVE, ArrowReplayStore
from clgrid.replay.errors import (
    ManifestError,
    ReplayStoreError,
    ShardCorruptError,
    ShardMissingError,
    UnsupportedFormatError,
)
from clgrid.replay.inspect import inspect_store
from clgrid.replay.memory import TensorMemory
from clgrid.replay.storage import StoreRoot

BENCH = Path(__file__).parent / "benchmarks" / "bench_replay.py"


def batch(n: int, seed: int, t: int = 0, classes: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 1, 4, 4, generator=g),
        "y": torch.randint(0, classes, (n,), generator=g),
        "t": torch.full((n,), t),
        "logits": torch.randn(n, classes, generator=g),
    }


def assert_rows_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def filled(root, capacity=40, steps=6, commit=True, **kw) -> ArrowReplayStore:
    store = ArrowReplayStore(root, capacity, **kw)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        store.insert(batch(10, i, t=i // 3), generator=g)
    if commit:
        store.commit()
    return store


def current(root) -> dict:
    name = max(n for n in os.listdir(root) if n.startswith("manifest-"))
    return json.loads(Path(root, name).read_text())


def shard_files(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("shard-"))


def test_round_trip_restores_rows_counter_and_dtypes(tmp_path):
    store = filled(tmp_path)
    expected = store.rows()
    reopened = ArrowReplayStore(tmp_path)
    assert_rows_equal(reopened.rows(), expected)
    assert (reopened.seen, len(reopened), reopened.capacity) == (60, 40, 40)
    assert reopened.rows()["x"].dtype == torch.float32 and reopened.column("y").dtype == torch.int64


def test_shards_are_arrow_ipc_files_with_one_versioned_schema(tmp_path):
    store = filled(tmp_path)
    store.write(torch.tensor([0]), batch(1, 99))
    store.commit()
    schemas = [ipc.open_file(pa.memory_map(str(tmp_path / n))).schema for n in shard_files(tmp_path)]
    assert len(schemas) == 2 and schemas[0].equals(schemas[1], check_metadata=True)
    s = schemas[0]
    assert s.field("x").type == pa.fixed_shape_tensor(pa.float32(), (1, 4, 4))
    assert s.field("logits").type == pa.fixed_shape_tensor(pa.float32(), (5,))
    assert s.field("y").type == pa.int64() and s.field("t").type == pa.int64()
    assert s.metadata[b"clgrid.replay.format_version"] == b"1"


def test_sample_is_deterministic_for_a_seeded_generator(tmp_path):
    store = filled(tmp_path)
    store.write(torch.tensor([3, 7]), batch(2, 50))  # part overlay, part shard
    draw = lambda seed: store.sample(16, torch.Generator().manual_seed(seed))  # noqa: E731
    assert_rows_equal(draw(5), draw(5))
    assert not torch.equal(draw(5)["x"], draw(6)["x"])
    assert len(store.sample(100, torch.Generator())["y"]) == 40  # all rows when fewer are stored
    reference = TensorMemory(40)
    reference.write(torch.arange(40), store.rows())
    assert_rows_equal(draw(5), reference.sample(16, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("commit_every", [0, 1, 3])
def test_same_calls_give_same_rows_as_tensor_memory(tmp_path, commit_every):
    store, ref = ArrowReplayStore(tmp_path, 30), TensorMemory(30)
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    steps = [
        *[("insert", "reservoir")] * 6,
        ("write", torch.tensor([2, 5, 2])),  # a duplicate slot: the last row wins
        ("truncate", 17),
        ("write", torch.tensor([20, 18])),  # extends past a gap, which reads as zeros
        *[("insert", "class_balanced")] * 4,
        ("reopen", None),
        *[("insert", "reservoir")] * 4,
        ("truncate", 25),
        *[("insert", "class_balanced")] * 3,
    ]
    for i, (op, arg) in enumerate(steps):
        rows = batch(len(arg) if op == "write" else 8, seed=100 + i, t=i // 4, classes=4)
        if op == "insert":
            store.insert(rows, arg, gens[0])
            ref.insert(rows, arg, gens[1])
        elif op == "write":
            store.write(arg, rows)
            ref.write(arg, rows)
        elif op == "truncate":
            store.truncate(arg)
            ref.truncate(arg)
        else:
            store = ArrowReplayStore(tmp_path, 30, manifest=store.commit())
        if commit_every and i % commit_every == 0:
            store.commit()
        assert (len(store), store.seen) == (len(ref), ref.seen), (i, op)
        assert_rows_equal(store.rows(), ref.rows())
        assert torch.equal(store.column("t"), ref.column("t"))
    where = store.column("y") == 1
    assert_rows_equal(store.rows(where), ref.rows(where))


def test_reopen_at_an_older_manifest_gives_the_older_content(tmp_path):
    store = ArrowReplayStore(tmp_path, 20, keep=3)
    snapshots = {}
    for i in range(3):
        store.insert(batch(15, i, t=i), generator=torch.Generator().manual_seed(i))
        snapshots[store.commit()] = (store.rows(), store.seen)
    assert sorted(snapshots) == [1, 2, 3]
    for mid, (rows, seen) in snapshots.items():
        old = ArrowReplayStore(tmp_path, manifest=mid)
        assert_rows_equal(old.rows(), rows)
        assert old.seen == seen and old.manifest_id == mid
    # resuming at 1 and committing again makes a new, higher id and keeps what it started from
    old = ArrowReplayStore(tmp_path, manifest=1)
    old.write(torch.tensor([0]), batch(1, 9))
    assert old.commit() == 4
    assert_rows_equal(ArrowReplayStore(tmp_path, manifest=1).rows(), snapshots[1][0])
    # manifest 0 is the empty store: a trial restarting without a checkpoint starts from nothing
    fresh = ArrowReplayStore(tmp_path, 20, manifest=0)
    assert (len(fresh), fresh.seen, fresh.manifest_id, fresh.nbytes()) == (0, 0, 0, 0)
    fresh.insert(batch(5, 0), generator=torch.Generator())
    assert fresh.commit() == 5 and len(ArrowReplayStore(tmp_path)) == 5


def test_default_keeps_the_previous_manifest_and_removes_older(tmp_path):
    store = ArrowReplayStore(tmp_path, 20)
    for i in range(3):
        store.insert(batch(15, i), generator=torch.Generator().manual_seed(i))
        store.commit()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("manifest-")) == [
        "manifest-000002.json",
        "manifest-000003.json",
    ]
    ArrowReplayStore(tmp_path, manifest=2)
    with pytest.raises(ManifestError, match=r"manifest-000001\.json not found.*\[2, 3\]"):
        ArrowReplayStore(tmp_path, manifest=1)


def test_state_dict_commits_and_load_state_dict_restores(tmp_path):
    store = filled(tmp_path, commit=False)
    state = store.state_dict()
    assert state == {"manifest": 1, "seen": 60, "length": 40}
    before = store.rows()
    store.insert(batch(30, 7), generator=torch.Generator())
    store.commit()
    store.insert(batch(30, 8), generator=torch.Generator())  # uncommitted: dropped by the load
    store.load_state_dict(state)
    assert_rows_equal(store.rows(), before)
    with pytest.raises(ReplayStoreError, match="the checkpoint expects seen=61"):
        store.load_state_dict({**state, "seen": 61})


def test_nbytes_is_the_size_of_the_current_shards_on_disk(tmp_path):
    store = ArrowReplayStore(tmp_path, 50)
    assert store.nbytes() == 0
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        store.insert(batch(20, i), generator=g)
        store.commit()
        m = current(tmp_path)
        assert store.nbytes() == sum(os.path.getsize(tmp_path / s["name"]) for s in m["shards"]) > 0
        # copy-on-write must not pile up dead rows: every kept shard stays mostly live
        live = [0] * len(m["shards"])
        for _, count, shard, _ in m["slots"]:
            live[shard] += count
        assert all(n >= MIN_LIVE * s["rows"] for n, s in zip(live, m["shards"]))


def test_a_changed_shard_is_named_with_its_manifest(tmp_path):
    filled(tmp_path)
    shard = tmp_path / "shard-000001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte differs
    shard.write_bytes(bytes(data))
    named = r"shard-000001\.arrow referenced by manifest-000001\.json"
    with pytest.raises(ShardCorruptError, match=named + ".*checksum") as e:
        ArrowReplayStore(tmp_path)
    assert (e.value.shard, e.value.manifest) == ("shard-000001.arrow", "manifest-000001.json")
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ShardCorruptError, match="bytes; the manifest recorded"):
        ArrowReplayStore(tmp_path)


def test_a_missing_shard_is_named_with_its_manifest(tmp_path):
    filled(tmp_path)
    os.remove(tmp_path / "shard-000001.arrow")
    named = r"shard-000001\.arrow referenced by manifest-000001\.json"
    with pytest.raises(ShardMissingError, match=named + " .* is missing"):
        ArrowReplayStore(tmp_path)


def test_a_newer_format_version_is_refused_naming_both_versions(tmp_path):
    filled(tmp_path)
    path = tmp_path / "manifest-000001.json"
    doc = json.loads(path.read_text())
    doc.pop("sha256")
    doc["version"] = 2
    path.write_text(json.dumps({**doc, "sha256": manifest_mod._digest(doc)}))
    with pytest.raises(UnsupportedFormatError, match="format version 2; this clgrid supports versions up to 1"):
        ArrowReplayStore(tmp_path)


def test_a_torn_newest_manifest_is_skipped_for_the_previous(tmp_path):
    store = filled(tmp_path)
    expected = store.rows()
    (tmp_path / "manifest-000002.json").write_text('{"format": "clgrid.replay", "vers')
    with pytest.warns(UserWarning, match=r"does not verify: manifest-000002\.json.*not valid JSON"):
        assert_rows_equal(ArrowReplayStore(tmp_path).rows(), expected)
    report = inspect_store(tmp_path)
    assert report.exit_status == 1 and "current manifest: manifest-000001.json" in report
    assert "problem: skipped a replay manifest that does not verify: manifest-000002.json" in report
    (tmp_path / "manifest-000001.json").write_text("{}")
    with pytest.raises(ManifestError, match="no manifest in .* verifies"), pytest.warns(UserWarning):
        ArrowReplayStore(tmp_path)


def test_opening_needs_a_capacity_for_a_new_store_and_the_same_one_after(tmp_path):
    with pytest.raises(ReplayStoreError, match="holds no replay store"):
        ArrowReplayStore(tmp_path / "none")
    filled(tmp_path, capacity=40)
    with pytest.raises(ReplayStoreError, match="capacity 40; expected 41"):
        ArrowReplayStore(tmp_path, 41)


def test_rows_with_other_columns_are_refused_without_changing_anything(tmp_path):
    store, ref = filled(tmp_path, commit=False), TensorMemory(40)
    ref.write(torch.arange(2), batch(2, 0))
    partial = {k: v for k, v in batch(2, 1).items() if k != "logits"}
    with pytest.raises(ValueError, match="columns"):
        store.insert(partial, generator=torch.Generator())
    with pytest.raises(ValueError, match="columns"):
        ref.write(torch.arange(2), partial)
    assert store.seen == 60


def test_unreferenced_shards_go_only_after_the_new_manifest_is_durable(tmp_path, monkeypatch):
    store = filled(tmp_path, capacity=20, steps=2)  # manifest 1: one shard
    for i in range(2):  # mostly overwritten each time, so older shards fall out of use
        store.write(torch.arange(18), batch(18, 10 + i))
        store.commit()
    assert shard_files(tmp_path) == ["shard-000002.arrow", "shard-000003.arrow"]
    store.write(torch.arange(18), batch(18, 20))
    rows = store.rows()
    deleted = []

    def delete(root, name):
        assert manifest_mod.read_manifest(root, 4).id == 4  # already durable when anything goes
        deleted.append(name)
        os.remove(os.path.join(root.path, name))

    real_write = StoreRoot.write

    def failing_write(root, name, data):
        if name.startswith("manifest-"):
            raise OSError("disk full")
        real_write(root, name, data)

    monkeypatch.setattr(StoreRoot, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        store.commit()
    assert "shard-000002.arrow" in shard_files(tmp_path)  # nothing removed
    assert_rows_equal(store.rows(), rows)  # and nothing lost: the overlay waits for a retry
    assert ArrowReplayStore(tmp_path).manifest_id == 3

    monkeypatch.setattr(StoreRoot, "write", real_write)
    monkeypatch.setattr(StoreRoot, "delete", delete)
    assert store.commit() == 4
    assert deleted == ["manifest-000002.json", "shard-000002.arrow"]
    assert shard_files(tmp_path) == ["shard-000003.arrow", "shard-000004.arrow"]
    assert_rows_equal(ArrowReplayStore(tmp_path).rows(), rows)


def test_shard_columns_are_memory_mapped_not_copied(tmp_path):
    filled(tmp_path)
    store = ArrowReplayStore(tmp_path)
    ptr = store._shards[0].cols["x"].data_ptr()
    maps = Path("/proc/self/maps").read_text().splitlines() if Path("/proc/self/maps").exists() else []
    if not maps:
        pytest.skip("needs /proc/self/maps")
    spans = [line.split()[0].split("-") for line in maps if line.endswith("shard-000001.arrow")]
    assert any(int(lo, 16) <= ptr < int(hi, 16) for lo, hi in spans)


def test_works_through_a_non_local_pyarrow_filesystem(tmp_path):
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = filled("trial/replay", filesystem=fs)
    assert not store.root.local and (tmp_path / "trial/replay/manifest-000001.json").exists()
    assert_rows_equal(ArrowReplayStore("trial/replay", filesystem=fs).rows(), store.rows())
    assert_rows_equal(ArrowReplayStore(f"file://{tmp_path}/trial/replay").rows(), store.rows())


def test_inspect_reports_shards_counts_and_damage(tmp_path):
    store = filled(tmp_path)
    report = inspect_store(tmp_path)
    y, t = store.column("y"), store.column("t")
    assert report.exit_status == 0 and report.endswith("checksums: all verify")
    assert "current manifest: manifest-000001.json (id 1" in report
    assert f"shard-000001.arrow  rows      40 (live      40)  bytes {store.nbytes():>11,}" in report
    assert "rows per class: " + ", ".join(f"{c}: {int((y == c).sum())}" for c in sorted(set(y.tolist()))) in report
    assert "rows per experience: " + ", ".join(f"{c}: {int((t == c).sum())}" for c in sorted(set(t.tolist()))) in report

    shard = tmp_path / "shard-000001.arrow"
    shard.write_bytes(shard.read_bytes()[:-1] + b"!")
    report = inspect_store(tmp_path)
    assert report.exit_status == 1 and "BAD" in report and "fails its checksum" in report
    os.remove(shard)
    assert "MISSING" in inspect_store(tmp_path)
    assert inspect_store(tmp_path / "empty").exit_status == 2


def test_benchmark_script_prints_the_ratio(capsys):
    runpy.run_path(str(BENCH), run_name="bench")["main"](
        ["--samples", "300", "--batch", "16", "--iters", "20", "--trials", "1"])
    out = capsys.readouterr().out
    assert "ratio arrow/tensor:" in out and "x (target <= 1.2x)" in out
    assert re.search(r"ratio arrow/memory per trial: [\d.]+x wall, [\d.]+x CPU \(target <= 1.1x\); "
                     r"same accuracy matrix: yes", out)
