"""The replay memory kept durably in Arrow shards: ``ArrowReplayStore``.

A store is one folder per trial (a local path or any pyarrow.fs URI such as ``s3://...``):

    shard-000003.arrow      immutable Arrow IPC file: the rows commit 3 wrote
    manifest-000003.json    what commit 3 holds: shards with checksums, slot map, reservoir counter

Between commits, written slots live in an in-memory overlay (reservoir insertion happens every
training step). ``commit()`` writes the overlay, plus the live rows of mostly-dead shards, as one new
shard, then a new manifest, and only then removes the files no kept manifest references.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import Tensor

from clgrid.replay import policies
from clgrid.replay.errors import ReplayStoreError
from clgrid.replay.manifest import Manifest, manifest_ids, manifest_name, newest_manifest, read_manifest
from clgrid.replay.memory import Rows
from clgrid.replay.shards import Columns, ColumnSpec, Shard, open_shard, shard_name, write_shard
from clgrid.replay.storage import TEMP_PREFIX, StoreRoot

OVERLAY = -1  # slot source meaning "the overlay"; as a list index it picks the last source
MIN_LIVE = 0.5  # shards with fewer live rows than this fraction are rewritten, bounding dead bytes


class ArrowReplayStore:
    """A ``ReplayMemory`` whose slots live in memory-mapped Arrow shards under ``root``.

    root:       the store folder: a local path or a URI pyarrow.fs understands
    capacity:   number of slots; required to create a store, checked against an existing one
    manifest:   the manifest id to open at (resume); None opens the newest that verifies
    keep:       how many of the newest manifests (with their shards) a commit keeps; the manifest
                a commit started from is kept as well, so a checkpoint recording it can still resume
    filesystem: a pyarrow FileSystem in which ``root`` is a path (instead of a URI)

    Raises ReplayStoreError subclasses when the store cannot be opened as it was written.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        capacity: int | None = None,
        manifest: int | None = None,
        *,
        keep: int = 2,
        filesystem: pafs.FileSystem | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = StoreRoot(root, filesystem)
        self.keep = keep
        self.capacity = capacity
        self._open(manifest)

    # --- opening -----------------------------------------------------------------------------

    def _open(self, manifest_id: int | None) -> None:
        m = newest_manifest(self.root) if manifest_id is None else read_manifest(self.root, manifest_id)
        if m is None:
            if self.capacity is None:
                raise ReplayStoreError(f"{self.root} holds no replay store; give a capacity to create one")
            self._install(None, [], {}, seen=0, src=torch.zeros(0, dtype=torch.long), row=torch.zeros(0, dtype=torch.long))
            return
        if self.capacity is not None and self.capacity != m.capacity:
            raise ReplayStoreError(f"{m.name} in {self.root} has capacity {m.capacity}; expected {self.capacity}")
        shards = [open_shard(self.root, info, m.columns, m.name) for info in m.shards]
        self.capacity = m.capacity
        self._install(m, shards, m.columns, m.seen, torch.from_numpy(m.src), torch.from_numpy(m.row))

    def _install(self, m: Manifest | None, shards: list[Shard], columns: Columns, seen: int, src: Tensor, row: Tensor) -> None:
        self._manifest = m
        self._shards = shards
        self._columns = dict(columns)
        self.seen = seen
        self._src = src  # per slot: index into _shards, or OVERLAY
        self._row = row  # per slot: row within that shard or the overlay
        self._overlay: dict[str, Tensor] = {}
        self._overlay_used = 0
        self._dirty = m is None  # a new store's first commit writes its first manifest

    @property
    def manifest_id(self) -> int | None:
        """The id of the manifest the committed content is in (None before the first commit)."""
        return None if self._manifest is None else self._manifest.id

    # --- the ReplayMemory protocol -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._src)

    def insert(self, rows: Rows, policy: str = "reservoir", generator: torch.Generator | None = None) -> None:
        if self.capacity <= 0:
            return
        rows = self._check(rows)  # before the counter moves, so a rejected call changes nothing
        src, slots = policies.place(policy, rows["y"], self.column("y"), self.seen, self.capacity, generator)
        self.seen += int(rows["y"].shape[0])
        self._dirty = True
        if len(src):
            self.write(slots, {k: v[src] for k, v in rows.items()})

    def write(self, slots: Tensor, rows: Rows) -> None:
        rows = self._check(rows)
        slots = torch.as_tensor(slots).detach().cpu().long().reshape(-1)
        if not len(slots):
            return
        if int(slots.min()) < 0:
            raise IndexError(f"replay slots must be non-negative, got {int(slots.min())}")
        slots, pick = _last_writer(slots)
        if int(slots.max()) >= len(self):
            self._extend(int(slots.max()) + 1)
        moved = slots[self._src[slots] != OVERLAY]
        fresh = self._overlay_alloc(len(moved))  # before marking: allocation may compact the overlay
        self._src[moved] = OVERLAY
        self._row[moved] = fresh
        target = self._row[slots]
        for name, buf in self._overlay.items():
            buf[target] = rows[name][pick].to(buf.dtype)
        self._dirty = True

    def truncate(self, length: int) -> None:
        src = self._src[:length]
        if len(src) != len(self._src):
            self._src, self._row = src.clone(), self._row[:length].clone()
            self._dirty = True

    def sample(self, n: int, generator: torch.Generator) -> Rows:
        return self._gather(torch.randperm(len(self), generator=generator)[:n])

    def rows(self, where: Tensor | None = None) -> Rows:
        slots = torch.arange(len(self))
        return self._gather(slots if where is None else slots[where])

    def column(self, name: str) -> Tensor:
        if name not in self._columns:
            return torch.zeros(0, dtype=torch.long)
        return self._gather(torch.arange(len(self)), [name])[name]

    def nbytes(self) -> int:
        """On-disk bytes of the shards the current manifest references (the ``replay_bytes`` metric)."""
        return 0 if self._manifest is None else self._manifest.nbytes

    def commit(self) -> int:
        """Writes the changes since the last commit as one shard plus a manifest; returns its id.

        Returns the current id without writing when nothing changed. Until the new manifest is
        durable, nothing on disk changes meaning; files only it superseded are removed afterwards.
        """
        if not self._dirty:
            return self._manifest.id
        parent = self._manifest
        new_id = max([*manifest_ids(self.root), parent.id if parent else 0]) + 1
        live = torch.bincount(self._src[self._src >= 0], minlength=len(self._shards))
        total = torch.tensor([s.info.rows for s in self._shards], dtype=torch.long)
        kept = live >= MIN_LIVE * total
        remap = torch.full((len(self._shards) + 1,), OVERLAY, dtype=torch.long)  # last entry: overlay
        remap[:-1][kept] = torch.arange(int(kept.sum()))
        src, row = remap[self._src], self._row.clone()
        shards = [s for s, k in zip(self._shards, kept.tolist()) if k]
        rewrite = (src == OVERLAY).nonzero().squeeze(1)  # ascending: the new shard is in slot order
        if len(rewrite):
            info = write_shard(self.root, shard_name(new_id), self._columns, self._gather(rewrite))
            shards.append(open_shard(self.root, info, self._columns, manifest_name(new_id), verify=False))
            src[rewrite] = len(shards) - 1
            row[rewrite] = torch.arange(len(rewrite))
        m = Manifest(new_id, parent.id if parent else None, self.capacity, self.seen, dict(self._columns),
                     [s.info for s in shards], src.numpy(), row.numpy())
        self.root.write(m.name, m.to_bytes())
        self._install(m, shards, self._columns, self.seen, src, row)  # durable: switch over
        self._collect_garbage(parent)
        return new_id

    def state_dict(self) -> dict[str, Any]:
        """Commits, then returns what a checkpoint records: the manifest id and two cross-checks."""
        return {"manifest": self.commit(), "seen": self.seen, "length": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Reopens the store at the checkpoint's manifest, dropping uncommitted changes."""
        self._open(int(state["manifest"]))
        if (self.seen, len(self)) != (state["seen"], state["length"]):
            raise ReplayStoreError(
                f"{self._manifest.name} in {self.root} holds seen={self.seen}, length={len(self)}; the checkpoint "
                f"expects seen={state['seen']}, length={state['length']} (is this the trial's store?)"
            )

    # --- internals ---------------------------------------------------------------------------

    def _check(self, rows: Rows) -> Rows:
        """CPU copies of ``rows`` (y and t as int64); the first write fixes the store's columns."""
        rows = {k: v.detach().cpu() for k, v in rows.items()}
        for k in ("y", "t"):
            if k in rows:
                rows[k] = rows[k].long()
        specs = {k: ColumnSpec.of(k, v) for k, v in rows.items()}
        if not self._columns:
            self._columns = specs
        elif specs.keys() != self._columns.keys() or any(specs[k].shape != c.shape for k, c in self._columns.items()):
            have = {k: c.shape for k, c in self._columns.items()}
            raise ValueError(f"replay rows have columns {({k: c.shape for k, c in specs.items()})}; the store holds {have}")
        return rows

    def _extend(self, length: int) -> None:
        """Adds zero-filled slots up to ``length`` (slots skipped by a write read as zeros)."""
        n = length - len(self)
        fresh = self._overlay_alloc(n)
        for buf in self._overlay.values():
            buf[fresh] = 0
        self._src = torch.cat([self._src, torch.full((n,), OVERLAY, dtype=torch.long)])
        self._row = torch.cat([self._row, fresh])

    def _overlay_alloc(self, n: int) -> Tensor:
        """``n`` unused overlay rows; grows the overlay (dropping rows no slot uses) when full."""
        size = len(next(iter(self._overlay.values()))) if self._overlay else 0
        if self._overlay_used + n > size:
            live = (self._src == OVERLAY).nonzero().squeeze(1)
            old_rows = self._row[live]
            size = max(64, min(2 * (len(live) + n), max(self.capacity, len(live) + n)))
            grown = {}
            for name, spec in self._columns.items():
                grown[name] = torch.empty((size, *spec.shape), dtype=spec.torch_dtype)
                if name in self._overlay:
                    grown[name][: len(live)] = self._overlay[name][old_rows]
            self._overlay = grown
            self._row[live] = torch.arange(len(live))
            self._overlay_used = len(live)
        fresh = torch.arange(self._overlay_used, self._overlay_used + n)
        self._overlay_used += n
        return fresh

    def _gather(self, slots: Tensor, names: list[str] | None = None) -> Rows:
        sources = [s.cols for s in self._shards] + [self._overlay]
        return gather(sources, self._src[slots], self._row[slots], self._columns, names or list(self._columns))

    def _collect_garbage(self, parent: Manifest | None) -> None:
        """Removes manifests beyond the kept ones, then shards and temp files none of them needs."""
        try:
            ids = manifest_ids(self.root)
            kept = set(ids[-self.keep :]) | {self._manifest.id} | ({parent.id} if parent else set())
            known = {m.id: m for m in (self._manifest, parent) if m is not None}
            needed = set()
            for i in kept:
                needed |= {s.name for s in (known.get(i) or read_manifest(self.root, i)).shards}
            for i in ids:
                if i not in kept:
                    self.root.delete(manifest_name(i))
            for name in self.root.names():
                unneeded_shard = name.startswith("shard-") and name.endswith(".arrow") and name not in needed
                if unneeded_shard or name.startswith(TEMP_PREFIX):
                    self.root.delete(name)
        except (OSError, ReplayStoreError) as e:  # the commit is durable; leftovers go next time
            warnings.warn(f"replay store {self.root}: garbage collection stopped: {e}", stacklevel=3)


def gather(sources: list[dict[str, Tensor]], src: Tensor, row: Tensor, columns: Columns, names: list[str]) -> Rows:
    """Copies rows ``row[i]`` of sources ``src[i]`` into fresh tensors, one per column in ``names``."""
    if len(src) == 0:
        return {n: torch.empty((0, *columns[n].shape), dtype=columns[n].torch_dtype) for n in names}
    first = int(src[0])
    if bool((src == first).all()):  # the common case after a commit: one shard holds them all
        return {n: sources[first][n].index_select(0, row) for n in names}
    out = {n: torch.empty((len(src), *columns[n].shape), dtype=columns[n].torch_dtype) for n in names}
    for s in torch.unique(src).tolist():
        pos = (src == s).nonzero().squeeze(1)
        rows_in_s = row[pos]
        for n in names:
            out[n].index_copy_(0, pos, sources[s][n].index_select(0, rows_in_s))
    return out


def _last_writer(slots: Tensor) -> tuple[Tensor, Tensor]:
    """Unique slots and, for each, the index of the last row written to it."""
    unique, inverse = torch.unique(slots, return_inverse=True)
    pick = torch.full((len(unique),), -1, dtype=torch.long)
    pick.scatter_reduce_(0, inverse, torch.arange(len(slots)), reduce="amax")
    return unique, pick
