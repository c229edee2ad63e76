"""Representation probes (issue 16): what happens inside the network, not only at its outputs.

Pure functions over a model's features and weights, called after an experience's evaluation.
Layer names are shared by every instrument: "hidden.k" is the k-th block of the backbone
(an MLP's Linear+ReLU, a CNN's Conv+ReLU+MaxPool), "head" the classifier.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from clgrid.train import metrics
from clgrid.train.models import CLModel

ArrayLike = Tensor | np.ndarray


class ProbeConfig(BaseModel):
    """Settings of the linear probes (defaults: lbfgs converged within 150 iterations,
    0.2 s at most, on 800 x 400 MLP features of mnist5k on one core)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    C: float = Field(1.0, gt=0, description="inverse L2 strength of the probe's logistic regression")
    max_iter: int = Field(200, gt=0, description="lbfgs iterations; a probe stopped early still scores")
    seed: int = Field(0, description="the solver's random_state")


def _blocks(model: CLModel) -> list[list[nn.Module]]:
    """The backbone's ``layers`` split at each Linear/Conv2d (what precedes the first is dropped)."""
    layers = getattr(model.backbone, "layers", None)
    if not isinstance(layers, nn.Sequential):
        raise ValueError(f"probes need a backbone with a `layers` Sequential (mlp, cnn), got {type(model.backbone).__name__}")
    blocks: list[list[nn.Module]] = []
    for module in layers:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            blocks.append([])
        if blocks:
            blocks[-1].append(module)
    return blocks


def layer_features(model: CLModel, x: Tensor, batch_size: int) -> dict[str, Tensor]:
    """Each block's output for inputs ``x`` on the CPU, [n, width] (conv maps global-average-pooled).

    The last entry is the penultimate layer, the features the head reads. Runs in eval mode under
    inference_mode with hooks removed before returning: no RNG draw, no parameter or buffer change.
    """
    names = {block[-1]: f"hidden.{k}" for k, block in enumerate(_blocks(model))}
    outputs: dict[str, list[Tensor]] = defaultdict(list)

    def record(module: nn.Module, _inputs: tuple, out: Tensor) -> None:
        out = out.mean(dim=(2, 3)) if out.dim() == 4 else out.flatten(1)
        outputs[names[module]].append(out.cpu())

    handles = [m.register_forward_hook(record) for m in names]
    # per module: a strategy may keep part of a training model in eval mode (feature extraction's BN)
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                model.features(x[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return {name: torch.cat(outputs[name]) for name in names.values()}


def layer_weights(model: CLModel) -> dict[str, Tensor]:
    """A detached copy of the parameters keyed "<layer>.<weight|bias>" (layers named as above)."""
    owners = {block[0]: f"hidden.{k}" for k, block in enumerate(_blocks(model))}
    owners.update({m: f"head.{n}" if n else "head" for n, m in model.head.named_modules()})
    return {f"{owners[m]}.{p}": t.detach().cpu().clone()
            for m in owners for p, t in m.named_parameters(recurse=False)}


def _matrix(a: ArrayLike) -> np.ndarray:
    """Samples x features in float64 (Gram products of float32 features lose digits)."""
    return np.asarray(a, dtype=np.float64).reshape(len(a), -1)


def linear_cka(X: ArrayLike, Y: ArrayLike) -> float:
    """Linear CKA (Kornblith et al. 2019, eq. for the linear kernel), in [0, 1]:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc, Yc column-centred, in float64.
    Invariant to rotations and isotropic scaling of either side; X: n x p, Y: n x q, same n rows."""
    X, Y = _matrix(X), _matrix(Y)
    X, Y = X - X.mean(0), Y - Y.mean(0)
    denom = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
    return float(np.linalg.norm(Y.T @ X) ** 2 / denom) if denom > 0 else 0.0


def fit_probe(train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike,
              test_labels: ArrayLike, config: ProbeConfig) -> float:
    """Test accuracy of a linear probe (standardised features -> multinomial logistic regression,
    lbfgs) fitted on frozen train features (Davari et al. 2022). Labels are global class ids; a
    test class absent from train is simply never predicted."""
    X, Xt = _matrix(train_features), _matrix(test_features)
    y, yt = np.asarray(train_labels), np.asarray(test_labels)
    if len(np.unique(y)) < 2:  # nothing to separate: the probe predicts the one class it saw
        return float(np.mean(yt == y[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=config.C, max_iter=config.max_iter,
                                                               random_state=config.seed))
    with warnings.catch_warnings():  # max_iter is a budget, not an error
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(X, y)
    return float(np.mean(probe.predict(Xt) == yt))


def probe_acc(P: metrics.Matrix) -> float:
    """Mean of the probe matrix's last row: ACC of design.md applied to P."""
    return metrics.average_accuracy(P)


def probe_forgetting(P: metrics.Matrix) -> float:
    """Representation forgetting: the forgetting F of design.md (Chaudhry et al. 2018) applied to P."""
    return metrics.forgetting(P)


def weight_drift(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, float]:
    """Per layer, ||θ_i − θ_{i−1}|| / ||θ_{i−1}|| over its weight and bias together (DEN's measure of
    semantic drift, Yoon et al. 2018, made relative). Keys as in ``layer_weights``."""
    moved: dict[str, float] = defaultdict(float)
    norm: dict[str, float] = defaultdict(float)
    for key, old in before.items():
        layer = key.rsplit(".", 1)[0]
        moved[layer] += float((after[key].double() - old.double()).square().sum())
        norm[layer] += float(old.double().square().sum())
    return {layer: (moved[layer] / norm[layer]) ** 0.5 if norm[layer] > 0 else 0.0 for layer in moved}


def unit_drift(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per layer, the L2 movement of each unit's incoming weights: the row norms of the weight change
    (a conv filter is one unit), for a histogram."""
    return {key.rsplit(".", 1)[0]: (after[key] - old).flatten(1).norm(dim=1)
            for key, old in before.items() if key.endswith(".weight")}


def class_means(features: ArrayLike, labels: ArrayLike) -> dict[int, Tensor]:
    """The mean feature vector of each class present in ``labels``."""
    features, labels = torch.as_tensor(features), torch.as_tensor(labels)
    return {int(c): features[labels == c].mean(0) for c in labels.unique()}


def prototype_drift(old_means: dict[int, Tensor], new_means: dict[int, Tensor], mean_norm: float) -> float:
    """Mean over old classes of ||μ_new − μ_old|| / mean_norm, the mean feature norm (Yu et al. 2020,
    Semantic Drift Compensation); 0.0 when no old class is measured again."""
    common = [c for c in old_means if c in new_means]
    if not common:
        return 0.0
    return float(np.mean([float((new_means[c] - old_means[c]).norm()) for c in common]) / mean_norm)
