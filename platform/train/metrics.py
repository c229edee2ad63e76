"""Summary metrics from the accuracy matrix (formulas in docs/design.md).

R[i][j]: test accuracy on experience j after training on experience i (0-based here).
b[j]:    accuracy of the freshly initialised model on experience j (for forward transfer).
Metrics that need an earlier experience (BWT, FWT, forgetting) are 0.0 for a one-experience stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def _square(R: Matrix) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.size == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {m.shape}")
    return m


def average_accuracy(R: Matrix) -> float:
    """ACC = mean_j R[T, j]."""
    return float(_square(R)[-1].mean())


def backward_transfer(R: Matrix) -> float:
    """BWT = 1/(T-1) sum_{j<T} (R[T, j] - R[j, j]) (Lopez-Paz & Ranzato 2017)."""
    m = _square(R)
    T = len(m)
    return 0.0 if T < 2 else float(np.mean(m[-1, :-1] - np.diag(m)[:-1]))


def forward_transfer(R: Matrix, b: Sequence[float]) -> float:
    """FWT = 1/(T-1) sum_{j>1} (R[j-1, j] - b[j])."""
    m = _square(R)
    T = len(m)
    return 0.0 if T < 2 else float(np.mean([m[j - 1, j] - b[j] for j in range(1, T)]))


def forgetting(R: Matrix) -> float:
    """F = 1/(T-1) sum_{j<T} max_{l<T} (R[l, j] - R[T, j]) (Chaudhry et al. 2018)."""
    m = _square(R)
    T = len(m)
    return 0.0 if T < 2 else float(np.mean([m[:-1, j].max() - m[-1, j] for j in range(T - 1)]))


def learning_accuracy(R: Matrix) -> float:
    """LA = mean_j R[j, j]: how well each experience is learned when it arrives (plasticity)."""
    return float(np.diag(_square(R)).mean())


def intransigence(R: Matrix, R_joint: Matrix) -> float:
    """Mean over j of R_joint[j, j] - R[j, j]: the plasticity gap to joint training."""
    return float(np.mean(np.diag(_square(R_joint)) - np.diag(_square(R))))


def summary(R: Matrix, b: Sequence[float]) -> dict[str, float]:
    """The final metrics logged for every trial."""
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, b),
        "forgetting": forgetting(R),
        "learning_acc": learning_accuracy(R),
    }


def partial_summary(rows: Matrix, b: Sequence[float]) -> dict[str, float]:
    """Metrics after experience k (rows = R[0..k]), over the experiences seen so far."""
    k = len(rows)
    return summary([list(r[:k]) for r in rows], list(b[:k]))


VAL_PREFIX = "val_"  # the validation split's metrics: the test metrics' names with this prefix


def validation(summarize: Callable[[Matrix, Sequence[float]], dict[str, float]], R_val: Matrix,
               b_val: Sequence[float]) -> dict[str, float]:
    """``summarize`` (summary or partial_summary) of the validation matrix, names prefixed ``val_``:
    what tuning may read. Empty without a validation split."""
    return {f"{VAL_PREFIX}{k}": v for k, v in summarize(R_val, b_val).items()} if len(R_val) else {}


def continual_summary(trace: dict) -> dict[str, float]:
    """The metrics of a continual-evaluation trace (clgrid.train.continual): ``steps[p]`` the stream
    step of point p, ``acc[p][j]`` the accuracy on seen experience j there, ``boundaries[i]`` the
    step at which experience i starts. A point at every experience's end is assumed (the trainer
    records one). With k experiences:

    min_acc:       mean over j < k-1 of the lowest accuracy on j at the points from j's end on
                   (De Lange et al. 2023); 0.0 for k = 1
    wc_acc:        (1/k) * the last point's accuracy on experience k-1 + (1 - 1/k) * min_acc
    a_auc:         mean over points of the mean accuracy over the seen experiences (Koh et al. 2022)
    stability_gap: mean over boundaries i >= 1 of the largest drop, below its value at the boundary,
                   of the mean accuracy on experiences < i at the points within experience i
                   (after the boundary, up to its end); in accuracy units; 0.0 for k = 1
    """
    steps = np.asarray(trace["steps"], dtype=float)
    acc, starts = trace["acc"], list(trace["boundaries"])
    k = len(starts)
    if not len(steps) or k == 0:
        raise ValueError("a continual trace needs at least one point and one boundary")
    ends = starts[1:] + [steps[-1]]
    min_acc = float(np.mean([min(acc[p][j] for p in np.flatnonzero(steps >= ends[j])) for j in range(k - 1)])) \
        if k > 1 else 0.0
    gaps = []
    for i in range(1, k):
        at = np.flatnonzero(steps == starts[i])
        if not len(at):
            raise ValueError(f"the trace has no point at the start of experience {i} (step {starts[i]})")
        before = float(np.mean(acc[at[-1]][:i]))
        within = [float(np.mean(acc[p][:i])) for p in np.flatnonzero((steps > starts[i]) & (steps <= ends[i]))]
        gaps.append(max(0.0, before - min(within, default=before)))
    return {
        "min_acc": min_acc,
        "wc_acc": acc[-1][k - 1] / k + (1 - 1 / k) * min_acc,
        "a_auc": float(np.mean([np.mean(row) for row in acc])),
        "stability_gap": float(np.mean(gaps)) if gaps else 0.0,
    }
