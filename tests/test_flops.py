"""FLOP accounting: every trained sample at its real rate, and the work torch's counter cannot see."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from clgrid.strategies._penalty import quadratic_penalty, snapshot
from clgrid.train.costs import FlopMeter, count_flops
from clgrid.train.models import ModelSpec, build_model
from clgrid.train.trainer import run_trial
from conftest import tiny_trial

MLP = {"name": "mlp", "hidden": [400, 400]}
TRAIN = {"iterations": 12, "batch_size": 32, "lr": 0.01}


def analytic_flops_per_sample() -> float:
    """Forward and backward of the MLP on one digits sample (8x8, 10 classes), counted by torch."""
    model = build_model(ModelSpec(**MLP), (1, 8, 8), 10, [tuple(range(10))], "class-il")
    with FlopCounterMode(display=False) as mode:
        F.cross_entropy(model(torch.randn(1, 1, 8, 8)), torch.tensor([3])).backward()
    return mode.get_total_flops()


@pytest.mark.parametrize("strategy", [{"name": "naive"}, {"name": "replay"}, {"name": "der"}, {"name": "joint"}],
                         ids=lambda s: s["name"])
def test_flops_per_trained_sample_match_the_analytic_mlp_count(strategy: dict, tmp_path: Path) -> None:
    """Replayed samples (in the batch, or DER++'s memory batches) are trained samples at the same rate."""
    costs = run_trial(tiny_trial(strategy, model=MLP, train=TRAIN), tmp_path).costs
    rate, analytic = costs["train_flops"] / costs["samples_seen"], analytic_flops_per_sample()
    print(f"{strategy['name']}: {rate / 1e6:.4f} MFLOP per trained sample, analytic {analytic / 1e6:.4f}")
    assert rate == pytest.approx(analytic, rel=0.01)


def test_vector_products_and_analytic_counts_are_counted_only_inside_a_measured_block() -> None:
    meter = FlopMeter()
    g, G = torch.randn(100), torch.randn(3, 100)
    count_flops(1e9)  # no block open: not counted
    with meter.counting():
        g @ g  # aten.dot
        G @ g  # aten.mv
        count_flops(7)
    assert meter.total == 2 * 100 + 2 * 3 * 100 + 7


def test_the_quadratic_penalty_is_counted() -> None:
    model = build_model(ModelSpec(**MLP), (1, 8, 8), 10, [tuple(range(10))], "class-il")
    anchor = snapshot(model)
    weights = sum(a.numel() for a in anchor.values())
    meter = FlopMeter()
    with meter.counting():
        quadratic_penalty(model, anchor, {n: torch.ones_like(a) for n, a in anchor.items()})
    assert meter.total == 8 * weights


def test_penalised_steps_cost_more_than_plain_ones(tmp_path: Path) -> None:
    """EWC's Fisher passes and the penalty on every step of its second experience (8 FLOPs per
    weight) put it above the analytic rate."""
    costs = run_trial(tiny_trial({"name": "ewc", "fisher_samples": 32}, model=MLP, train=TRAIN), tmp_path).costs
    assert costs["train_flops"] / costs["samples_seen"] > analytic_flops_per_sample() * 1.05


@pytest.mark.parametrize("model", [MLP, {"name": "cnn"}, {"name": "resnet18"}], ids=lambda m: m["name"])
def test_the_meter_counts_what_torchs_flop_counter_counts(model: dict) -> None:
    """The meter's own dispatch mode (cheaper than FlopCounterMode) uses torch's formulas: the same
    total over a training step (forward, backward, optimizer), convolutions and BatchNorm included."""
    shape = (1, 8, 8) if model["name"] == "mlp" else (3, 32, 32)
    net = build_model(ModelSpec(**model), shape, 10, [tuple(range(10))], "class-il")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, *shape), torch.tensor([0, 3, 5, 9])

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    with FlopCounterMode(display=False) as reference:
        step()
    meter = FlopMeter()
    with meter.counting():
        step()
    assert reference.get_total_flops() > 0
    assert meter.total == reference.get_total_flops()
