"""Summary metrics on hand-computed matrices."""

import pytest

from clgrid.train import metrics

# After exp 0: [0.9, 0.1, 0.0]; after exp 1: [0.5, 0.8, 0.1]; after exp 2: [0.3, 0.6, 0.7]
R = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.1], [0.3, 0.6, 0.7]]
b = [0.1, 0.05, 0.2]


def test_average_accuracy_is_the_mean_of_the_last_row() -> None:
    assert metrics.average_accuracy(R) == pytest.approx((0.3 + 0.6 + 0.7) / 3)


def test_backward_transfer() -> None:
    assert metrics.backward_transfer(R) == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)


def test_forward_transfer_uses_the_row_before_and_the_fresh_model() -> None:
    assert metrics.forward_transfer(R, b) == pytest.approx(((0.1 - 0.05) + (0.1 - 0.2)) / 2)


def test_forgetting_takes_the_best_earlier_accuracy() -> None:
    # exp 0: best before the end 0.9, final 0.3 -> 0.6; exp 1: best 0.8, final 0.6 -> 0.2
    assert metrics.forgetting(R) == pytest.approx((0.6 + 0.2) / 2)


def test_learning_accuracy_is_the_diagonal_mean() -> None:
    assert metrics.learning_accuracy(R) == pytest.approx((0.9 + 0.8 + 0.7) / 3)


def test_intransigence_against_joint() -> None:
    joint = [[1.0, 0, 0], [0.9, 0.95, 0], [0.9, 0.9, 0.9]]
    assert metrics.intransigence(R, joint) == pytest.approx(((1 - 0.9) + (0.95 - 0.8) + (0.9 - 0.7)) / 3)


def test_one_experience_has_no_transfer_or_forgetting() -> None:
    s = metrics.summary([[0.8]], [0.1])
    assert s == {"acc": 0.8, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0, "learning_acc": 0.8}


def test_partial_summary_uses_only_seen_experiences() -> None:
    s = metrics.partial_summary(R[:2], b)
    assert s["acc"] == pytest.approx((0.5 + 0.8) / 2)
    assert s["forgetting"] == pytest.approx(0.4)


def test_non_square_matrix_is_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy([[0.1, 0.2]])
