"""Small statistics used by the report: seed summaries, paired tests and their multiple-comparison
correction, Pareto fronts.

Student t through scipy.special: scipy.stats computes the same from it, and takes half a second
more to import than the rest of the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import special

CONFIDENCE = 0.95
ALPHA = 0.05
# Paired seeds below which the report says rows cannot be separated: one degree of freedom needs
# |t| > 12.7 for p < 0.05 (more after Holm), so only near-constant differences ever test significant.
MIN_SEEDS = 3


def summarize(values: Iterable[float]) -> tuple[float, float]:
    """Mean and 95% Student-t CI half-width of the finite values.

    The half-width is NaN with fewer than two values (no spread to estimate); both are NaN when
    nothing is finite.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    t = special.stdtrit(x.size - 1, 0.5 + CONFIDENCE / 2)  # the t quantile: scipy.stats.t.ppf
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(x.size))


def paired_p_value(a: Mapping[str, float], b: Mapping[str, float]) -> float | None:
    """Two-sided paired t-test p-value over the seeds present (and finite) in both.

    None when fewer than two seeds pair up. Differences that are (numerically) constant get
    p = 1 if they are zero and p = 0 otherwise: a deterministic cost such as FLOPs is either
    identical or consistently different, and the t statistic would be NaN or infinite there.
    """
    seeds = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    if len(seeds) < 2:
        return None
    x = np.array([a[s] for s in seeds])
    y = np.array([b[s] for s in seeds])
    d = x - y
    scale = max(1.0, float(np.abs(x).max()), float(np.abs(y).max()))
    if np.ptp(d) <= 1e-12 * scale:
        return 1.0 if abs(d[0]) <= 1e-12 * scale else 0.0
    t = d.mean() / math.sqrt(d.var(ddof=1) / d.size)
    return float(2 * special.stdtr(d.size - 1, -abs(t)))  # scipy.stats.ttest_rel(x, y).pvalue


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979): the i-th smallest of m is multiplied by
    m - i + 1, made monotone and capped at 1. Rejecting where the adjusted p < alpha keeps the
    family-wise error rate at alpha however many rows are tested against the best."""
    order = sorted(p_values, key=lambda k: p_values[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        out[key] = running
    return out


def pareto_front(points: list[tuple[float, float]], maximize_y: bool) -> list[int]:
    """Indices of the non-dominated points, sorted by x (then by index).

    x is a cost to minimise; y is maximised (accuracy) or minimised (forgetting). A point is
    dominated when another is at least as good on both axes and strictly better on one, so
    duplicates of a front point all stay on the front. Points with a NaN coordinate are ignored.
    """
    sign = 1.0 if maximize_y else -1.0
    pts = [(x, sign * y) for x, y in points]
    finite = [i for i, (x, y) in enumerate(pts) if math.isfinite(x) and math.isfinite(y)]

    def dominated(i: int) -> bool:
        xi, yi = pts[i]
        return any(
            pts[j][0] <= xi and pts[j][1] >= yi and (pts[j][0] < xi or pts[j][1] > yi)
            for j in finite
        )

    return sorted((i for i in finite if not dominated(i)), key=lambda i: (pts[i][0], i))
