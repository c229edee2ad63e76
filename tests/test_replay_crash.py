"""A writer that commits in a loop is SIGKILLed at random moments, many times: after every kill the
store opens at a verifying manifest, holding exactly what that commit held.

Starting a Python that imports torch takes seconds, so one helper process imports it once and forks
a fresh writer per round (with one torch thread, so no thread pool exists for the fork to break).
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
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
HELPER = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    "import test_replay_crash as w; w.forker(sys.argv[1])"
)


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
    # first commits import lazily: pay that once here rather than in every writer
    with tempfile.TemporaryDirectory() as warm, contextlib.redirect_stdout(io.StringIO()):
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


def line_reader(proc: subprocess.Popen):
    """``read()`` returns the helper's next output line (a thread reads them as they come)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in proc.stdout], daemon=True).start()

    def read() -> str:
        try:
            return lines.get(timeout=120)
        except queue.Empty:
            raise AssertionError("the writer helper stopped answering") from None

    return read


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the writers run too: extra threads would only contend for the cores
    yield
    torch.set_num_threads(threads)


def test_sigkilled_writers_always_leave_the_last_durable_commit_intact(tmp_path, one_thread):
    proc = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    read = line_reader(proc)
    rng = random.Random(0)
    reference, ref_k = TensorMemory(CAPACITY), 0
    ahead = 0  # kills that landed after a manifest was written but before the writer saw commit() return
    torn = set()  # temp files half-written when a kill landed
    pid = None  # the writer's, while it is not yet reaped (so its pid cannot belong to anyone else)
    try:
        for kill in range(KILLS):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            _, acked, pid = read().split()  # "open K PID": the writer resumed at K
            acked, pid = int(acked), int(pid)
            if kill % 2:  # every other writer commits once before its random end, so work gets done
                acked = int(read().split()[1])
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            while (line := read()) != "exit":
                acked = int(line.split()[1])  # "commit K"
            pid = None

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
            torn |= leftovers
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        proc.stdin.close()
        proc.wait(timeout=60)
    assert ref_k >= KILLS // 2
    print(f"{KILLS} kills, {ref_k} commits; kills leaving a temp file: {len(torn)}, "
          f"between a durable manifest and commit() returning: {ahead}")
