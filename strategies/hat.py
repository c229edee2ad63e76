"""Hard Attention to the Task (Serra et al. 2018), for MLP backbones in task-IL.

Every hidden unit has a learned gate per task, sigmoid(s * e), whose slope s is annealed from
1/s_max to s_max over each pass so the gates become near-binary. Weights between units that earlier
tasks' gates opened get no gradient; a regulariser keeps each task's gates few and reused.
Deviation: the protected set is binarised (gate > 0.5), because Adam would turn the paper's tiny
residual gradients 1 - a into full-size steps.
"""

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clgrid.strategies._task_mlp import place_task_scores, spec_mlp_shape
from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig

EMBEDDING_CLAMP = 6.0  # |e| bound (the paper's code): gates are saturated at s_max well before
COSH_CLAMP = 50.0  # keeps the gradient compensation finite


class HATConfig(StrategyConfig):
    name: Literal["hat"] = "hat"
    s_max: float = Field(400.0, ge=1, description="slope of the gates at the end of each pass and at evaluation")
    sparsity: float = Field(0.75, ge=0, description="weight of the regulariser on the units a task opens")


class HATNet(nn.Module):
    """The spec's MLP with each hidden unit multiplied by its task's gate, and a head per task."""

    def __init__(self, in_features: int, widths: list[int], task_classes: list[tuple[int, ...]],
                 num_classes: int, s_max: float):
        super().__init__()
        sizes = [in_features, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.embeddings = nn.ModuleList(nn.Embedding(len(task_classes), w) for w in widths)
        self.heads = nn.ModuleList(nn.Linear(widths[-1], len(c)) for c in task_classes)
        self.task_classes = [list(c) for c in task_classes]
        self.num_classes = num_classes
        self.scale = s_max  # the gates' slope: annealed while training, s_max otherwise

    def gates(self, t: Tensor) -> list[Tensor]:
        return [torch.sigmoid(self.scale * e(t)) for e in self.embeddings]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = x.flatten(1)
        for layer, gate in zip(self.layers, self.gates(t)):
            h = F.relu(layer(h)) * gate
        out = h.new_zeros(h.shape[0], self.num_classes)  # other tasks' classes: the trainer masks them
        for task, head in enumerate(self.heads[: int(t.max()) + 1]):
            out = place_task_scores(out, head(h), t, task, self.task_classes[task])
        return out


class HAT(Strategy):
    Config = HATConfig
    needs_hidden_layers = "gates the MLP's hidden units"
    scenarios = ("task-il",)

    def __init__(self, config: HATConfig):
        super().__init__(config)
        self.used: list[Tensor] = []  # per hidden layer: the units some finished task's gate opened
        self.step, self.period = 0, 1

    def build(self, ctx: Context) -> HATNet:
        in_features, widths = spec_mlp_shape(ctx)
        stream = ctx.stream
        return HATNet(in_features, widths, stream.task_classes, stream.num_classes, self.config.s_max).to(ctx.device)

    def before_experience(self, ctx: Context) -> None:
        if not isinstance(ctx.model, HATNet):
            ctx.model = self.build(ctx)
            self.used = [torch.zeros(e.embedding_dim, dtype=torch.bool, device=ctx.device) for e in ctx.model.embeddings]
            ctx.reset_optimizer(ctx.model.parameters())
        self.step, self.period = 0, -(-len(ctx.experience.y) // ctx.batch_size)  # steps in one pass

    def train_batch(self, batch: Batch, ctx: Context) -> Batch:
        s_max, progress = self.config.s_max, (self.step % self.period) / max(self.period - 1, 1)
        ctx.model.scale = 1 / s_max + (s_max - 1 / s_max) * progress
        self.step += 1
        return batch

    def loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor:
        gates = ctx.model.gates(batch.t[:1])
        opened = sum((g[0] * ~u).sum() for g, u in zip(gates, self.used))
        free = sum(int((~u).sum()) for u in self.used)
        return self.config.sparsity * opened / max(free, 1)

    def after_backward(self, batch: Batch, ctx: Context) -> None:
        model, s, s_max = ctx.model, ctx.model.scale, self.config.s_max
        used_in = None  # the input is not gated: the first layer is protected by its outputs alone
        for layer, used_out in zip(model.layers, self.used):
            held = used_out.unsqueeze(1) if used_in is None else used_out.unsqueeze(1) & used_in.unsqueeze(0)
            layer.weight.grad.masked_fill_(held, 0.0)
            layer.bias.grad.masked_fill_(used_out, 0.0)
            used_in = used_out
        for embedding in model.embeddings:  # undo the slope's damping of the gates' gradients (eq. 4)
            e = embedding.weight
            boost = (torch.cosh((s * e).clamp(-COSH_CLAMP, COSH_CLAMP)) + 1) / (torch.cosh(e) + 1)
            e.grad.mul_(s_max / s * boost.detach())

    def after_step(self, batch: Batch, ctx: Context) -> None:
        with torch.no_grad():
            for embedding in ctx.model.embeddings:
                embedding.weight.clamp_(-EMBEDDING_CLAMP, EMBEDDING_CLAMP)

    def after_experience(self, ctx: Context) -> None:
        ctx.model.scale = self.config.s_max
        with torch.no_grad():
            gates = ctx.model.gates(torch.tensor([ctx.experience_index], device=ctx.device))
        self.used = [u | (g[0] > 0.5) for u, g in zip(self.used, gates)]

    def probe_features(self, x: Tensor, task: int, ctx: Context) -> list[Tensor]:
        """Each experience is probed through its own gates: the hidden units its mask opens."""
        net, h, hidden = ctx.model, x.flatten(1), []
        for layer, gate in zip(net.layers, net.gates(torch.full((len(x),), task, device=x.device))):
            h = F.relu(layer(h)) * gate
            hidden.append(h)
        return hidden

    def probe_weights(self, task: int, ctx: Context) -> dict[str, Tensor]:
        """The weights between the units ``task``'s gates open (> 0.5), and its head."""
        net = ctx.model
        opened = [g[0] > 0.5 for g in net.gates(torch.tensor([task], device=ctx.device))]
        weights, into = {}, None  # the input is not gated
        for l, (layer, out) in enumerate(zip(net.layers, opened)):
            held = out[:, None] if into is None else out[:, None] & into[None, :]
            weights |= {f"hidden.{l}.weight": layer.weight * held, f"hidden.{l}.bias": layer.bias * out}
            into = out
        return weights | {f"head.{n}": p for n, p in net.heads[task].named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        return {"used": self.used}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        ctx.model = self.build(ctx)
        self.used = [u.to(ctx.device) for u in state["used"]]
