"""A writer that commits in a loop is SIGKILLed at random moments, many times: after every kill the
store opens at a verifying manifest, holding exactly what that commit held.

Starting a Python that imports torch takes seconds, so one helper process imports it once and forks
a fresh writer per round (it runs no torch op before forking, which keeps forking safe).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from clgrid.replay.arrow_store import ArrowReplayStore
from clgrid.replay.manifest import manifest_ids
from clgrid.replay.memory import TensorMemory
from clgrid.replay.storage import TEMP_PREFIX

CAPACITY = 384
KILLS = 30
HELPER = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_replay_crash as w; w.forker(sys.argv[1])"


def apply_commit(memory, k: int) -> None:
    """The changes commit ``k`` (1, 2, ...) makes: deterministic, so a test can recompute them."""
    g = torch.Generator().manual_seed(k)
    n = 96
    rows = {
        "x": torch.rand(n, 1, 16, 16, generator=g),
        "y": torch.randint(0, 10, (n,), generator=g),
        "t": torch.full((n,), k),
        "logits": torch.randn(n, 10, generator=g),
    }
    memory.insert(rows, "class_balanced" if k % 4 == 0 else "reservoir", g)
    if k % 7 == 0:
        memory.truncate(CAPACITY // 2)


def writer(root: str, commits: int | None = None) -> None:
    store = ArrowReplayStore(root, CAPACITY)
    k = store.manifest_id
    print(f"open {k} {os.getpid()}", flush=True)
    while commits is None or k < commits:
        k += 1
        apply_commit(store, k)
        assert store.commit() == k
        print(f"commit {k}", flush=True)


def forker(root: str) -> None:
    """For each line on stdin, forks a writer, reaps it and reports that (the writer says its pid)."""
    torch.set_num_threads(1)  # no thread pool exists at fork time (and small tensors need none)
    with tempfile.TemporaryDirectory() as warm:  # first commits import lazily: pay that once here
        with contextlib.redirect_stdout(io.StringIO()):
            writer(warm, commits=3)
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                writer(root)
            finally:
                os._exit(1)
        os.waitpid(pid, 0)
        print("exit", flush=True)


def read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the writer helper stopped answering"
    line = proc.stdout.readline()
    assert line, f"the writer helper exited: {proc.wait()}"
    return line.strip()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the writers run too: extra threads would only contend for the cores
    yield
    torch.set_num_threads(threads)


def test_sigkilled_writers_always_leave_the_last_durable_commit_intact(tmp_path, one_thread):
    proc = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    rng = random.Random(0)
    reference, ref_k = TensorMemory(CAPACITY), 0
    ahead = 0  # kills that landed after a manifest was written but before the writer saw commit() return
    torn = 0  # kills that left a half-written temp file
    pid = None
    try:
        for _ in range(KILLS):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            _, acked, pid = read_line(proc).split()  # "open K PID": the writer resumed at K
            acked, pid = int(acked), int(pid)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            while (line := read_line(proc)) != "exit":
                acked = int(line.split()[1])

            store = ArrowReplayStore(tmp_path, CAPACITY)  # newest verifying manifest, shards verified
            k = store.manifest_id
            assert k in (acked, acked + 1), f"opened at {k}; the writer had acknowledged {acked}"
            ahead += k == acked + 1
            for j in range(ref_k + 1, k + 1):
                apply_commit(reference, j)
            ref_k = k
            assert (len(store), store.seen) == (len(reference), reference.seen)
            got, want = store.rows(), reference.rows()
            assert all(torch.equal(got[c], want[c]) for c in want), f"manifest {k} differs from commit {k}"
            for i in set(manifest_ids(store.root)) - {k}:  # the others left behind verify too
                ArrowReplayStore(tmp_path, manifest=i)
            leftovers = {n for n in os.listdir(tmp_path) if not n.startswith(("manifest-", "shard-"))}
            assert all(n.startswith(TEMP_PREFIX) for n in leftovers), leftovers
            torn += bool(leftovers)
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert ref_k >= KILLS // 2  # the writers got work done between kills
    print(f"{KILLS} kills, {ref_k} commits; kills leaving a temp file: {torn}, "
          f"between a durable manifest and commit() returning: {ahead}")
