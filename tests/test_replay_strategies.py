"""Behaviour of the replay and gradient-projection strategies: DER, iCaRL, GDumb, A-GEM, GEM.

The hooks run on a real Trainer's context (digits, a small MLP); the projections also on vectors
built to conflict.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clgrid.strategies import Batch
from clgrid.strategies.agem import project as agem_project
from clgrid.strategies.episodic import flat_grad, loss_grad, set_flat_grad, trainable
from clgrid.strategies.gem import project as gem_project
from clgrid.strategies.icarl import herding
from clgrid.train.trainer import Trainer
from conftest import tiny_trial


def make_trainer(strategy: dict, tmp_path: Path, scenario: str = "class-il") -> Trainer:
    return Trainer(tiny_trial(strategy, scenario), tmp_path)


def finish_experience(trainer: Trainer, index: int) -> None:
    """Fires before/after_experience of experience ``index`` without training (the hooks' own work only)."""
    ctx = trainer.ctx
    ctx.experience, ctx.seen = trainer.stream.train[index], trainer.stream.train[: index + 1]
    trainer.strategy.before_experience(ctx)
    trainer.strategy.after_experience(ctx)


def conflicting_gradient(g_ref: torch.Tensor, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(g_ref.shape, generator=torch.Generator().manual_seed(seed))
    return -g_ref + 0.1 * noise * g_ref.norm() / noise.norm()


# ---- A-GEM -------------------------------------------------------------------------------------

def test_agem_projection_removes_the_conflict_and_keeps_agreeing_gradients() -> None:
    g_ref = torch.tensor([1.0, 2.0, 0.0])
    g = torch.tensor([-3.0, 1.0, 5.0])  # g . g_ref = -1
    projected = agem_project(g, g_ref)
    assert projected @ g_ref == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(projected, g - (-1.0 / 5.0) * g_ref)
    agreeing = torch.tensor([1.0, 0.0, -7.0])
    assert torch.equal(agem_project(agreeing, g_ref), agreeing)


def test_agem_hook_projects_the_model_gradient_against_the_memory(tmp_path: Path) -> None:
    trainer = make_trainer({"name": "agem", "buffer_size": 40, "reference_batch_size": 1000}, tmp_path)
    finish_experience(trainer, 0)
    ctx = trainer.ctx
    assert len(ctx.replay) == 40 and set(ctx.replay.column("t").tolist()) == {0}
    params = trainable(ctx.model)
    g_ref = loss_grad(ctx, params, ctx.replay.rows())
    set_flat_grad(params, conflicting_gradient(g_ref))
    trainer.strategy.after_backward(None, ctx)
    assert flat_grad(params) @ g_ref >= -1e-4 * (g_ref @ g_ref)


# ---- GEM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_gem_qp_solution_satisfies_every_constraint(margin: float) -> None:
    gen = torch.Generator().manual_seed(0)
    memory_grads = torch.randn(4, 50, generator=gen)
    g = -memory_grads.sum(0) + 0.5 * torch.randn(50, generator=gen)
    assert (memory_grads @ g < 0).any()
    projected = gem_project(g, memory_grads, margin)
    # the dual's small ridge (for a strictly convex QP) may leave a violation of a fraction of a percent
    assert (memory_grads @ projected >= -1e-2 * memory_grads.norm(dim=1) * g.norm()).all()
    # the change is G'v with v >= margin (the dual), and with margin 0 it is the closest feasible
    # gradient: a constraint whose dual variable is positive holds with equality (KKT)
    v = torch.linalg.lstsq(memory_grads.T, (projected - g).unsqueeze(1)).solution.squeeze(1)
    assert (v >= margin - 1e-3).all() and (v > margin + 1e-3).any()
    if margin == 0:
        assert (memory_grads @ projected)[v > 1e-3].abs().max() < 1e-2 * g.norm() * memory_grads.norm(dim=1).max()


def test_gem_hook_keeps_the_loss_of_every_past_experience_from_rising(tmp_path: Path) -> None:
    trainer = make_trainer({"name": "gem", "buffer_size": 40}, tmp_path)
    finish_experience(trainer, 0)
    finish_experience(trainer, 1)
    ctx = trainer.ctx
    experiences = ctx.replay.column("t")
    assert (experiences == 0).sum() == 20 and (experiences == 1).sum() == 20  # split over the experiences seen
    params = trainable(ctx.model)
    memory_grads = torch.stack([loss_grad(ctx, params, ctx.replay.rows(experiences == k)) for k in (0, 1)])
    g = conflicting_gradient(memory_grads.sum(0))
    set_flat_grad(params, g)
    assert (memory_grads @ g < 0).all()
    trainer.strategy.after_backward(None, ctx)
    assert (memory_grads @ flat_grad(params) >= -1e-2 * memory_grads.norm(dim=1) * g.norm()).all()


# ---- GDumb -------------------------------------------------------------------------------------

def test_gdumb_memory_is_class_balanced_and_only_the_memory_is_trained(tmp_path: Path) -> None:
    epochs, buffer = 3, 50
    trainer = make_trainer({"name": "gdumb", "buffer_size": buffer, "epochs": epochs}, tmp_path)
    memory_sizes = []
    trainer.on_experience = lambda report: memory_sizes.append(len(trainer.ctx.replay))
    result = trainer.run()
    counts = torch.bincount(trainer.ctx.replay.column("y"), minlength=10)
    assert counts.sum() == buffer and counts.max() - counts.min() <= 1
    # the stream's own batches were never trained on: every sample seen came from ctx.fit on the memory
    assert result.costs["samples_seen"] == epochs * sum(memory_sizes)


# ---- iCaRL -------------------------------------------------------------------------------------

def test_herding_mean_approaches_the_class_mean() -> None:
    features = F.normalize(torch.rand(300, 16, generator=torch.Generator().manual_seed(0)) ** 3, dim=1)
    order = herding(features, 40)
    assert len(set(order.tolist())) == 40
    gap = [(features[order[:k]].mean(0) - features.mean(0)).norm().item() for k in (1, 5, 20, 40)]
    assert gap == sorted(gap, reverse=True) and gap[-1] < 0.2 * gap[0]
    random_gap = (features[:40].mean(0) - features.mean(0)).norm().item()
    assert gap[-1] < random_gap


def test_icarl_exemplars_stay_within_the_buffer_and_shrink_to_their_best(tmp_path: Path) -> None:
    trainer = make_trainer({"name": "icarl", "buffer_size": 37}, tmp_path)
    ctx = trainer.ctx
    finish_experience(trainer, 0)
    first = ctx.replay.rows()
    assert torch.bincount(first["y"]).tolist() == [7] * 5  # 37 // 5 classes
    scores = trainer.strategy.predict(first["x"], first["t"], ctx)
    assert torch.isinf(scores[:, 5:]).all()  # classes without exemplars are never predicted

    finish_experience(trainer, 1)
    rows = ctx.replay.rows()
    assert len(rows["y"]) <= 37 and torch.bincount(rows["y"]).tolist() == [3] * 10
    for c in range(5):  # an old class keeps the first (highest-priority) of its exemplars
        assert torch.equal(rows["x"][rows["y"] == c], first["x"][first["y"] == c][:3])


# ---- DER ---------------------------------------------------------------------------------------

def test_der_stores_logits_and_its_loss_vanishes_for_the_model_that_stored_them(tmp_path: Path) -> None:
    trainer = make_trainer({"name": "der", "buffer_size": 100, "beta": 0.0}, tmp_path)
    ctx, der = trainer.ctx, trainer.strategy
    exp = trainer.stream.train[0]
    ctx.experience, ctx.seen = exp, [exp]
    batch = Batch(exp.x[:32], exp.y[:32], torch.zeros(32, dtype=torch.long))
    output = ctx.mask(ctx.model(batch.x, batch.t), batch.t)
    assert der.loss(batch, output, ctx) is None  # empty memory
    der.after_step(batch, ctx)
    assert torch.equal(ctx.replay.rows()["logits"], output.detach())

    assert der.loss(batch, output, ctx).item() == 0.0  # same weights, same logits
    with torch.no_grad():
        next(ctx.model.parameters()).add_(0.1)
    assert der.loss(batch, output, ctx).item() > 0.0
