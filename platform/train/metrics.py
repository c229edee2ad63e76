"""Summary metrics from the accuracy matrix (formulas in docs/design.md).

R[i][j]: test accuracy on experience j after training on experience i (0-based here).
b[j]:    accuracy of the freshly initialised model on experience j (for forward transfer).
Metrics that need an earlier experience (BWT, FWT, forgetting) are 0.0 for a one-experience stream.
"""

from __future__ import annotations

from collections.abc import Sequence

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
