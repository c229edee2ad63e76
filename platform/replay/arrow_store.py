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

import numpy as np
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
    manifest:   the manifest id to open at (resume); None opens the newest that verifies; 0 starts
                empty whatever the folder holds (a trial restarted without a checkpoint), leaving
                older manifests to be removed as new commits supersede them
    keep:       how many of the newest manifests (with their shards) a commit keeps; the manifest
                a commit started from is kept as well, so a checkpoint recording it can still resume
    filesystem: a pyarrow FileSystem in which ``root`` is a path (instead of a URI)

    One writer per store: two stores writing the same folder would remove each other's files (and
    could pick the same next manifest id). In a sweep, the sweep's lease and each trial attempt's
    mark (``clgrid.sweep.lease``) make it so: an attempt Ray retries starts only once the one before
    has stopped; its commits take ids above that attempt's, whose temporary files and manifests past
    the checkpoint are then garbage like any superseded file.
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
        if manifest_id == 0:
            m = None
        else:
            m = newest_manifest(self.root) if manifest_id is None else read_manifest(self.root, manifest_id)
        if m is None:
            if self.capacity is None:
                raise ReplayStoreError(f"{self.root} holds no replay store; give a capacity to create one")
            self._install(None, [], {}, 0, np.zeros(0, np.int64), np.zeros(0, np.int64))
            return
        if self.capacity is not None and self.capacity != m.capacity:
            raise ReplayStoreError(f"{m.name} in {self.root} has capacity {m.capacity}; expected {self.capacity}")
        shards = [open_shard(self.root, info, m.columns, m.name) for info in m.shards]
        self.capacity = m.capacity
        self._install(m, shards, m.columns, m.seen, m.src, m.row)

    def _install(
        self,
        m: Manifest | None,
        shards: list[Shard],
        columns: Columns,
        seen: int,
        src: np.ndarray,
        row: np.ndarray,
        scalars: Rows | None = None,
    ) -> None:
        self._manifest = m
        self._shards = shards
        self._columns = dict(columns)
        self.seen = seen
        # The slot map is numpy: per-call overhead on 128-element index arrays is far below torch's.
        self._src = src.copy()  # per slot: index into _shards, or OVERLAY
        self._row = row.copy()  # per slot: row within that shard or the overlay
        if scalars is None:
            names = [n for n, c in self._columns.items() if not c.shape]
            scalars = gather([s.cols for s in shards], src, row, self._columns, names)
        # Scalar columns (y, t) take a few bytes per slot: kept whole in memory, they make column("y")
        # (every insert) and their share of sample() cheap. The overlay holds the other columns.
        self._scalars = scalars
        self._overlay: Rows = {}
        self._overlay_size = self._overlay_used = 0
        self._dirty = m is None  # a new store's first commit writes its first manifest

    @property
    def manifest_id(self) -> int:
        """The id of the manifest holding the committed content (0 before the first commit)."""
        return 0 if self._manifest is None else self._manifest.id

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
            self._write(slots.numpy(), {k: v[src] for k, v in rows.items()})

    def write(self, slots: Tensor, rows: Rows) -> None:
        self._write(torch.as_tensor(slots).detach().cpu().long().reshape(-1).numpy(), self._check(rows))

    def _write(self, slots: np.ndarray, rows: Rows) -> None:
        if not len(slots):
            return
        if slots.min() < 0:
            raise IndexError(f"replay slots must be non-negative, got {slots.min()}")
        slots, pick = _last_writer(slots)
        if slots[-1] >= len(self):  # slots are sorted
            self._extend(int(slots[-1]) + 1)
        moved = slots[self._src[slots] != OVERLAY]
        fresh = self._overlay_alloc(len(moved))  # before marking: allocation may compact the overlay
        self._src[moved] = OVERLAY
        self._row[moved] = fresh
        at, target, pick = torch.from_numpy(slots), torch.from_numpy(self._row[slots]), torch.from_numpy(pick)
        for name, values in rows.items():
            if name in self._scalars:
                self._scalars[name][at] = values[pick].to(self._scalars[name].dtype)
            else:
                self._overlay[name][target] = values[pick].to(self._overlay[name].dtype)
        self._dirty = True

    def truncate(self, length: int) -> None:
        src = self._src[:length]
        if len(src) != len(self._src):
            self._src, self._row = src.copy(), self._row[:length].copy()
            self._scalars = {k: v[:length].clone() for k, v in self._scalars.items()}
            self._dirty = True

    def sample(self, n: int, generator: torch.Generator) -> Rows:
        return self._gather(torch.randperm(len(self), generator=generator)[:n])

    def rows(self, where: Tensor | None = None) -> Rows:
        slots = torch.arange(len(self))
        return self._gather(slots if where is None else slots[where])

    def column(self, name: str) -> Tensor:
        if name in self._scalars:
            return self._scalars[name].clone()
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
        live = np.bincount(self._src[self._src >= 0], minlength=len(self._shards))
        kept = live >= MIN_LIVE * np.array([s.info.rows for s in self._shards], dtype=np.int64)
        remap = np.full(len(self._shards) + 1, OVERLAY, dtype=np.int64)  # the last entry maps OVERLAY
        remap[:-1][kept] = np.arange(int(kept.sum()))
        src, row = remap[self._src], self._row.copy()
        shards = [s for s, k in zip(self._shards, kept) if k]
        rewrite = np.flatnonzero(src == OVERLAY)  # ascending: the new shard is in slot order
        if len(rewrite):
            info = write_shard(self.root, shard_name(new_id), self._columns, self._gather(torch.from_numpy(rewrite)))
            shards.append(open_shard(self.root, info, self._columns, manifest_name(new_id), verify=False))
            src[rewrite] = len(shards) - 1
            row[rewrite] = np.arange(len(rewrite))
        m = Manifest(new_id, parent.id if parent else None, self.capacity, self.seen, dict(self._columns),
                     [s.info for s in shards], src, row)
        self.root.write(m.name, m.to_bytes())
        self._install(m, shards, self._columns, self.seen, src, row, self._scalars)  # durable: switch over
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
        if not self._columns:  # only ever for an empty store: slots come from writes
            self._columns = {k: ColumnSpec.of(k, v) for k, v in rows.items()}
            self._scalars = {k: torch.zeros(0, dtype=c.torch_dtype) for k, c in self._columns.items() if not c.shape}
        elif rows.keys() != self._columns.keys() or any(rows[k].shape[1:] != c.shape for k, c in self._columns.items()):
            given = {k: tuple(v.shape[1:]) for k, v in rows.items()}
            have = {k: c.shape for k, c in self._columns.items()}
            raise ValueError(f"replay rows have columns {given}; the store holds {have}")
        return rows

    def _extend(self, length: int) -> None:
        """Adds zero-filled slots up to ``length`` (slots skipped by a write read as zeros)."""
        n = length - len(self)
        fresh = self._overlay_alloc(n)
        for buf in self._overlay.values():
            buf[torch.from_numpy(fresh)] = 0
        self._src = np.concatenate([self._src, np.full(n, OVERLAY, dtype=np.int64)])
        self._row = np.concatenate([self._row, fresh])
        self._scalars = {k: torch.cat([v, v.new_zeros(n)]) for k, v in self._scalars.items()}

    def _overlay_alloc(self, n: int) -> np.ndarray:
        """``n`` unused overlay rows; grows the overlay (dropping rows no slot uses) when full."""
        if self._overlay_used + n > self._overlay_size:
            live = np.flatnonzero(self._src == OVERLAY)
            old_rows = torch.from_numpy(self._row[live])
            size = max(64, min(2 * (len(live) + n), max(self.capacity, len(live) + n)))
            grown = {}
            for name, spec in self._columns.items():
                if name in self._scalars:
                    continue
                grown[name] = torch.empty((size, *spec.shape), dtype=spec.torch_dtype)
                if name in self._overlay:
                    grown[name][: len(live)] = self._overlay[name][old_rows]
            self._overlay, self._overlay_size = grown, size
            self._row[live] = np.arange(len(live))
            self._overlay_used = len(live)
        fresh = np.arange(self._overlay_used, self._overlay_used + n, dtype=np.int64)
        self._overlay_used += n
        return fresh

    def _gather(self, slots: Tensor, names: list[str] | None = None) -> Rows:
        names = names or list(self._columns)
        stored = [n for n in names if n not in self._scalars]
        out = {}
        if stored:
            at = slots.numpy()
            sources = [s.cols for s in self._shards] + [self._overlay]
            out = gather(sources, self._src[at], self._row[at], self._columns, stored)
        return {n: self._scalars[n].index_select(0, slots) if n in self._scalars else out[n] for n in names}

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


def gather(
    sources: list[dict[str, Tensor]], src: np.ndarray, row: np.ndarray, columns: Columns, names: list[str]
) -> Rows:
    """Copies rows ``row[i]`` of sources ``src[i]`` into fresh tensors, one per column in ``names``.

    The source holding most of the rows (after a commit: all of them) fills the whole output in one
    ``index_select``; the few rows of other sources then overwrite their places. This avoids
    temporaries as large as the output, whose allocation costs more than the copying.
    """
    if len(src) == 0:
        return {n: torch.empty((0, *columns[n].shape), dtype=columns[n].torch_dtype) for n in names}
    lo = int(src.min())
    counts = np.bincount(src - lo)
    main = lo + int(counts.argmax())
    at = torch.from_numpy(row if len(counts) == 1 else np.where(src == main, row, 0))  # others: row 0 for now
    out = {n: sources[main][n].index_select(0, at) for n in names}
    for s in (lo + np.flatnonzero(counts)).tolist():
        if s != main:
            pos = np.flatnonzero(src == s)
            to, at = torch.from_numpy(pos), torch.from_numpy(row[pos])
            for n in names:
                out[n].index_copy_(0, to, sources[s][n].index_select(0, at))
    return out


def _last_writer(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique slots (ascending) and, for each, the index of the last row written to it."""
    unique, first_from_end = np.unique(slots[::-1], return_index=True)
    return unique, len(slots) - 1 - first_from_end
