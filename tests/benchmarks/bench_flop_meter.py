"""The FLOP meter's counted training step against torch's FlopCounterMode and an uncounted step,
measured in one run (the meter counts a few steps per training phase: their cost is the meter's).

    python tests/benchmarks/bench_flop_meter.py [--reps 20] [--threads 1]

Per model (the digits MLP 64, the CNN on 28x28, the ResNet-18 on 32x32 with batch 8): the
milliseconds of one step (forward, cross-entropy, backward, Adam) uncounted, under the meter and
under FlopCounterMode (best of ``--reps``), and both counts, which must be equal.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from clgrid.train.costs import FlopMeter
from clgrid.train.models import ModelSpec, build_model

MODELS = (({"name": "mlp", "hidden": [64]}, (32, 1, 8, 8)), ({"name": "cnn"}, (32, 1, 28, 28)),
          ({"name": "resnet18"}, (8, 3, 32, 32)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for spec, shape in MODELS:
        model = build_model(ModelSpec(**spec), shape[1:], 10, [tuple(range(10))], "class-il")
        optimizer = torch.optim.Adam(model.parameters())
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))

        def step() -> None:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        def best(counted) -> tuple[float, float]:
            times, flops = [], 0.0
            for _ in range(args.reps):
                start = time.perf_counter()
                flops = counted()
                times.append(time.perf_counter() - start)
            return min(times) * 1000, flops

        def meter() -> float:
            m = FlopMeter()
            with m.counting():
                step()
            return m.total

        def reference() -> float:
            with FlopCounterMode(display=False) as mode:
                step()
            return mode.get_total_flops()

        step()  # warm-up: the first optimizer step imports torch._dynamo
        plain, _ = best(lambda: step() or 0.0)
        (ours, n_ours), (theirs, n_theirs) = best(meter), best(reference)
        print(f"{spec['name']}: step {plain:.2f} ms uncounted, {ours:.2f} ms under the meter, {theirs:.2f} ms under "
              f"FlopCounterMode; {n_ours / 1e6:.3f} MFLOP counted by both: {n_ours == n_theirs}")


if __name__ == "__main__":
    main()
