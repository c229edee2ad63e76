"""i-Blurry-N-M streams (Koh et al. 2022, "Online Continual Learning on Class Incremental Blurry Task
Configuration with Anytime Inference").

Every class has a home experience: its group in the class order, as in a split stream. A seeded
``disjoint`` fraction of the classes stays there entirely; of each other (blurry) class, a seeded
``blur`` fraction of its training samples leaks to experiences drawn uniformly among the others.
Test experience j holds the test samples of the classes whose home is j, so the accuracy matrix
keeps its meaning; training experience j's ``classes`` are the classes it actually holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clgrid.benchmarks import BenchmarkSpec, Experience


def blurry_train(spec: BenchmarkSpec, seed: int, x: Tensor, y: Tensor, groups: list[tuple[int, ...]]) -> list[Experience]:
    """The training experiences of an i-Blurry stream over the class ``groups`` (home experiences)."""
    assert spec.blurry is not None
    generator = torch.Generator().manual_seed(seed + 7919)  # apart from the class-order shuffle (seed)
    home = {c: i for i, group in enumerate(groups) for c in group}
    classes = sorted(home)
    n_disjoint = round(spec.blurry.disjoint * len(classes))
    blurry = sorted(classes[int(i)] for i in torch.randperm(len(classes), generator=generator)[n_disjoint:])
    k = len(groups)
    target = torch.tensor([home[int(c)] for c in y])  # every sample's experience, first its class's home
    for c in blurry:
        rows = (y == c).nonzero().squeeze(1)
        leak = rows[torch.randperm(len(rows), generator=generator)[: round(spec.blurry.blur * len(rows))]]
        if k > 1:  # an offset in 1..k-1 from home: uniform over the other experiences
            target[leak] = (home[c] + torch.randint(1, k, (len(leak),), generator=generator)) % k
    experiences = []
    for i in range(k):
        mask = target == i
        labels = y[mask].contiguous()
        experiences.append(Experience(i, x[mask].contiguous(), labels, tuple(sorted(set(labels.tolist())))))
    return experiences

