"""Which incoming rows enter a full-or-filling memory, and into which slots."""

from __future__ import annotations

import numpy as np
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
    """Reservoir sampling (Vitter 1985): the i-th sample offered is kept with probability capacity/i.

    Vectorised, as it runs after every training step (numpy: its per-call overhead on a batch of
    indices is far below torch's). It makes the draws a per-sample loop would make, one per offered
    sample, and returns the same slots in the same order.
    """
    # float64: float32 draws hold 24 random bits, so past ~16M samples some slots could never be picked
    draws = torch.rand(n_new, generator=generator, dtype=torch.float64).numpy()
    k = np.arange(seen, seen + n_new, dtype=np.int64)  # samples offered before each one
    j = np.where(k < capacity, k, (draws * (k + 1)).astype(np.int64))
    src = np.flatnonzero(j < capacity)
    slots = j[src]
    unique, first = np.unique(slots, return_index=True)
    if len(unique) < len(slots):
        # a later sample claimed a slot an earlier one in the same call took: keep the last writer
        # only, slots listed in the order of their first claim
        last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
        order = np.argsort(first)
        src, slots = src[last[order]], unique[order]
    return torch.from_numpy(src.astype(np.int64)), torch.from_numpy(slots)


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
