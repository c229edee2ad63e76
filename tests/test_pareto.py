"""Pure statistics of the report: Pareto fronts, seed summaries, paired tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from clgrid.report import pareto_front, summarize
from clgrid.report.stats import paired_p_value


def test_front_excludes_dominated_points_and_sorts_by_cost():
    # (cost, accuracy): 1 is dominated by 0 (costlier, less accurate); 3 by 2; 4 is the costly best.
    points = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.6), (5.0, 0.9)]
    assert pareto_front(points, maximize_y=True) == [0, 2, 4]


def test_front_minimising_y():
    # (cost, forgetting): cheap and forgetful, dear and stable; 2 forgets more than 0 at a higher cost.
    points = [(5.0, 0.1), (1.0, 0.6), (6.0, 0.3), (3.0, 0.2)]
    assert pareto_front(points, maximize_y=False) == [1, 3, 0]


def test_front_ties():
    # Duplicates dominate neither each other: both stay. Same cost, lower accuracy: dominated.
    points = [(1.0, 0.8), (1.0, 0.8), (1.0, 0.5), (0.5, 0.8)]
    assert pareto_front(points, maximize_y=True) == [3]
    assert pareto_front(points[:3], maximize_y=True) == [0, 1]
    # Same accuracy at a higher cost is dominated.
    assert pareto_front([(2.0, 0.8), (1.0, 0.8)], maximize_y=True) == [1]


def test_front_single_empty_and_nan():
    assert pareto_front([(3.0, 0.2)], maximize_y=True) == [0]
    assert pareto_front([], maximize_y=False) == []
    assert pareto_front([(math.nan, 0.9), (1.0, 0.1), (2.0, math.nan)], maximize_y=True) == [1]


def test_summarize_ci_is_student_t():
    values = [0.81, 0.86, 0.79, 0.90, 0.84]
    mean, hw = summarize(values)
    s = np.std(values, ddof=1)
    assert mean == pytest.approx(0.84)
    assert hw == pytest.approx(stats.t.ppf(0.975, 4) * s / math.sqrt(5))
    # n = 2, s = sqrt(2): the half-width is t(0.975, 1) = 12.706...
    assert summarize([2.0, 4.0]) == pytest.approx((3.0, 12.7062047362))


def test_summarize_degenerate():
    assert summarize([0.7, math.nan]) == (0.7, pytest.approx(math.nan, nan_ok=True))
    mean, hw = summarize([])
    assert math.isnan(mean) and math.isnan(hw)


def test_paired_p_value_matches_scipy_and_handles_edges():
    a = {"1": 0.80, "2": 0.85, "3": 0.78, "4": 0.90}
    b = {"1": 0.75, "2": 0.84, "3": 0.70, "4": 0.86, "5": 0.99}  # seed 5 has no partner
    expected = stats.ttest_rel([0.80, 0.85, 0.78, 0.90], [0.75, 0.84, 0.70, 0.86]).pvalue
    assert paired_p_value(a, b) == pytest.approx(expected)
    assert paired_p_value({"1": 1.0}, {"1": 2.0}) is None
    assert paired_p_value({"1": 1.0, "2": 2.0}, {"1": 1.0, "3": 2.0}) is None
    assert paired_p_value({"1": 5.0, "2": 5.0}, {"1": 5.0, "2": 5.0}) == 1.0  # identical costs
    assert paired_p_value({"1": 5.0, "2": 5.0}, {"1": 6.0, "2": 6.0}) == 0.0  # consistently different
