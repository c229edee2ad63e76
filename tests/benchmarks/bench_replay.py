"""The Arrow shard store against TensorMemory, measured in one run: per replay batch, and per trial.

    python tests/benchmarks/bench_replay.py [--samples 10000] [--batch 128] [--iters 500] [--threads 1]
                                            [--trials 3]

Per batch: MNIST-sized samples (1x28x28 float32). Also prints what a commit and a verifying open
cost. The ratio line compares a freshly committed store (the state right after each experience);
the line before it, a store with a tenth of its slots changed since its last commit (the state
during training).

Per trial: the quickstart's replay trial (split-mnist5k class-IL, buffer 200, seed 0), fully
instrumented (checkpoints, FLOP counting), with ``storage.replay: arrow`` against ``memory``,
alternating, ``--trials`` times each; the two must give the same accuracy matrix.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clgrid.replay.arrow_store import ArrowReplayStore
from clgrid.replay.memory import TensorMemory
from clgrid.spec import PipelineSpec, expand, load_spec
from clgrid.train.trainer import run_trial


def per_batch(memories: dict, batch: int, iters: int, rounds: int = 5) -> dict[str, float]:
    """Median CPU seconds per ``sample(batch)`` for each memory, rounds interleaved to share noise.

    CPU time of the process, not wall time: on a shared machine, time spent waiting for a core
    would swamp the difference measured (with one torch thread, the two are equal on an idle one).
    """
    times: dict[str, list[float]] = {name: [] for name in memories}
    for r in range(rounds):
        for name, mem in memories.items():
            g = torch.Generator().manual_seed(r)
            mem.sample(batch, g)  # warm: page in the mapping, allocator caches
            start = time.process_time()
            for _ in range(iters):
                mem.sample(batch, g)
            times[name].append((time.process_time() - start) / iters)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=500)
    # one thread by default: on a shared few-core machine OpenMP spin-waits make both sides noisy
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3, help="end-to-end trials per backend (0: skip)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report(args.samples, args.batch, args.iters, args.threads)
        if args.trials:
            report_trial(args.trials)
    finally:
        torch.set_num_threads(threads)  # main() also runs inside the test process


def report(n: int, batch: int, iters: int, threads: int) -> None:
    g = torch.Generator().manual_seed(0)
    data = {
        "x": torch.rand(n, 1, 28, 28, generator=g),
        "y": torch.randint(0, 10, (n,), generator=g),
        "t": torch.arange(n) * 5 // n,
    }
    tensor = TensorMemory(n)
    tensor.write(torch.arange(n), data)
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        store = ArrowReplayStore(f"{root}/a", n)
        store.write(torch.arange(n), data)
        store.commit()
        commit_s = time.perf_counter() - start
        start = time.perf_counter()
        committed = ArrowReplayStore(f"{root}/a")
        open_s = time.perf_counter() - start
        mb = committed.nbytes() / 1e6
        # the state during training: a committed store plus the slots changed since (10% here)
        changing = ArrowReplayStore(f"{root}/a")
        changed = torch.randperm(n, generator=g)[: n // 10]
        changing.write(changed, {k: v[changed] for k, v in data.items()})
        for mem in (committed, changing):
            same = mem.sample(batch, torch.Generator().manual_seed(1))
            assert torch.equal(same["x"], tensor.sample(batch, torch.Generator().manual_seed(1))["x"])
        t = per_batch({"tensor": tensor, "arrow": committed, "changing": changing}, batch, iters)

    print(f"replay memory: {n} samples of 1x28x28 float32, batch {batch}, {iters} batches x 5 rounds, "
          f"{threads} torch thread(s)")
    print(f"fill + commit (write + fsync {mb:.1f} MB): {commit_s * 1e3:.1f} ms")
    print(f"open (mmap + sha256 verify {mb:.1f} MB): {open_s * 1e3:.1f} ms ({mb / open_s:.0f} MB/s)")
    print(f"TensorMemory.sample:     {t['tensor'] * 1e6:8.1f} us CPU/batch")
    print(f"ArrowReplayStore.sample: {t['arrow'] * 1e6:8.1f} us CPU/batch")
    print(f"ArrowReplayStore.sample, 10% changed since commit: {t['changing'] * 1e6:8.1f} us CPU/batch "
          f"({t['changing'] / t['tensor']:.2f}x)")
    print(f"ratio arrow/tensor: {t['arrow'] / t['tensor']:.2f}x (target <= 1.2x)")


def report_trial(reps: int) -> None:
    spec = load_spec("quickstart").model_dump(mode="json")
    spec.update(strategies=[{"name": "replay", "buffer_size": 200}], seeds=[0])
    trials = {backend: expand(PipelineSpec.model_validate({**spec, "storage": {"replay": backend}}))[0]
              for backend in ("arrow", "memory")}
    wall: dict[str, list[float]] = {b: [] for b in trials}
    cpu: dict[str, list[float]] = {b: [] for b in trials}
    matrices = {}
    with tempfile.TemporaryDirectory() as root:
        run_trial(trials["memory"], Path(root) / "warm")  # data load and first-step imports, once
        for r in range(reps):
            order = list(trials) if r % 2 == 0 else list(trials)[::-1]
            for backend in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                result = run_trial(trials[backend], Path(root) / f"{backend}-{r}")
                wall[backend].append(time.perf_counter() - start)
                cpu[backend].append(time.process_time() - start_cpu)
                matrices[backend] = result.R
    med = {b: (statistics.median(wall[b]), statistics.median(cpu[b])) for b in trials}
    print(f"replay trial (quickstart settings, buffer 200, {reps} runs each, median): "
          f"memory {med['memory'][0]:.2f} s wall / {med['memory'][1]:.2f} s CPU, "
          f"arrow {med['arrow'][0]:.2f} s wall / {med['arrow'][1]:.2f} s CPU")
    print(f"ratio arrow/memory per trial: {med['arrow'][0] / med['memory'][0]:.3f}x wall, "
          f"{med['arrow'][1] / med['memory'][1]:.3f}x CPU (target <= 1.1x); "
          f"same accuracy matrix: {'yes' if matrices['arrow'] == matrices['memory'] else 'NO'}")


if __name__ == "__main__":
    main()
