"""Representation probes (issue 16): each formula on hand-made tensors, then on a tiny real MLP."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from clgrid.train import probes
from clgrid.train.models import ModelSpec, build_model

rng = np.random.default_rng(0)
X = rng.normal(size=(200, 6))


def test_cka_of_identical_features_is_one() -> None:
    assert probes.linear_cka(X, X) == pytest.approx(1.0)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling() -> None:
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert probes.linear_cka(X, X @ Q) == pytest.approx(1.0)
    assert probes.linear_cka(X, -3.5 * X) == pytest.approx(1.0)


def test_cka_of_independent_features_is_near_zero_and_symmetric() -> None:
    A, B = rng.normal(size=(2000, 10)), rng.normal(size=(2000, 10))
    assert probes.linear_cka(A, B) < 0.05
    Y = X[:, :3] @ rng.normal(size=(3, 4)) + 0.5 * rng.normal(size=(200, 4))
    assert probes.linear_cka(X, Y) == pytest.approx(probes.linear_cka(Y, X))
    assert 0.0 < probes.linear_cka(X, Y) < 1.0


def test_cka_accepts_tensors_of_different_widths() -> None:
    A = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    assert probes.linear_cka(A, torch.cat([A, A], dim=1)) == pytest.approx(1.0)


def test_probe_scores_separable_classes_with_global_ids() -> None:
    centres = {3: np.full(400, 2.0), 7: np.full(400, -2.0), 9: np.r_[np.full(200, 2.0), np.full(200, -2.0)]}
    labels = np.repeat([3, 7, 9], 100)
    feats = np.stack([centres[c] for c in labels]) + rng.normal(size=(300, 400))
    acc = probes.fit_probe(feats[::2], labels[::2], feats[1::2], labels[1::2], probes.ProbeConfig())
    assert acc == 1.0
    # a test class the probe never saw is counted wrong, not an error
    unseen = probes.fit_probe(feats[labels != 9], labels[labels != 9], feats, labels, probes.ProbeConfig())
    assert unseen == pytest.approx(2 / 3)


def test_probe_on_one_class_predicts_it() -> None:
    assert probes.fit_probe(X[:10], np.full(10, 4), X[:4], np.array([4, 4, 1, 4]), probes.ProbeConfig()) == 0.75


def test_probe_config_is_frozen_and_checked() -> None:
    with pytest.raises(ValidationError):
        probes.ProbeConfig(C=0)
    with pytest.raises(ValidationError):
        probes.ProbeConfig().C = 2.0  # type: ignore[misc]


def test_probe_metrics_on_a_hand_made_matrix() -> None:
    P = [[0.9, 0.2, 0.1], [0.8, 0.95, 0.3], [0.7, 0.9, 0.85]]
    assert probes.probe_acc(P) == pytest.approx((0.7 + 0.9 + 0.85) / 3)
    # exp 0: best earlier 0.9, final 0.7 -> 0.2; exp 1: best earlier 0.95, final 0.9 -> 0.05
    assert probes.probe_forgetting(P) == pytest.approx((0.2 + 0.05) / 2)


def test_weight_drift_and_unit_drift_on_hand_made_weights() -> None:
    before = {"hidden.0.weight": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "hidden.0.bias": torch.tensor([0.0, 4.0]),
              "head.weight": torch.ones(2, 2)}
    after = {k: v.clone() for k, v in before.items()}
    assert probes.weight_drift(before, after) == {"hidden.0": 0.0, "head": 0.0}
    after["hidden.0.weight"] = torch.tensor([[3.0, 0.0], [0.0, 5.0]])  # moved by 5; ||θ|| = ||(3, 4)|| = 5
    assert probes.weight_drift(before, after) == {"hidden.0": pytest.approx(1.0), "head": 0.0}
    units = probes.unit_drift(before, after)
    assert set(units) == {"hidden.0", "head"}
    assert units["hidden.0"].tolist() == [0.0, 5.0]
    assert units["head"].tolist() == [0.0, 0.0]


def test_prototype_drift_on_hand_made_means() -> None:
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    old = probes.class_means(feats, torch.tensor([0, 0, 1, 1]))
    assert old[0].tolist() == [1.0, 0.0] and old[1].tolist() == [0.0, 3.0]
    new = {0: torch.tensor([1.0, 3.0]), 1: torch.tensor([0.0, 2.0]), 5: torch.tensor([9.0, 9.0])}
    # class 0 moved 3, class 1 moved 1; class 5 is new, not drift
    assert probes.prototype_drift(old, new, mean_norm=2.0) == pytest.approx((3 + 1) / 2 / 2.0)
    assert probes.prototype_drift(old, {}, mean_norm=2.0) == 0.0


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(hidden=[16, 8]), (1, 4, 4), 4, [], "class-il")


def test_layer_features_names_shapes_and_leaves_no_trace() -> None:
    model = _mlp()
    model.train()
    model.backbone.eval()  # as feature extraction leaves it: both modes must survive the call
    x = torch.randn(10, 1, 4, 4)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    feats = probes.layer_features(model, x, batch_size=3)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert model.training and model.head.training and not model.backbone.training
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"hidden.0": (10, 16), "hidden.1": (10, 8)}
    with torch.no_grad():
        # the last layer is what the head reads (batches of 3 vs 10 round differently)
        assert torch.allclose(feats["hidden.1"], model.features(x), atol=1e-6)
    assert not any(m._forward_hooks for m in model.modules())


def test_layer_features_pool_the_cnn_blocks() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="cnn", channels=[4, 6]), (1, 8, 8), 3, [], "class-il")
    feats = probes.layer_features(model, torch.randn(5, 1, 8, 8), batch_size=2)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"hidden.0": (5, 4), "hidden.1": (5, 6)}
    assert set(probes.weight_drift(probes.layer_weights(model), probes.layer_weights(model))) == {
        "hidden.0", "hidden.1", "head"}


def test_frozen_layer_keeps_cka_one_and_zero_drift_while_the_trained_one_moves() -> None:
    model = _mlp()
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 4, (64,))
    feats0, weights0 = probes.layer_features(model, x, 32), probes.layer_weights(model)
    unchanged = probes.layer_features(model, x, 32)
    assert all(probes.linear_cka(feats0[k], unchanged[k]) == pytest.approx(1.0) for k in feats0)
    assert set(probes.weight_drift(weights0, probes.layer_weights(model)).values()) == {0.0}

    first = model.backbone.layers[1]  # train everything but the first hidden layer, as feature extraction does
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("backbone.layers.1.")], lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    drift = probes.weight_drift(weights0, probes.layer_weights(model))
    feats1 = probes.layer_features(model, x, 32)
    assert drift["hidden.0"] == 0.0 and drift["hidden.1"] > 0 and drift["head"] > 0
    assert probes.linear_cka(feats0["hidden.0"], feats1["hidden.0"]) == pytest.approx(1.0)
    assert probes.linear_cka(feats0["hidden.1"], feats1["hidden.1"]) < 1.0 - 1e-6
    assert torch.equal(probes.unit_drift(weights0, probes.layer_weights(model))["hidden.0"], torch.zeros(first.out_features))
