"""Progressive Neural Networks (Rusu et al. 2016), for MLP backbones in task-IL.

Every experience adds a column (an MLP with the spec's hidden widths x ``width_factor``, and a head
for its task) and freezes the earlier ones; linear lateral connections (the paper's eq. 1, without
its non-linear adapters) feed every earlier column's layer l into the new column's layer l+1, the
head included. Each sample is answered by its task's column: no forgetting by construction, at the
price of growth: column k adds its own weights plus laterals from k columns.
"""

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clgrid.strategies._task_mlp import place_task_scores, spec_mlp_shape
from clgrid.strategies.base import Context, Strategy, StrategyConfig


class ProgressiveConfig(StrategyConfig):
    name: Literal["progressive"] = "progressive"
    width_factor: float = Field(1.0, gt=0, description="column width = the spec's hidden width x this")


class Column(nn.Module):
    """One task's MLP. ``laterals[l]`` maps the concatenated layer-l outputs of the earlier columns
    into layer l+1 (the last one into the head); the first layer sees only the input."""

    def __init__(self, in_features: int, widths: list[int], n_classes: int, n_earlier: int):
        super().__init__()
        sizes = [in_features, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(widths[-1], n_classes)
        targets = [*widths[1:], n_classes]
        self.laterals = nn.ModuleList(nn.Linear(w * n_earlier, out, bias=False) for w, out in zip(widths, targets)) \
            if n_earlier else None

    def forward(self, x: Tensor, earlier: list[list[Tensor]]) -> tuple[list[Tensor], Tensor]:
        """Returns this column's hidden outputs and its task's scores; ``earlier[l]``: layer l outputs
        of the earlier columns."""
        hidden: list[Tensor] = []
        h = x
        for l, layer in enumerate(self.layers):
            z = layer(h)
            if l > 0 and self.laterals is not None:
                z = z + self.laterals[l - 1](torch.cat(earlier[l - 1], 1))
            h = F.relu(z)
            hidden.append(h)
        scores = self.head(h)
        if self.laterals is not None:
            scores = scores + self.laterals[-1](torch.cat(earlier[-1], 1))
        return hidden, scores


class ProgressiveNet(nn.Module):
    """The columns so far; ``model(x, t)`` returns each sample's scores from its task's column,
    placed at that task's classes over the whole label space."""

    def __init__(self, in_features: int, widths: list[int], task_classes: list[tuple[int, ...]], num_classes: int):
        super().__init__()
        self.in_features, self.widths, self.num_classes = in_features, widths, num_classes
        self.task_classes = [list(c) for c in task_classes]
        self.columns = nn.ModuleList()

    def add_column(self) -> Column:
        k = len(self.columns)
        self.columns.append(Column(self.in_features, self.widths, len(self.task_classes[k]), k))
        return self.columns[-1]

    def column_features(self, x: Tensor, task: int) -> list[Tensor]:
        """The hidden outputs of ``task``'s column (the newest one for a task without a column yet)."""
        x = x.flatten(1)
        earlier: list[list[Tensor]] = [[] for _ in self.widths]
        for column in self.columns[: min(task, len(self.columns) - 1) + 1]:
            hidden, _ = column(x, earlier)
            for l, h in enumerate(hidden):
                earlier[l].append(h)
        return hidden

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        x = x.flatten(1)
        # Zeros, not a mask value: a task without a column yet gets uniform scores (chance), and the
        # trainer masks the other tasks' classes anyway.
        out = x.new_zeros(x.shape[0], self.num_classes)
        earlier: list[list[Tensor]] = [[] for _ in self.widths]
        for k, column in enumerate(self.columns[: int(t.max()) + 1]):  # later columns serve no sample
            hidden, scores = column(x, earlier)
            out = place_task_scores(out, scores, t, k, self.task_classes[k])
            for l, h in enumerate(hidden):
                earlier[l].append(h)
        return out


class Progressive(Strategy):
    Config = ProgressiveConfig
    needs_hidden_layers = "builds columns of the MLP's hidden layers"
    scenarios = ("task-il",)

    def __init__(self, config: ProgressiveConfig):
        super().__init__(config)
        self.n_columns = 0

    def empty_net(self, ctx: Context) -> ProgressiveNet:
        """A net without columns, shaped after the spec's MLP (the trainer's fresh model)."""
        in_features, widths = spec_mlp_shape(ctx, self.config.width_factor)
        return ProgressiveNet(in_features, widths, ctx.stream.task_classes, ctx.stream.num_classes)

    def before_experience(self, ctx: Context) -> None:
        net = ctx.model if isinstance(ctx.model, ProgressiveNet) else self.empty_net(ctx)
        net.requires_grad_(False)  # earlier columns are frozen for good
        column = net.add_column()
        self.n_columns = len(net.columns)
        ctx.model = net.to(ctx.device)
        ctx.reset_optimizer(column.parameters())

    def probe_features(self, x: Tensor, task: int, ctx: Context) -> list[Tensor]:
        """Each experience is probed on its own column (the features that answer it)."""
        return ctx.model.column_features(x, task)

    def probe_weights(self, task: int, ctx: Context) -> dict[str, Tensor]:
        """The weights of ``task``'s column: its layers (laterals included) and its head."""
        column = ctx.model.columns[task]
        weights = {f"hidden.{l}.{n}": p for l, layer in enumerate(column.layers) for n, p in layer.named_parameters()}
        for l, lateral in enumerate(column.laterals or []):
            weights[f"hidden.{l + 1}.lateral" if l + 1 < len(column.layers) else "head.lateral"] = lateral.weight
        return weights | {f"head.{n}": p for n, p in column.head.named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        return {"columns": self.n_columns}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        net = self.empty_net(ctx)
        self.n_columns = state["columns"]
        for _ in range(self.n_columns):
            net.add_column()
        ctx.model = net.to(ctx.device)
