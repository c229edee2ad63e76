"""Time per replay batch: the Arrow shard store against TensorMemory, measured in one run.

    python tests/benchmarks/bench_replay.py [--samples 10000] [--batch 128] [--iters 500] [--threads 1]

Samples are MNIST-sized (1x28x28 float32). Also prints what a commit and a verifying open cost.
The ratio line compares a freshly committed store (the state right after each experience); the
line after it shows a store with part of its slots changed since the last commit (in the overlay).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from clgrid.replay.arrow_store import ArrowReplayStore
from clgrid.replay.memory import TensorMemory


def per_batch(memories: dict, batch: int, iters: int, rounds: int = 5) -> dict[str, float]:
    """Median seconds per ``sample(batch)`` for each memory, rounds interleaved to share noise."""
    times: dict[str, list[float]] = {name: [] for name in memories}
    for r in range(rounds):
        for name, mem in memories.items():
            g = torch.Generator().manual_seed(r)
            mem.sample(batch, g)  # warm: page in the mapping, allocator caches
            start = time.perf_counter()
            for _ in range(iters):
                mem.sample(batch, g)
            times[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=500)
    # one thread by default: on a shared few-core machine OpenMP spin-waits make both sides noisy
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.samples
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
        store = ArrowReplayStore(root, n)
        store.write(torch.arange(n), data)
        store.commit()
        commit_s = time.perf_counter() - start
        start = time.perf_counter()
        store = ArrowReplayStore(root)
        open_s = time.perf_counter() - start
        mb = store.nbytes() / 1e6
        same = store.sample(args.batch, torch.Generator().manual_seed(1))
        assert torch.equal(same["x"], tensor.sample(args.batch, torch.Generator().manual_seed(1))["x"])

        t = per_batch({"tensor": tensor, "arrow": store}, args.batch, args.iters)
        changed = torch.randperm(n, generator=g)[: n // 10]
        store.write(changed, {k: v[changed] for k, v in data.items()})
        t_overlay = per_batch({"arrow": store}, args.batch, args.iters)["arrow"]

    print(f"replay memory: {n} samples of 1x28x28 float32, batch {args.batch}, {args.iters} batches x 5 rounds, "
          f"{args.threads} torch thread(s)")
    print(f"commit (write + fsync {mb:.1f} MB): {commit_s * 1e3:.1f} ms")
    print(f"open (mmap + sha256 verify {mb:.1f} MB): {open_s * 1e3:.1f} ms ({mb / open_s:.0f} MB/s)")
    print(f"TensorMemory.sample:          {t['tensor'] * 1e6:8.1f} us/batch")
    print(f"ArrowReplayStore.sample:      {t['arrow'] * 1e6:8.1f} us/batch")
    print(f"ArrowReplayStore, 10% in overlay: {t_overlay * 1e6:8.1f} us/batch ({t_overlay / t['tensor']:.2f}x)")
    print(f"ratio arrow/tensor: {t['arrow'] / t['tensor']:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
