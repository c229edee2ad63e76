"""Dynamically Expandable Networks (Yoon et al. 2018, "Lifelong Learning with Dynamically Expandable Networks").

Task-IL, MLP backbones, one head per task. The first experience trains the network sparsely; each
later one retrains only the subnetwork its new head reaches, adds k units per layer when the loss
stays above a threshold (group sparsity removes the unneeded ones), and splits units whose weights
drifted: the old copy keeps its old weights for earlier tasks. Every unit carries timestamps: task t
uses the units born at or before t and not retired at or before t (a split retires the old copy).

Simplifications of the paper:
- Sparsity by decoupled proximal steps, not a loss term: after every optimizer step the trained
  weights shrink by lr * l1 toward zero (soft-thresholding: exact zeros), new units by
  lr * group_l1 as groups (a unit's incoming weights and bias). With Adam, whose steps are at most
  about lr, a weight survives when its normalised step exceeds l1: keep l1 < 1.
- L1 applies while training from scratch (first experience, new heads, new units); selective
  retraining has none (it would pull earlier tasks' weights to zero) and no L2 term either.
- Selection: the new head trains alone (sparse) for the head budget; the selected units are those
  it reaches through non-zero weights (breadth-first, top-down), and only the non-zero weights
  among them retrain, so the network stays sparse and drift stays small.
- Expansion adds k units to every hidden layer when the mean training loss after selective
  retraining exceeds loss_threshold, and trains only their weights and the new head.
- Splitting compares each retrained unit's incoming weights and bias with their values before the
  experience (L2); the duplicate keeps the new weights and is not retrained again, the restored old
  copy is retired from this task on (the paper shares it and retrains).
- Growth is logged per experience in the strategy state (``growth``: loss, selected, expanded,
  split, widths) and by the trainer's model_bytes.
"""

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clgrid.strategies.base import Context, Strategy, StrategyConfig

NEVER = torch.iinfo(torch.int16).max  # retirement time of a unit that was never split


def every(p: Tensor) -> Tensor:
    return torch.ones_like(p, dtype=torch.bool)


class DENConfig(StrategyConfig):
    name: Literal["den"] = "den"
    l1: float = Field(0.7, ge=0, description="each step shrinks trained weights toward 0 by lr * l1")
    group_l1: float = Field(1.0, ge=0, description="each step shrinks every new unit's weights (a group) by lr * group_l1")
    expand_units: int = Field(20, ge=0, description="k: units added to every hidden layer when the loss stays high")
    loss_threshold: float = Field(0.05, ge=0, description="expand when the training loss after retraining exceeds this")
    split_threshold: float = Field(0.3, gt=0, description="split a unit whose incoming weights moved further (L2)")
    head_epochs: int | None = Field(None, ge=1, description="epochs of the sparse new head; default: the spec's budget")
    expand_epochs: int | None = Field(None, ge=1, description="epochs of the new units; default: the spec's budget")


class DENNet(nn.Module):
    """Timestamped MLP: unit j of layer l serves task t iff born[j] <= t < retired[j]; a head per task."""

    def __init__(self, in_features: int, widths: list[int], task_classes: list[list[int]], num_classes: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([in_features, *widths], widths))
        self.heads = nn.ModuleList(nn.Linear(widths[-1], len(c)) for c in task_classes)
        self.task_classes, self.num_classes = [list(c) for c in task_classes], num_classes
        for l, width in enumerate(widths):
            self.register_buffer(f"born{l}", torch.zeros(width, dtype=torch.int16))
            self.register_buffer(f"retired{l}", torch.full((width,), NEVER, dtype=torch.int16))

    @property
    def widths(self) -> list[int]:
        return [layer.out_features for layer in self.layers]

    def stamps(self, l: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"born{l}"), getattr(self, f"retired{l}")

    def alive(self, l: int, t: Tensor) -> Tensor:
        born, retired = self.stamps(l)
        return (born <= t[:, None]) & (t[:, None] < retired)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = x.flatten(1)
        for l, layer in enumerate(self.layers):
            h = torch.relu(layer(h)) * self.alive(l, t)
        out = h.new_zeros(len(h), self.num_classes)  # other tasks' classes: the trainer masks them
        for task, (head, classes) in enumerate(zip(self.heads, self.task_classes)):
            cols = torch.tensor(classes, device=h.device)
            out = out.index_copy(1, cols, torch.where((t == task)[:, None], head(h), out.index_select(1, cols)))
        return out


@torch.no_grad()
def remap(net: DENNet, srcs: list[Tensor], t: int) -> DENNet:
    """A network whose unit i of layer l copies unit srcs[l][i] of ``net`` bitwise; -1 makes a unit
    born at t: fresh incoming weights, zero outgoing ones (so the other units compute what they did)."""
    new = DENNet(net.layers[0].in_features, [len(s) for s in srcs], net.task_classes, net.num_classes)
    device = net.layers[0].weight.device
    new, srcs = new.to(device), [s.to(device) for s in srcs]
    cols = torch.arange(net.layers[0].in_features, device=device)
    for l, rows in enumerate(srcs):
        old, fresh, keep_r, keep_c = net.layers[l], new.layers[l], rows >= 0, cols >= 0
        copied = old.weight[rows.clamp_min(0)][:, cols.clamp_min(0)]
        fresh.weight.copy_(torch.where(keep_r[:, None], torch.where(keep_c, copied, 0.0), fresh.weight))
        fresh.bias.copy_(torch.where(keep_r, old.bias[rows.clamp_min(0)], fresh.bias))
        for mine, theirs in zip(new.stamps(l), net.stamps(l)):
            mine.copy_(torch.where(keep_r, theirs[rows.clamp_min(0)], mine))
        new.stamps(l)[0][~keep_r] = t
        cols = rows
    for mine, theirs in zip(new.heads, net.heads):
        mine.weight.copy_(torch.where(cols >= 0, theirs.weight[:, cols.clamp_min(0)], 0.0))
        mine.bias.copy_(theirs.bias)
    return new


class DEN(Strategy):
    Config = DENConfig
    needs_hidden_layers = "grows the MLP's hidden layers"
    scenarios = ("task-il",)

    def __init__(self, config: DENConfig):
        super().__init__(config)
        self.growth: list[dict[str, Any]] = []  # per experience: loss, selected, expanded, split, widths

    def _build(self, ctx: Context, widths: list[int]) -> DENNet:
        stream = ctx.stream
        return DENNet(math.prod(stream.input_shape), widths, stream.task_classes, stream.num_classes).to(ctx.device)

    def _adopt(self, ctx: Context) -> DENNet:
        """The trainer's MLP backbone, as a DENNet with the same first weights."""
        modules = list(ctx.model.backbone.modules())[1:]
        if not all(isinstance(m, (nn.Sequential, nn.Flatten, nn.Linear, nn.ReLU)) for m in modules):
            raise ValueError("den grows MLP backbones only (model.name: mlp)")
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        net = self._build(ctx, [m.out_features for m in linears])
        for mine, theirs in zip(net.layers, linears):
            mine.load_state_dict(theirs.state_dict())
        return net

    # ---- training phases: which entries train, and the proximal step after every update ----

    def _phase(self, masks: dict[nn.Parameter, Tensor], sparse: bool, groups: list[tuple[nn.Linear, Tensor]] = ()) -> list:
        """Only the masked entries train (the rest are restored after every step); ``sparse``: with L1."""
        self.masks, self.sparse, self.groups = masks, sparse, groups
        self.frozen = {p: p.detach().clone() for p in masks}
        return list(masks)

    @torch.no_grad()
    def _project(self, *_: Any) -> None:
        shrink = self.lr * self.config.l1 if self.sparse else 0.0
        for p, mask in self.masks.items():
            w = p.sign() * (p.abs() - shrink).clamp_min(0) if shrink and p.dim() == 2 else p
            p.copy_(torch.where(mask, w, self.frozen[p]))
        for layer, rows in self.groups:  # group lasso: a new unit's weights shrink together, to zero
            norm = torch.cat([layer.weight[rows], layer.bias[rows, None]], 1).norm(dim=1)
            scale = (1 - self.lr * self.config.group_l1 / norm.clamp_min(1e-12)).clamp_min(0)
            layer.weight[rows] *= scale[:, None]
            layer.bias[rows] *= scale

    def after_step(self, batch: Any, ctx: Context) -> None:
        self._project()

    def _fit(self, ctx: Context, params: list, epochs: int | None) -> None:
        exp = ctx.experience
        ctx.fit(exp.x, exp.y, torch.full_like(exp.y, exp.index), epochs=epochs, params=params,
                after_step=self._project)

    # ---- the hooks ----------------------------------------------------------------------

    def before_experience(self, ctx: Context) -> None:
        if not isinstance(ctx.model, DENNet):
            ctx.model = self._adopt(ctx)
        net, t, self.lr = ctx.model, ctx.experience_index, ctx.lr
        self.before = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in net.layers]
        head = net.heads[t]
        masks = {p: every(p) for p in head.parameters()}
        if t == 0:  # sparse training of the whole network
            rows = [every(m.bias) for m in net.layers]
        else:  # the sparse new head alone shows which top units the task needs; descend from them
            self._fit(ctx, self._phase(dict(masks), sparse=True), self.config.head_epochs)
            alive = [net.alive(l, torch.tensor([t], device=ctx.device))[0] for l in range(len(net.layers))]
            rows = [None] * len(net.layers)
            rows[-1] = alive[-1] & (head.weight != 0).any(0)
            for l in range(len(net.layers) - 1, 0, -1):
                rows[l - 1] = alive[l - 1] & (net.layers[l].weight[rows[l]] != 0).any(0)
        for l, m in enumerate(net.layers):
            cols = rows[l - 1] if l else every(m.weight[0])
            edges = rows[l][:, None] & cols
            masks |= {m.weight: edges if t == 0 else edges & (m.weight != 0), m.bias: rows[l]}  # the subnetwork's own edges
        self.selected = [int(r.sum()) for r in rows]
        # sparse from scratch; retraining without L1, which would pull old tasks' weights to zero
        ctx.reset_optimizer(self._phase(masks, sparse=t == 0))

    def after_experience(self, ctx: Context) -> None:
        t, c = ctx.experience_index, self.config
        loss, expanded, split = self._loss(ctx), [0] * len(ctx.model.layers), [0] * len(ctx.model.layers)
        if t > 0 and loss > c.loss_threshold and c.expand_units > 0:
            expanded = self._expand(ctx)
        if t > 0:
            split = self._split(ctx)
        ctx.reset_optimizer(ctx.model.parameters())
        self.growth.append({"experience": t, "loss": loss, "selected": self.selected, "expanded": expanded,
                            "split": split, "widths": ctx.model.widths})

    @torch.no_grad()
    def _loss(self, ctx: Context) -> float:
        exp, net = ctx.experience, ctx.model
        x, y = exp.x.to(ctx.device), exp.y.to(ctx.device)
        t = torch.full_like(y, exp.index)
        return float(F.cross_entropy(ctx.mask(net(x, t), t), y))

    def _expand(self, ctx: Context) -> list[int]:
        """k new units per layer train with group sparsity; those driven to zero are removed."""
        t, k, old = ctx.experience_index, self.config.expand_units, ctx.model.widths
        net = ctx.model = remap(ctx.model, [torch.cat([torch.arange(w), torch.full((k,), -1)]) for w in old], t)
        new = [torch.arange(w + k, device=ctx.device) >= w for w in old]
        masks = {p: every(p) for p in net.heads[t].parameters()}
        for l, m in enumerate(net.layers):
            into_new = new[l - 1][None, :] if l else ~every(m.weight[0])
            masks |= {m.weight: new[l][:, None] | into_new, m.bias: new[l]}
        self._fit(ctx, self._phase(masks, True, [(m, new[l]) for l, m in enumerate(net.layers)]), self.config.expand_epochs)
        used = [(m.weight != 0).any(1) | (m.bias != 0) for m in net.layers]
        keep = [(~n | u).nonzero()[:, 0] for n, u in zip(new, used)]
        ctx.model = remap(net, keep, t)
        return [len(kp) - w for kp, w in zip(keep, old)]

    @torch.no_grad()
    def _split(self, ctx: Context) -> list[int]:
        """Units that drifted get a duplicate with the new weights; the original gets its old ones back."""
        t, net = ctx.experience_index, ctx.model
        drifted = []
        for l, (m, (w0, b0)) in enumerate(zip(net.layers, self.before)):
            n, c = w0.shape
            drift = torch.cat([m.weight[:n, :c] - w0, (m.bias[:n] - b0)[:, None]], 1).norm(dim=1)
            drifted.append((drift > self.config.split_threshold).nonzero()[:, 0])
        net = ctx.model = remap(net, [torch.cat([torch.arange(w, device=d.device), d]) for w, d in zip(net.widths, drifted)], t)
        for l, (m, (w0, b0), d) in enumerate(zip(net.layers, self.before, drifted)):
            born, retired = net.stamps(l)
            born[len(born) - len(d):] = t
            retired[d] = t
            m.weight[d, : w0.shape[1]] = w0[d]
            m.bias[d] = b0[d]
            if l:  # the old units above read the restored copies through their old weights
                below = drifted[l - 1]
                m.weight[: w0.shape[0], below] = w0[:, below]
        return [len(d) for d in drifted]

    def probe_features(self, x: Tensor, task: int, ctx: Context) -> list[Tensor]:
        """Each experience is probed on the units it uses (born at or before it, not retired)."""
        net, h, hidden = ctx.model, x.flatten(1), []
        t = torch.full((len(x),), task, device=x.device)
        for l, layer in enumerate(net.layers):
            alive = net.alive(l, t)
            h = torch.relu(layer(h)) * alive
            hidden.append(h[:, alive[0]])
        return hidden

    def probe_weights(self, task: int, ctx: Context) -> dict[str, Tensor]:
        """The weights among the units ``task`` uses, and its head. Later units are appended and
        split copies retired only for later tasks, so a task's selection keeps its shape and order."""
        net, t = ctx.model, torch.tensor([task], device=ctx.device)
        weights, cols = {}, slice(None)
        for l, layer in enumerate(net.layers):
            rows = net.alive(l, t)[0]
            weights |= {f"hidden.{l}.weight": layer.weight[rows][:, cols], f"hidden.{l}.bias": layer.bias[rows]}
            cols = rows
        head = net.heads[task]
        return weights | {"head.weight": head.weight[:, cols], "head.bias": head.bias}

    def state_dict(self) -> dict[str, Any]:
        return {"growth": self.growth}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self.growth = state["growth"]
        ctx.model = self._build(ctx, self.growth[-1]["widths"])
