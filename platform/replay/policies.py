"""Which incoming rows enter a full-or-filling memory, and into which slots."""

from __future__ import annotations

import torch
from torch import Tensor


def place(
    policy: str, new_y: Tensor, stored_y: Tensor, seen: int, capacity: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Returns (indices into the incoming rows, target slots) for ``policy``."""
    if policy == "reservoir":
        return reservoir(len(new_y), seen, capacity, generator)
    if policy == "class_balanced":
        return class_balanced(new_y, stored_y, capacity, generator)
    raise ValueError(f"unknown replay policy {policy!r}; expected 'reservoir' or 'class_balanced'")


def reservoir(n_new: int, seen: int, capacity: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Reservoir sampling (Vitter 1985): the i-th sample offered is kept with probability capacity/i."""
    src, slots = [], []
    # float64: float32 draws hold 24 random bits, so past ~16M samples some slots could never be picked
    draws = torch.rand(n_new, generator=generator, dtype=torch.float64)
    for i in range(n_new):
        k = seen + i  # samples offered before this one
        if k < capacity:
            src.append(i)
            slots.append(k)
        else:
            j = int(draws[i] * (k + 1))
            if j < capacity:
                src.append(i)
                slots.append(j)
    # a later sample may claim a slot an earlier one in the same call took: keep the last writer only
    last = {s: i for i, s in zip(src, slots)}
    return torch.tensor(list(last.values()), dtype=torch.long), torch.tensor(list(last.keys()), dtype=torch.long)


def class_balanced(
    new_y: Tensor, stored_y: Tensor, capacity: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """GDumb's greedy balancing (Prabhu et al. 2020): fill free slots; once full, a sample of a class
    with fewer than the largest class's count replaces a random sample of the largest class."""
    labels = stored_y.tolist()
    counts: dict[int, int] = {}
    for c in labels:
        counts[c] = counts.get(c, 0) + 1
    src, slots = [], []
    for i, c in enumerate(new_y.tolist()):
        if len(labels) < capacity:
            slot = len(labels)
            labels.append(c)
        else:
            largest = max(counts, key=lambda k: (counts[k], k))
            if counts.get(c, 0) + 1 > counts[largest]:
                continue
            candidates = [s for s, lab in enumerate(labels) if lab == largest]
            slot = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
            counts[largest] -= 1
            labels[slot] = c
        counts[c] = counts.get(c, 0) + 1
        src.append(i)
        slots.append(slot)
    last = {s: i for i, s in zip(src, slots)}
    return torch.tensor(list(last.values()), dtype=torch.long), torch.tensor(list(last.keys()), dtype=torch.long)
