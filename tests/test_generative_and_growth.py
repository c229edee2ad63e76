"""Generative replay, DEN and SSL pretraining: the behaviour each one promises, on tiny digit trials."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clgrid.strategies import REGISTRY, Batch
from clgrid.strategies.den import DENNet, remap
from clgrid.strategies.generative_replay import VAE
from clgrid.strategies.ssl_pretrain import SSLPretrainConfig, augment, nt_xent
from clgrid.train.trainer import Trainer, run_trial
from conftest import tiny_trial


def reconstruction_error(vae: VAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        mu, _ = vae.encoder(x).chunk(2, dim=1)
        return float(F.binary_cross_entropy_with_logits(vae.decoder(mu), x.flatten(1)))


@pytest.fixture(scope="module")
def dgr(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    trainer = Trainer(tiny_trial({"name": "generative_replay", "generator_budget": 10}), tmp_path_factory.mktemp("dgr"))
    trainer.run()
    return trainer


def test_generator_learns_every_experience_so_far(dgr: Trainer) -> None:
    vae = dgr.strategy.generator
    torch.manual_seed(0)
    untrained = VAE(vae.encoder[1].in_features, vae.encoder[1].out_features, vae.latent)
    for exp in dgr.stream.test:  # experience 0 only through the generator's replay of itself
        assert reconstruction_error(vae, exp.x) < 0.9 * reconstruction_error(untrained, exp.x)


def test_generated_samples_are_labelled_by_the_previous_solver(dgr: Trainer) -> None:
    ctx, strategy = dgr.ctx, dgr.strategy
    old_classes = torch.tensor(ctx.stream.train[0].classes)
    assert any(not torch.equal(a, b) for a, b in zip(strategy.solver.parameters(), ctx.model.parameters()))
    real = Batch(ctx.experience.x[:16], ctx.experience.y[:16], torch.full((16,), 1))
    current = ctx.model
    ctx.model = copy.deepcopy(current)
    torch.nn.init.normal_(ctx.model.head.weight)  # a current model that disagrees with the previous one
    replayed = strategy.train_batch(real, ctx)
    ctx.model = current
    x, y, t = replayed.x[16:], replayed.y[16:], replayed.t[16:]
    assert len(y) == 16 and x.shape[1:] == real.x.shape[1:]  # one previous experience: one sample per real one
    assert torch.isin(y, old_classes).all() and (t == 0).all()
    with torch.no_grad():
        expected = old_classes[strategy.solver(x, t)[:, old_classes].argmax(1)]
    assert torch.equal(y, expected)


def test_remap_grows_units_without_changing_what_the_network_computes() -> None:
    torch.manual_seed(0)
    net = DENNet(12, [6, 5], [[0, 1], [2, 3]], 4)
    x, t = torch.rand(7, 12), torch.tensor([0, 1, 0, 1, 0, 1, 1])
    grown = remap(net, [torch.cat([torch.arange(6), torch.full((3,), -1)]), torch.cat([torch.arange(5), torch.full((2,), -1)])], 1)
    assert grown.widths == [9, 7] and grown.born0[6:].tolist() == [1, 1, 1]
    assert torch.allclose(grown(x, t), net(x, t), atol=1e-6)
    assert torch.equal(grown.layers[1].weight[:5, :6], net.layers[1].weight)  # kept units: bitwise copies
    assert (grown.layers[1].weight[:5, 6:] == 0).all() and (grown.heads[0].weight[:, 5:] == 0).all()


def test_den_grows_by_at_most_k_per_layer_and_keeps_earlier_tasks_units(tmp_path: Path) -> None:
    k, sigma = 4, 0.05
    trial = tiny_trial({"name": "den", "expand_units": k, "loss_threshold": 0.0, "split_threshold": sigma}, "task-il",
                       train={"iterations": 20, "batch_size": 32, "lr": 0.01})
    trainer = Trainer(trial, tmp_path)
    nets = []
    trainer.on_experience = lambda report: nets.append(copy.deepcopy(trainer.ctx.model))
    result = trainer.run()
    before, after = nets
    growth = trainer.strategy.growth[1]
    assert all(0 < e <= k for e in growth["expanded"]) and sum(growth["split"]) > 0
    assert after.widths == [w + e + s for w, e, s in zip(before.widths, growth["expanded"], growth["split"])]
    sizes = [h.costs["model_bytes"] for h in result.history]
    assert sizes[1] > sizes[0]
    assert torch.equal(after.heads[0].weight[:, : before.widths[-1]], before.heads[0].weight)
    for l, (old, new) in enumerate(zip(before.layers, after.layers)):
        n, c = old.weight.shape
        drift = torch.cat([new.weight[:n, :c] - old.weight, (new.bias[:n] - old.bias)[:, None]], 1).norm(dim=1)
        retired = after.stamps(l)[1][:n] == 1
        assert retired.sum() == growth["split"][l]
        assert (drift[retired] == 0).all()  # split units give task 0 back its exact weights
        assert (drift[~retired] <= sigma).all()  # the rest drifted no more than the threshold
        assert (drift == 0).any()  # units outside the retrained subnetwork are untouched
    # task 0 then computes almost what it computed before experience 1
    x0 = trainer.stream.test[0].x
    t0 = torch.zeros(len(x0), dtype=torch.long)
    with torch.no_grad():
        assert (after(x0, t0).argmax(1) == before(x0, t0).argmax(1)).float().mean() > 0.95


@pytest.mark.skipif("progressive" not in REGISTRY, reason="no progressive strategy registered")
def test_den_grows_less_than_a_progressive_network(tmp_path: Path) -> None:
    den = run_trial(tiny_trial({"name": "den", "loss_threshold": 0.0}, "task-il"), tmp_path / "den")
    pnn = run_trial(tiny_trial({"name": "progressive"}, "task-il"), tmp_path / "pnn")
    assert den.history[-1].costs["model_bytes"] < pnn.history[-1].costs["model_bytes"]


def test_nt_xent_prefers_matching_views() -> None:
    g = torch.Generator().manual_seed(0)
    z, other = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    assert nt_xent(z, z, 0.5) < nt_xent(z, z + 0.1 * other, 0.5) < nt_xent(z, other, 0.5)


def test_augment_is_random_per_image_and_reproducible_from_the_generator() -> None:
    x = torch.rand(4, 1, 8, 8)
    config = SSLPretrainConfig()
    a, b = augment(x, config, torch.Generator().manual_seed(1)), augment(x, config, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, augment(x, config, torch.Generator().manual_seed(2)))


def test_ssl_pretraining_moves_the_backbone_before_the_labels_are_used(tmp_path: Path) -> None:
    trainer = Trainer(tiny_trial({"name": "ssl_pretrain", "finetune_backbone": False}), tmp_path)
    ctx = trainer.ctx
    ctx.experience, ctx.seen = trainer.stream.train[0], trainer.stream.train[:1]
    backbone, head = copy.deepcopy(ctx.model.backbone.state_dict()), copy.deepcopy(ctx.model.head.state_dict())
    trainer.strategy.before_experience(ctx)
    assert all(not torch.equal(v, ctx.model.backbone.state_dict()[k]) for k, v in backbone.items())
    assert all(torch.equal(v, ctx.model.head.state_dict()[k]) for k, v in head.items())
    # the supervised phase then trains the head only
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in ctx.model.head.parameters()}
