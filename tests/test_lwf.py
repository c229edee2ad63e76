"""LwF's two class-IL distillations: over the old classes (`old`) and padded (`padded`, van de Ven et al. 2022)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from clgrid.strategies.base import Batch
from clgrid.strategies.lwf import LwFConfig, distillation, padded_distillation
from clgrid.train.trainer import Trainer
from conftest import tiny_trial
from test_strategy_contract import trains_and_resumes


def test_padded_distillation_on_hand_made_logits() -> None:
    # Teacher uniform over 2 old classes; student uniform over 3 (the third is new): the padded
    # teacher is (1/2, 1/2, 0), so KL = 2 * 1/2 * log((1/2) / (1/3)) = log 1.5.
    teacher, student = torch.zeros(1, 2), torch.zeros(1, 3)
    assert padded_distillation(student, teacher, 1.0).item() == pytest.approx(math.log(1.5), abs=1e-6)
    # T^2 scaling: the same probabilities at T = 2 (logits doubled) give 4x the loss.
    assert padded_distillation(2 * student, 2 * teacher, 2.0).item() == pytest.approx(4 * math.log(1.5), abs=1e-6)
    # The old-class softmax ignores the new column: the same scores agree there.
    assert distillation(student[:, :2], teacher, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_padded_distillation_penalises_mass_on_new_classes_only() -> None:
    g = torch.Generator().manual_seed(0)
    old = torch.randn(16, 4, generator=g)
    # Without new classes it is the old-class distillation.
    assert padded_distillation(old, old + 3.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert padded_distillation(old * 2, old, 2.0).item() == pytest.approx(distillation(old * 2, old, 2.0).item(),
                                                                           rel=1e-5)
    # The student agrees on the old classes; the more it puts on a new one, the larger the loss.
    losses = [padded_distillation(torch.cat([old, torch.full((16, 1), v)], 1), old, 2.0).item()
              for v in (-60.0, 0.0, 5.0)]
    assert losses[0] < 1e-6 < losses[1] < losses[2]
    # Its gradient pushes the new-class score down.
    new = torch.zeros(16, 1, requires_grad=True)
    padded_distillation(torch.cat([old, new], 1), old, 2.0).backward()
    assert (new.grad > 0).all()


def test_distill_field_defaults_to_old_and_refuses_other_values() -> None:
    assert LwFConfig().distill == "old"
    with pytest.raises(ValidationError, match="distill"):
        LwFConfig(distill="zeros")


def class_il_loss_at_experience_1(distill: str, tmp_path: Path, new_class_bias: float) -> float:
    """LwF's loss on experience 1's first batch (digits class-il: classes 0-4, then 5-9), the teacher
    taken and then the student's score of class 9 raised by ``new_class_bias``."""
    trainer = Trainer(tiny_trial({"name": "lwf", "distill": distill}), tmp_path, instrument=False)
    ctx, exp = trainer.ctx, trainer.stream.train[1]
    ctx.experience, ctx.seen = exp, trainer.stream.train[:2]
    trainer.strategy.before_experience(ctx)
    with torch.no_grad():
        ctx.model.head.bias[9].add_(new_class_bias)
    batch = Batch(exp.x[:32], exp.y[:32], torch.full((32,), 1))
    return trainer.strategy.loss(batch, ctx.mask(ctx.model(batch.x, batch.t), batch.t), ctx).item()


def test_padded_lwf_distils_the_new_classes_too(tmp_path: Path) -> None:
    """A student scoring a new class higher than its teacher did pays only under `padded`."""
    assert class_il_loss_at_experience_1("old", tmp_path / "o", 5.0) < 1e-6
    unchanged = class_il_loss_at_experience_1("padded", tmp_path / "p0", 0.0)
    assert class_il_loss_at_experience_1("padded", tmp_path / "p5", 5.0) > unchanged + 1e-3


def test_padded_lwf_trains_and_resumes_exactly(tmp_path: Path) -> None:
    full, resumed = trains_and_resumes(tiny_trial({"name": "lwf", "distill": "padded"}, "class-il"), tmp_path)
    assert resumed.R == full.R and resumed.b == full.b
