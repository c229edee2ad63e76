"""Shared by the weight-regularization strategies (L2, EWC, SI, MAS): anchors, importances, penalty.

Each keeps anchor weights theta* and a per-weight importance Omega, and adds
strength * sum_i Omega_i (theta_i - theta*_i)^2 to the task loss; they differ in how Omega is
estimated. Not a strategy itself (the registry skips modules whose name starts with "_").
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig
from clgrid.train.costs import count_flops


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the trainable weights, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def quadratic_penalty(model: nn.Module, anchor: dict[str, Tensor], importance: dict[str, Tensor] | None = None) -> Tensor:
    """sum_i Omega_i (theta_i - theta*_i)^2 over the anchored weights; Omega = 1 when not given."""
    params = dict(model.named_parameters())
    terms = [(params[n] - a).pow(2) for n, a in anchor.items()]
    if importance is not None:
        terms = [importance[n] * term for n, term in zip(anchor, terms)]
    # elementwise, so the FLOP counter misses it: difference, square, (weight,) sum, and as many back
    count_flops((8 if importance is not None else 6) * sum(a.numel() for a in anchor.values()))
    return torch.stack([term.sum() for term in terms]).sum()


def per_sample_gradient_mean(model: nn.Module, sample_losses: Callable[[Tensor, Tensor, Tensor], Tensor],
                             x: Tensor, y: Tensor, t: Tensor, *, squared: bool) -> dict[str, Tensor]:
    """Mean over samples of g_i^2 (``squared``) or |g_i|, g_i the gradient of sample i's loss, per
    trainable weight. ``sample_losses(scores, y, t)`` gives one loss per sample of the batch.

    Closed form from one forward and one backward pass instead of one backward per sample: a layer
    whose weights act on input a_i with output gradient d_i has the per-sample gradient d_i a_i^T
    (Linear; Conv2d on unfolded inputs). For a Linear layer g_i is an outer product, so
    sum_i g_i^2 = (d^2)^T (a^2) and sum_i |g_i| = |d|^T |a|; a convolution sums d_i a_i^T over
    positions, so there g_i is built, in chunks. Runs in eval mode (restored after): a BatchNorm layer
    then normalises with its running statistics, so each sample's loss depends on that sample
    only, and the pass leaves the statistics alone.
    """
    layers = _layers(model)
    inputs: dict[nn.Module, Tensor] = {}
    outputs: dict[nn.Module, Tensor] = {}

    def keep(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if module in outputs:  # a weight used twice per sample: its gradient is no longer d_i a_i^T
            raise NotImplementedError(f"per-sample gradients of a {type(module).__name__} called twice")
        inputs[module], outputs[module] = args[0].detach(), output

    handles = [module.register_forward_hook(keep) for module in layers]
    was_training = model.training
    model.eval()
    try:
        losses = sample_losses(model(x, t), y, t)
        deltas = torch.autograd.grad(losses.sum(), [outputs[m] for m in layers], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    total: dict[str, Tensor] = {}
    for (module, names), delta in zip(layers.items(), deltas):
        if delta is None:  # the layer does not reach the loss
            delta = torch.zeros_like(outputs[module])
        for name, value in _layer_moments(module, set(names), inputs[module], delta, squared).items():
            total[names[name]] = value / len(y)
    return {n: total[n] for n, p in model.named_parameters() if p.requires_grad}


def _layers(model: nn.Module) -> dict[nn.Module, dict[str, str]]:
    """Every module with trainable weights of its own -> {its weight's attribute: the model's name}."""
    layers: dict[nn.Module, dict[str, str]] = {}
    for prefix, module in model.named_modules():
        own = {n: f"{prefix}.{n}" if prefix else n for n, p in module.named_parameters(recurse=False)
               if p.requires_grad}
        if not own:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d, _BatchNorm)):
            raise NotImplementedError(f"per-sample gradients of {type(module).__name__} layers")
        layers[module] = own
    return layers


def _layer_moments(module: nn.Module, own: set[str], a: Tensor, d: Tensor, squared: bool) -> dict[str, Tensor]:
    """sum over samples of g_i^2 or |g_i| for each trainable weight (``own``) of one layer, from its
    input a and output gradient d (first dimension: the sample)."""
    moment = torch.square if squared else torch.abs
    n = len(a)
    if isinstance(module, _BatchNorm):
        if module.running_mean is None:  # normalised by batch statistics: no per-sample gradient
            raise NotImplementedError("per-sample gradients of BatchNorm without running statistics")
        shape = (1, -1) + (1,) * (a.dim() - 2)
        a_hat = (a - module.running_mean.view(shape)) / (module.running_var.view(shape) + module.eps).sqrt()
        g = {"weight": (d * a_hat).reshape(n, d.shape[1], -1).sum(2), "bias": d.reshape(n, d.shape[1], -1).sum(2)}
        return {name: moment(g[name]).sum(0) for name in own}
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise NotImplementedError("per-sample gradients of grouped, non-zero or 'same'-padded convolutions")
        a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
        d = d.reshape(n, d.shape[1], -1).transpose(1, 2)  # both [samples, positions, features]
    else:  # Linear: any leading dimensions after the sample's are positions
        a, d = a.reshape(n, -1, a.shape[-1]), d.reshape(n, -1, d.shape[-1])
    sums: dict[str, Tensor] = {}
    if "bias" in own:
        sums["bias"] = moment(d.sum(1)).sum(0)
    if "weight" in own:
        if a.shape[1] == 1:  # one position: sum_i (d_i a_i^T)^2 = (d^2)^T (a^2), and likewise for |.|
            weight = moment(d[:, 0]).T @ moment(a[:, 0])
        else:  # g_i built in chunks of about 2^22 numbers
            chunk = max(1, 2 ** 22 // module.weight.numel())
            weight = sum(moment(d[s].transpose(1, 2) @ a[s]).sum(0)
                         for s in (slice(i, i + chunk) for i in range(0, n, chunk)))
        sums["weight"] = weight.reshape(module.weight.shape)
    return sums


class ImportancePenalty(Strategy):
    """SI and MAS: one importance Omega summed over the experiences, anchored at the weights after
    the latest one. A subclass gives ``strength`` and adds to ``importance`` after each experience."""

    def __init__(self, config: StrategyConfig):
        super().__init__(config)
        self.importance: dict[str, Tensor] = {}  # Omega, summed over past experiences
        self.anchor: dict[str, Tensor] = {}  # the weights after the previous experience

    @property
    def strength(self) -> float:
        raise NotImplementedError

    def loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor | None:
        if not self.anchor:
            return None
        return self.strength * quadratic_penalty(ctx.model, self.anchor, self.importance)

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self.importance, self.anchor = state["importance"], state["anchor"]
