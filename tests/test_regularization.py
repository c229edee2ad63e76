"""L2, EWC, SI, MAS and LwF: they protect old experiences, their importances and distillation behave."""

from __future__ import annotations

from pathlib import Path

import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from clgrid.strategies import Batch
from clgrid.strategies._penalty import per_sample_gradient_mean
from clgrid.strategies.lwf import distillation
from clgrid.train.models import ModelSpec, build_model
from clgrid.train.trainer import Trainer, run_trial
from conftest import tiny_trial

# permuted digits: naive drops experience 0 from about 0.8 to about 0.4 in these 30 steps
FORGETTING_TRAIN = {"iterations": 30, "batch_size": 32, "lr": 0.01}


def accuracy_matrix(strategy: dict, scenario: str, folder: Path, **overrides) -> list[list[float]]:
    return run_trial(tiny_trial(strategy, scenario, **overrides), folder, instrument=False).R


@pytest.fixture(scope="module")
def naive(tmp_path_factory: pytest.TempPathFactory) -> list[list[float]]:
    return accuracy_matrix({"name": "naive"}, "domain-il", tmp_path_factory.mktemp("naive"), train=FORGETTING_TRAIN)


def test_l2_with_zero_lambda_is_exactly_naive(naive: list[list[float]], tmp_path: Path) -> None:
    assert accuracy_matrix({"name": "l2", "l2_lambda": 0.0}, "domain-il", tmp_path, train=FORGETTING_TRAIN) == naive


@pytest.mark.parametrize("strategy", [
    {"name": "l2", "l2_lambda": 100.0},
    {"name": "ewc", "ewc_lambda": 1e4},
    {"name": "si", "c": 100.0},
    {"name": "mas", "mas_lambda": 100.0},
    {"name": "lwf", "alpha": 10.0},
], ids=lambda s: s["name"])
def test_strong_regularization_keeps_experience_0_better_than_naive(strategy: dict, naive: list[list[float]],
                                                                   tmp_path: Path) -> None:
    kept = accuracy_matrix(strategy, "domain-il", tmp_path, train=FORGETTING_TRAIN)
    assert kept[0] == naive[0]  # nothing to protect during experience 0: the same training
    assert kept[1][0] > naive[1][0] + 0.2


@pytest.mark.parametrize("name", ["si", "mas"])
def test_importance_is_non_negative_grows_and_is_zero_for_blank_pixels(name: str, tmp_path: Path) -> None:
    trial = tiny_trial({"name": name, **({"samples": 10_000} if name == "mas" else {})}, "task-il")
    importances = []
    trainer = Trainer(trial, tmp_path, instrument=False,
                      on_experience=lambda report: importances.append(
                          {n: v.clone() for n, v in trainer.strategy.state_dict()["importance"].items()}))
    trainer.run()
    after_0, after_1 = importances
    assert all((v >= 0).all() and v.sum() > 0 for v in after_0.values())
    assert all(after_1[n].sum() > after_0[n].sum() for n in after_0)  # summed over experiences
    # pixels blank in every image of experience 0 give their input weights no gradient: no importance
    first = after_0["backbone.layers.1.weight"]
    blank = (trainer.stream.train[0].x.flatten(1) == 0).all(0)
    assert blank.any() and (first[:, blank] == 0).all() and first[:, ~blank].sum() > 0


def test_distillation_is_zero_only_when_student_equals_teacher() -> None:
    scores = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert distillation(scores, scores, 2.0).abs() < 1e-6
    assert distillation(scores, scores + 5.0, 2.0).abs() < 1e-6  # a shift changes no probability
    assert distillation(scores * 2, scores, 2.0) > 1e-3


def lwf_loss_at_start_of_experience_1(scenario: str, tmp_path: Path, perturb, **overrides) -> float:
    """LwF's loss on experience 1's first batch, with the teacher taken and then the student perturbed."""
    trainer = Trainer(tiny_trial({"name": "lwf"}, scenario, **overrides), tmp_path, instrument=False)
    ctx, exp = trainer.ctx, trainer.stream.train[1]
    ctx.experience, ctx.seen = exp, trainer.stream.train[:2]
    trainer.strategy.before_experience(ctx)
    with torch.no_grad():
        perturb(ctx.model)
    batch = Batch(exp.x[:32], exp.y[:32], torch.full((32,), 1))
    output = ctx.mask(ctx.model(batch.x, batch.t), batch.t)
    return trainer.strategy.loss(batch, output, ctx).item()


def test_lwf_distills_only_the_classes_seen_before(tmp_path: Path) -> None:
    def head_row(cls: int, scale: float = 5.0):
        return lambda model: model.head.weight[cls].mul_(scale)

    new_class, old_class = 9, 0  # digits class-il, 2 experiences: 0-4, then 5-9
    assert lwf_loss_at_start_of_experience_1("class-il", tmp_path / "same", lambda m: None) < 1e-6
    assert lwf_loss_at_start_of_experience_1("class-il", tmp_path / "new", head_row(new_class)) < 1e-6
    assert lwf_loss_at_start_of_experience_1("class-il", tmp_path / "old", head_row(old_class)) > 1e-3


def test_lwf_in_task_il_distills_the_old_task_head_from_new_task_batches(tmp_path: Path) -> None:
    multi = {"model": {"name": "mlp", "hidden": [32], "heads": "multi"}}

    def old_head(model):
        model.head.heads[0].weight.mul_(5.0)

    def new_head(model):
        model.head.heads[1].weight.mul_(5.0)

    assert lwf_loss_at_start_of_experience_1("task-il", tmp_path / "same", lambda m: None, **multi) < 1e-6
    assert lwf_loss_at_start_of_experience_1("task-il", tmp_path / "new", new_head, **multi) < 1e-6
    assert lwf_loss_at_start_of_experience_1("task-il", tmp_path / "old", old_head, **multi) > 1e-3


def vmap_reference(model: nn.Module, sample_losses: Callable[[Tensor, Tensor, Tensor], Tensor],
                   x: Tensor, y: Tensor, t: Tensor, *, squared: bool, chunk: int = 128) -> dict[str, Tensor]:
    """The importance as clgrid computed it before the closed form: a true per-sample gradient
    (vmap of grad over batches of one), squared or absolute, averaged."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor, ti: Tensor) -> Tensor:
        return sample_losses(functional_call(model, p, (xi[None], ti[None])), yi[None], ti[None]).sum()

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))
    for start in range(0, len(y), chunk):
        s = slice(start, start + chunk)
        for n, g in per_sample(params, x[s], y[s], t[s]).items():
            total[n] += (g.square() if squared else g.abs()).sum(0)
    return {n: v / len(y) for n, v in total.items()}


def ewc_losses(scores: Tensor, y: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(scores, y, reduction="none")


def mas_losses(scores: Tensor, y: Tensor, t: Tensor) -> Tensor:
    return scores[:, :4].pow(2).sum(1)


IMPORTANCE_MODELS = {  # (model, input shape, scenario): the MLP, the CNN, multi-head task-IL
    "mlp": ({"name": "mlp"}, (1, 28, 28), "class-il"),
    "cnn": ({"name": "cnn", "channels": [8, 16]}, (3, 12, 12), "class-il"),
    "mlp-multihead": ({"name": "mlp", "hidden": [32], "heads": "multi"}, (1, 8, 8), "task-il"),
}


def importance_case(name: str, n: int = 96) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    spec, shape, scenario = IMPORTANCE_MODELS[name]
    torch.manual_seed(0)
    model = build_model(ModelSpec(**spec), shape, 10, [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)], scenario)
    x, y, t = torch.randn(n, *shape), torch.randint(10, (n,)), torch.randint(2, (n,))
    return model, x, y, t


@pytest.mark.parametrize("name", IMPORTANCE_MODELS)
@pytest.mark.parametrize("squared", [True, False], ids=["ewc-fisher", "mas-importance"])
def test_closed_form_importance_equals_per_sample_vmap(name: str, squared: bool) -> None:
    model, x, y, t = importance_case(name)
    losses = ewc_losses if squared else mas_losses
    new = per_sample_gradient_mean(model, losses, x, y, t, squared=squared)
    old = vmap_reference(model, losses, x, y, t, squared=squared)
    assert new.keys() == old.keys()
    for n in old:
        torch.testing.assert_close(new[n], old[n], rtol=1e-5, atol=1e-5 * float(old[n].abs().max()))
        assert old[n].abs().sum() > 0 or name == "mlp-multihead"  # a multi-head model's unused head may be 0


def test_closed_form_importance_is_10x_faster_than_vmap_on_the_mlp() -> None:
    """The issue's MLP (2x400 on 28x28 inputs), EWC's 256 Fisher samples, one torch thread (as a
    trial on one CPU); best of 5, as other processes share the machine."""
    model, x, y, t = importance_case("mlp", n=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def best_of(f: Callable[[], object], repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        for squared in (True, False):
            losses = ewc_losses if squared else mas_losses
            old = best_of(lambda: vmap_reference(model, losses, x, y, t, squared=squared), repeats=2)
            new = best_of(lambda: per_sample_gradient_mean(model, losses, x, y, t, squared=squared))
            print(f"{'EWC Fisher' if squared else 'MAS importance'} on 256 samples: vmap {old * 1e3:.1f} ms, "
                  f"closed form {new * 1e3:.1f} ms, x{old / new:.1f}")
            assert old / new >= 10
    finally:
        torch.set_num_threads(threads)
