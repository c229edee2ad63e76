"""Representation probes (issue 16): what happens inside the network, not only at its outputs.

Pure functions over a model's features and weights, called after an experience's evaluation.
Layer names are shared by every instrument: "hidden.k" is the k-th block of the backbone
(an MLP's Linear+ReLU, a CNN's Conv+ReLU+MaxPool), "head" the classifier.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from clgrid.strategies import Context, Strategy
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


class ProbesSpec(BaseModel):
    """The spec's ``probes:`` section: which instruments run after each experience (all off: a trial
    without probes computes and stores nothing more), and their sample budgets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    linear: bool = Field(False, description="linear probes on the penultimate features: probe_matrix.json")
    cka: bool = Field(False, description="linear CKA per layer of each experience's probe set over time: cka.json")
    weight_drift: bool = Field(False, description="relative weight movement per layer, unit histogram: weight_drift.json")
    prototype_drift: bool = Field(False, description="how far old classes' feature means moved")
    solver: ProbeConfig = ProbeConfig()
    train_samples: int | None = Field(None, ge=2, description="per experience: training samples the probes fit "
                                      "and prototypes average (a seeded subset; default all)")
    cka_samples: int = Field(500, ge=2, description="per experience: test inputs of the fixed CKA probe set")
    histogram_bins: int = Field(20, ge=1, description="bins of the per-unit weight-movement histograms")

    @property
    def enabled(self) -> bool:
        return self.linear or self.cka or self.weight_drift or self.prototype_drift


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
    try:
        with evaluating(model):
            for start in range(0, len(x), batch_size):
                model.features(x[start:start + batch_size].to(_device(model)))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(outputs[name]) for name in names.values()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode under inference_mode, then every module's own mode back (a strategy may keep part
    of a training model in eval mode: feature extraction's BN)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def strategy_view(strategy: Strategy, ctx: Context, batch_size: int) -> tuple["Features", "Weights"]:
    """What serves each experience: the strategy's ``probe_features`` / ``probe_weights``, or the
    model's backbone layers when it leaves them to the default."""

    def features(x: Tensor, task: int) -> dict[str, Tensor]:
        model = ctx.model
        with evaluating(model):
            chunks = [strategy.probe_features(x[s:s + batch_size].to(_device(model)), task, ctx)
                      for s in range(0, len(x), batch_size)]
        if chunks[0] is None:
            return layer_features(model, x, batch_size)
        return {f"hidden.{k}": torch.cat([c[k].cpu() for c in chunks]) for k in range(len(chunks[0]))}

    def weights(task: int) -> dict[str, Tensor]:
        own = strategy.probe_weights(task, ctx)
        return layer_weights(ctx.model) if own is None else {k: v.detach().cpu().clone() for k, v in own.items()}

    return features, weights


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
    from sklearn.exceptions import ConvergenceWarning  # imported here: the spec schema imports this module
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    X, Xt = _matrix(train_features), _matrix(test_features)
    y, yt = np.asarray(train_labels), np.asarray(test_labels)
    if len(np.unique(y)) < 2:  # nothing to separate: the probe predicts the one class it saw
        return float(np.mean(yt == y[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=config.C, max_iter=config.max_iter,
                                                               random_state=config.seed))
    # max_iter is a budget, not an error; BLAS gets the trial's CPUs, as torch does (trainer)
    with warnings.catch_warnings(), threadpool_limits(torch.get_num_threads()):
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(X, y)
        return float(np.mean(probe.predict(Xt) == yt))


def _square(P: list[list[float | None]]) -> list[list[float]]:
    """P as a square matrix over the experiences seen so far: row i holds those seen by then
    (j <= i); an experience not yet seen (absent or None) is -inf, which no max over rows picks."""
    T = len(P)
    return [[-math.inf if p is None else p for p in row[:T]] + [-math.inf] * (T - len(row)) for row in P]


def probe_acc(P: list[list[float | None]]) -> float:
    """ACC of docs/design.md applied to P: the mean of its last row (every experience seen by then)."""
    return metrics.average_accuracy(_square(P))


def probe_forgetting(P: list[list[float | None]]) -> float:
    """Representation forgetting: the forgetting F of docs/design.md (Chaudhry et al. 2018) applied to P."""
    return metrics.forgetting(_square(P))


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


def histogram(values: Tensor, bins: int) -> dict[str, list[float]]:
    """Bin edges and counts of ``values`` (a small JSON, lighter than a picture)."""
    counts, edges = np.histogram(values.double().numpy(), bins=bins)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _subset(n: int, size: int | None, generator: torch.Generator) -> Tensor:
    """A fixed random subset of ``range(n)`` (all of it when ``size`` is None or not smaller)."""
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:size].sort().values


Features = Callable[[Tensor, int], dict[str, Tensor]]  # (inputs, experience) -> "hidden.k" -> [n, width]
Weights = Callable[[int], dict[str, Tensor]]  # experience -> "<layer>.<weight|bias>" -> detached copy


class Probes:
    """The instruments a ProbesSpec turns on, run by the trainer after each experience's evaluation.

    ``features(x, j)`` and ``weights(j)`` answer with what serves experience j (the whole backbone
    of a plain model; a column or mask of an architectural strategy). The probe subsets come from
    a generator of their own, so no training RNG stream moves. Everything a later experience
    compares against (CKA references, weights, class means, the matrices) is in ``state_dict``, so
    a resumed trial ends with the same results as an undisturbed one.
    """

    def __init__(self, spec: ProbesSpec, train: list, test: list, seed: int):
        self.spec, self.train, self.test = spec, train, test
        generator = torch.Generator().manual_seed(seed)
        self.train_idx = [_subset(len(e.y), spec.train_samples, generator) for e in train]
        self.cka_idx = [_subset(len(e.y), spec.cka_samples, generator) for e in test]
        self.P: list[list[float | None]] = []  # P[i][j] like R, for the experiences seen (None beyond)
        self.all_seen: list[float] = []  # after i: one probe over every class seen so far
        self.C: dict[str, list[list[float | None]]] = {}  # layer -> [i][j], None for j > i
        self.references: list[dict[str, Tensor]] = []  # experience j's CKA probe set right after j
        self.weights_before: dict[str, Tensor] = {}  # what served the latest experience, after it
        self.drift: list[dict[str, float]] = []  # per experience from 1 on: layer -> relative drift
        self.units: list[dict[str, dict[str, list[float]]]] = []  # per experience from 1 on: layer -> histogram
        self.means: dict[int, Tensor] = {}  # class -> its feature mean when it was learned
        self.seconds = 0.0

    def after_experience(self, i: int, features: Features, weights: Weights) -> dict[str, float]:
        """Runs the instruments after experience i; returns its metrics (step i)."""
        start = time.perf_counter()
        out: dict[str, float] = {}
        if self.spec.linear or self.spec.prototype_drift:
            out |= self._penultimate(i, features)
        if self.spec.cka:
            out |= self._cka(i, features)
        if self.spec.weight_drift:
            out |= self._weight_drift(i, weights)
        self.seconds += time.perf_counter() - start
        return out

    def _penultimate(self, i: int, features: Features) -> dict[str, float]:
        def last(x: Tensor, j: int) -> Tensor:
            return list(features(x, j).values())[-1]

        train = [(last(e.x[idx], e.index), e.y[idx]) for e, idx in zip(self.train[: i + 1], self.train_idx)]
        out: dict[str, float] = {}
        if self.spec.linear:
            config = self.spec.solver
            row = [fit_probe(*train[j], last(self.test[j].x, j), self.test[j].y, config) for j in range(i + 1)]
            self.P.append(row + [None] * (len(self.test) - i - 1))
            seen = range(i + 1)  # the all-seen probe reads every sample through experience i's features
            x_fit = torch.cat([last(self.train[j].x[self.train_idx[j]], i) for j in seen])
            x_test = torch.cat([last(self.test[j].x, i) for j in seen])
            self.all_seen.append(fit_probe(x_fit, torch.cat([train[j][1] for j in seen]), x_test,
                                           torch.cat([self.test[j].y for j in seen]), config))
            out |= {"probe_acc": probe_acc(self.P), "probe_forgetting": probe_forgetting([r[: i + 1] for r in self.P]),
                    "probe_acc_all_seen": self.all_seen[-1]}
        if self.spec.prototype_drift:
            now = {j: class_means(*train[j]) for j in range(i + 1)}
            if i > 0:
                old = {c: m for j in range(i) for c, m in now[j].items()}
                norm = float(torch.cat([train[j][0].norm(dim=1) for j in range(i)]).mean())  # widths may differ (DEN)
                out["prototype_drift"] = prototype_drift(self.means, old, norm) if norm > 0 else 0.0
            self.means |= now[i]
        return out

    def _cka(self, i: int, features: Features) -> dict[str, float]:
        probe_sets = [self.test[j].x[self.cka_idx[j]] for j in range(i + 1)]
        self.references.append(features(probe_sets[i], i))
        now = [features(probe_sets[j], j) for j in range(i)] + [self.references[i]]
        out = {}
        for layer in self.references[i]:
            rows = self.C.setdefault(layer, [])
            row = [linear_cka(self.references[j][layer], now[j][layer]) for j in range(i + 1)]
            rows.append(row + [None] * (len(self.test) - i - 1))
            if i > 0:
                out[f"cka_{layer}"] = float(np.mean(row[:-1]))
        return out

    def _weight_drift(self, i: int, weights: Weights) -> dict[str, float]:
        out = {}
        if i > 0:  # what served the previous experience, before and after this one
            after = weights(i - 1)
            self.drift.append(weight_drift(self.weights_before, after))
            self.units.append({layer: histogram(moved, self.spec.histogram_bins)
                               for layer, moved in unit_drift(self.weights_before, after).items()})
            out = {f"weight_drift_{layer}": d for layer, d in self.drift[-1].items()}
        self.weights_before = weights(i)
        return out

    def artifacts(self) -> dict[str, Any]:
        """The JSON artifacts of the instruments that ran, by name (``<name>.json`` in the run)."""
        out: dict[str, Any] = {}
        if self.spec.linear:
            out["probe_matrix"] = {"P": self.P, "experiences": list(range(len(self.P))), "all_seen": self.all_seen}
        if self.spec.cka:
            out["cka"] = {"layers": list(self.C), "C": list(self.C.values())}
        if self.spec.weight_drift:
            layers = list(self.drift[0]) if self.drift else []
            out["weight_drift"] = {
                "layers": layers, "experiences": list(range(1, len(self.drift) + 1)),
                "drift": [[d[layer] for d in self.drift] for layer in layers],  # [layer][experience]
                "unit_histograms": {layer: [u[layer] for u in self.units] for layer in (self.units[0] if self.units else [])},
            }
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"P": self.P, "all_seen": self.all_seen, "C": self.C, "references": self.references,
                "weights_before": self.weights_before, "drift": self.drift, "units": self.units,
                "means": {str(c): m for c, m in self.means.items()}, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("P", "all_seen", "C", "references", "weights_before", "drift", "units", "seconds"):
            setattr(self, key, state[key])
        self.means = {int(c): m for c, m in state["means"].items()}

