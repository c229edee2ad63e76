"""``inspect_store``: a printable health report of a replay store (``clgrid replay inspect PATH``)."""

from __future__ import annotations

import os
import warnings
from collections import Counter

import numpy as np
import pyarrow.fs as pafs

from clgrid.replay.arrow_store import gather
from clgrid.replay.errors import ReplayStoreError
from clgrid.replay.manifest import manifest_ids, newest_manifest
from clgrid.replay.shards import open_shard
from clgrid.replay.storage import StoreRoot


class InspectReport(str):
    """The report text; ``exit_status`` is the status ``clgrid replay inspect`` should exit with."""

    exit_status: int

    def __new__(cls, lines: list[str], exit_status: int) -> InspectReport:
        report = super().__new__(cls, "\n".join(lines))
        report.exit_status = exit_status
        return report


def inspect_store(path: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> InspectReport:
    """Reports a store's current manifest, its shards (rows, bytes, checksum ok/BAD/MISSING), rows
    per class and per experience, and the total bytes. Never raises for a damaged store.

    Exit status (``report.exit_status``):
      0  the current manifest and every shard it references verify
      1  the store opens, but a shard is missing or fails its checksum, or a newer manifest was
         skipped because it does not verify (each is named in the report)
      2  nothing to inspect: no manifest at PATH, none verifies, or one has a newer format version
    """
    root = StoreRoot(path, filesystem)
    lines = [f"replay store {root}"]
    try:
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always")
            m = newest_manifest(root)
    except ReplayStoreError as e:
        return InspectReport([*lines, f"error: {e}"], 2)
    if m is None:
        return InspectReport([*lines, "no manifest: nothing was committed here"], 2)
    problems = [str(w.message) for w in skipped]
    columns = ", ".join(f"{n} {c.dtype}{list(c.shape) if c.shape else ''}" for n, c in m.columns.items())
    lines += [
        f"manifests present: {', '.join(map(str, manifest_ids(root)))}",
        f"current manifest: {m.name} (id {m.id}, parent {m.parent})",
        f"capacity {m.capacity}, rows {len(m.src)}, samples seen {m.seen}",
        f"columns: {columns or '-'}",
        f"shards ({len(m.shards)}):",
    ]
    shards = []
    live = np.bincount(m.src, minlength=len(m.shards))
    for i, info in enumerate(m.shards):
        try:
            shards.append(open_shard(root, info, m.columns, m.name))
            status = "ok"
        except ReplayStoreError as e:
            status = "MISSING" if root.size(info.name) is None else "BAD"
            problems.append(str(e))
        lines.append(
            f"  {info.name}  rows {info.rows:>7} (live {live[i]:>7})  bytes {info.bytes:>11,}  "
            f"sha256 {info.sha256[:12]}  {status}"
        )
    lines.append(f"total bytes: {m.nbytes:,}")
    if len(shards) == len(m.shards):
        titles = {c: t for c, t in (("y", "rows per class"), ("t", "rows per experience")) if c in m.columns}
        values = gather([s.cols for s in shards], m.src, m.row, m.columns, list(titles))
        for col, title in titles.items():
            counts = sorted(Counter(values[col].tolist()).items())
            lines.append(f"{title}: " + (", ".join(f"{k}: {n}" for k, n in counts) or "-"))
    else:
        lines.append("rows per class and experience: not computed (damaged shards)")
    lines += [f"problem: {p}" for p in problems]
    lines.append(
        "checksums: all verify" if not problems else f"checksums: {len(problems)} problem(s); see above"
    )
    return InspectReport(lines, 1 if problems else 0)
