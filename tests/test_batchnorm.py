"""BatchNorm models: importance, teacher and herding passes run in eval mode and leave the statistics alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from clgrid.strategies._penalty import per_sample_gradient_mean
from clgrid.train import trainer as trainer_module
from clgrid.train.models import ModelSpec
from clgrid.train.trainer import Trainer, run_trial
from conftest import tiny_trial
from test_regularization import ewc_losses, mas_losses, vmap_reference
from test_strategy_contract import batchnorm_model


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize("squared", [True, False], ids=["ewc-fisher", "mas-importance"])
def test_closed_form_importance_on_a_batchnorm_model_equals_per_sample_vmap_in_eval_mode(squared: bool) -> None:
    torch.manual_seed(0)
    model = batchnorm_model(ModelSpec(), (3, 8, 8), 10, [tuple(range(10))], "class-il")
    model.train()
    model(torch.randn(64, 3, 8, 8))  # running statistics away from their initial 0 and 1
    x, y, t = torch.randn(48, 3, 8, 8), torch.randint(10, (48,)), torch.zeros(48, dtype=torch.long)
    losses = ewc_losses if squared else mas_losses
    before = batchnorm_buffers(model)
    new = per_sample_gradient_mean(model, losses, x, y, t, squared=squared)
    assert model.training  # the mode it was called in
    assert all(torch.equal(before[n], b) for n, b in batchnorm_buffers(model).items())
    model.eval()
    old = vmap_reference(model, losses, x, y, t, squared=squared)
    for n in old:
        torch.testing.assert_close(new[n], old[n], rtol=1e-5, atol=1e-5 * float(old[n].abs().max()))


@pytest.mark.parametrize("name", ["ewc", "mas", "icarl"])
def test_after_experience_leaves_mode_and_batchnorm_statistics_alone(name: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_module, "build_model", batchnorm_model)
    trainer = Trainer(tiny_trial({"name": name}), tmp_path, instrument=False)
    after_experience, seen = trainer.strategy.after_experience, []

    def checked(ctx) -> None:
        before = batchnorm_buffers(ctx.model)
        after_experience(ctx)
        seen.append(ctx.model.training and all(torch.equal(before[n], b)
                                                for n, b in batchnorm_buffers(ctx.model).items()))

    trainer.strategy.after_experience = checked
    trainer.run()
    assert seen == [True, True]
    if name == "icarl":
        assert trainer.strategy.teacher is not None and not trainer.strategy.teacher.training


@pytest.mark.parametrize("strategy", [{"name": "ewc", "fisher_samples": 32}, {"name": "mas", "samples": 32}],
                         ids=lambda s: s["name"])
def test_ewc_and_mas_train_a_resnet18(strategy: dict, tmp_path: Path) -> None:
    """Before eval-mode importances these stopped with "attempted to call in-place operation"."""
    result = run_trial(tiny_trial(strategy, model={"name": "resnet18"}, train={"iterations": 2, "batch_size": 16}),
                       tmp_path)
    assert len(result.R) == 2 and result.costs["train_flops"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["ewc", "mas", "icarl"])
def test_importance_teachers_and_herding_run_on_a_batchnorm_model_under_autocast(
        name: str, precision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path's usual case: a BatchNorm network in mixed precision trains through EWC's and
    MAS's importance and iCaRL's teacher and herding, its running statistics finite."""
    monkeypatch.setattr(trainer_module, "build_model", batchnorm_model)
    trial = tiny_trial({"name": name}, train={"iterations": 4, "batch_size": 32, "lr": 0.01, "precision": precision})
    trainer = Trainer(trial, tmp_path, instrument=False)
    before = batchnorm_buffers(trainer.ctx.model)
    result = trainer.run()
    assert all(0.0 <= a <= 1.0 for row in result.R for a in row)
    after = batchnorm_buffers(trainer.ctx.model)
    assert not all(torch.equal(before[n], after[n]) for n in before)  # training moved them
    assert all(torch.isfinite(b.float()).all() for b in after.values())
