"""The replay-memory interface and its in-process implementation."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from clgrid.replay import policies

Rows = dict[str, Tensor]  # column name -> tensor with one row per sample ("x", "y", "t", extras)


class ReplayMemory(Protocol):
    """What strategies may call on ``ctx.replay``."""

    capacity: int

    def __len__(self) -> int: ...

    def insert(self, rows: Rows, policy: str = "reservoir", generator: torch.Generator | None = None) -> None:
        """Offers ``rows`` to the memory; ``policy`` ("reservoir" or "class_balanced") picks the slots."""

    def write(self, slots: Tensor, rows: Rows) -> None:
        """Overwrites the given slots (extending the memory when a slot equals its length).

        ``rows`` carries the same columns on every call: the first write fixes them."""

    def truncate(self, length: int) -> None:
        """Keeps the first ``length`` slots."""

    def sample(self, n: int, generator: torch.Generator) -> Rows:
        """``n`` rows drawn uniformly without replacement (all rows when fewer are stored)."""

    def rows(self, where: Tensor | None = None) -> Rows:
        """All stored rows, or those whose slot is selected by the boolean mask ``where``."""

    def column(self, name: str) -> Tensor:
        """One column over all stored rows (cheap: labels and experience ids for indexing)."""

    def nbytes(self) -> int:
        """Bytes the stored samples occupy (on disk for a durable store)."""

    def commit(self) -> Any:
        """Makes the current content durable; returns what a checkpoint records to reopen it."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorMemory:
    """Slots kept as torch tensors in process memory."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.seen = 0  # samples offered so far: the reservoir counter
        self._cols: Rows = {}

    def __len__(self) -> int:
        return 0 if not self._cols else int(self._cols["y"].shape[0])

    def insert(self, rows: Rows, policy: str = "reservoir", generator: torch.Generator | None = None) -> None:
        if self.capacity <= 0:
            return
        src, slots = policies.place(policy, rows["y"], self.column("y"), self.seen, self.capacity, generator)
        self.seen += int(rows["y"].shape[0])
        if len(src):
            self.write(slots, {k: v[src] for k, v in rows.items()})

    def write(self, slots: Tensor, rows: Rows) -> None:
        rows = {k: v.detach().cpu() for k, v in rows.items()}
        if self._cols and rows.keys() != self._cols.keys():
            # a column written for some slots only would leave the columns with different lengths
            raise ValueError(f"replay rows have columns {sorted(rows)}; the memory holds {sorted(self._cols)}")
        n_new = int(slots.max()) + 1 - len(self) if len(slots) else 0
        for name, values in rows.items():
            col = self._cols.get(name)
            if col is None:
                col = values.new_zeros((0, *values.shape[1:]))
            if n_new > 0:
                col = torch.cat([col, col.new_zeros((n_new, *col.shape[1:]))])
            col[slots] = values.to(col.dtype)
            self._cols[name] = col

    def truncate(self, length: int) -> None:
        self._cols = {k: v[:length] for k, v in self._cols.items()}

    def sample(self, n: int, generator: torch.Generator) -> Rows:
        idx = torch.randperm(len(self), generator=generator)[:n]
        return {k: v[idx] for k, v in self._cols.items()}

    def rows(self, where: Tensor | None = None) -> Rows:
        return {k: (v if where is None else v[where]) for k, v in self._cols.items()}

    def column(self, name: str) -> Tensor:
        if name not in self._cols:
            return torch.zeros(0, dtype=torch.long)
        return self._cols[name]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._cols.values())

    def commit(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "columns": dict(self._cols)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self._cols = dict(state["columns"])
