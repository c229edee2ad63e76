"""Numbered JSON manifests: the record of what a replay store holds after each commit.

``manifest-000007.json`` lists the columns, the shards (rows, bytes, sha256), the slot map (which
shard row holds each slot, run-length encoded) and the reservoir counter. It carries a sha256 of
its own content, so a torn or edited manifest does not verify; the current manifest is the newest
one that verifies.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clgrid.replay.errors import ManifestError, UnsupportedFormatError
from clgrid.replay.shards import FORMAT_VERSION, Columns, ColumnSpec, ShardInfo
from clgrid.replay.storage import StoreRoot

FORMAT = "clgrid.replay"
_NAME = re.compile(r"manifest-(\d{6,})\.json")
_SHARD = re.compile(r"shard-\d{6,}\.arrow")


def manifest_name(manifest_id: int) -> str:
    return f"manifest-{manifest_id:06d}.json"


def manifest_ids(root: StoreRoot) -> list[int]:
    """Ids of every manifest file in ``root``, verifying or not, ascending."""
    return sorted(int(m.group(1)) for m in map(_NAME.fullmatch, root.names()) if m)


@dataclass
class Manifest:
    id: int
    parent: int | None  # the manifest this one was committed on top of
    capacity: int
    seen: int  # samples offered to insert(): the reservoir counter
    columns: Columns
    shards: list[ShardInfo]
    src: np.ndarray  # per slot: index into ``shards``
    row: np.ndarray  # per slot: row within that shard

    @property
    def name(self) -> str:
        return manifest_name(self.id)

    @property
    def nbytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "id": self.id,
            "parent": self.parent,
            "capacity": self.capacity,
            "seen": self.seen,
            "length": len(self.src),
            "columns": {n: c.to_json() for n, c in self.columns.items()},
            "shards": [asdict(s) for s in self.shards],
            "slots": _encode_runs(self.src, self.row),
        }
        return json.dumps({**body, "sha256": _digest(body)}).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parses and verifies a manifest; ``where`` names it in errors."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise ManifestError(f"{where} is not valid JSON (a torn or damaged write)") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(f"{where} is not a clgrid replay manifest")
        version = doc.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{where} has format version {version!r}; this clgrid supports versions up to {FORMAT_VERSION}"
            )
        if doc.pop("sha256", None) != _digest(doc):
            raise ManifestError(f"{where} fails its checksum (a torn or edited write)")
        try:
            shards = [
                ShardInfo(str(s["name"]), int(s["rows"]), int(s["bytes"]), str(s["sha256"])) for s in doc["shards"]
            ]
            for s in shards:  # a shard name is joined to the store folder: no "../" from an edited manifest
                if not _SHARD.fullmatch(s.name):
                    raise ValueError(f"shard name {s.name!r} is not shard-NNNNNN.arrow")
            src, row = _decode_runs(doc["slots"], int(doc["length"]), shards)
            return cls(
                id=int(doc["id"]),
                parent=None if doc["parent"] is None else int(doc["parent"]),
                capacity=int(doc["capacity"]),
                seen=int(doc["seen"]),
                columns={n: ColumnSpec.from_json(c) for n, c in doc["columns"].items()},
                shards=shards,
                src=src,
                row=row,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where} is malformed: {e!r}") from None


def read_manifest(root: StoreRoot, manifest_id: int) -> Manifest:
    """The verified manifest ``manifest_id``; ManifestError when it is missing or does not verify."""
    name = manifest_name(manifest_id)
    if root.size(name) is None:
        raise ManifestError(f"{name} not found in {root}; manifests there: {manifest_ids(root)}")
    manifest = Manifest.from_bytes(root.read(name).to_pybytes(), f"{name} in {root}")
    if manifest.id != manifest_id:
        raise ManifestError(f"{name} in {root} records id {manifest.id}")
    return manifest


def newest_manifest(root: StoreRoot) -> Manifest | None:
    """The newest manifest that verifies, or None when ``root`` has no manifest at all.

    A manifest of a newer format version stops the search (UnsupportedFormatError): it was written on
    purpose by a newer clgrid, and falling back past it would silently drop its content.
    """
    failures = []
    for manifest_id in reversed(manifest_ids(root)):
        try:
            return read_manifest(root, manifest_id)
        except ManifestError as e:
            failures.append(str(e))
            warnings.warn(f"skipped a replay manifest that does not verify: {e}", stacklevel=2)
    if failures:
        raise ManifestError(f"no manifest in {root} verifies: " + "; ".join(failures))
    return None


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _encode_runs(src: np.ndarray, row: np.ndarray) -> list[list[int]]:
    """[first slot, count, shard, first row] for each run of slots held by consecutive shard rows."""
    if len(src) == 0:
        return []
    breaks = np.flatnonzero((src[1:] != src[:-1]) | (row[1:] != row[:-1] + 1)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(src)]])
    return [[int(s), int(e - s), int(src[s]), int(row[s])] for s, e in zip(starts, ends)]


def _decode_runs(runs: list[list[int]], length: int, shards: list[ShardInfo]) -> tuple[np.ndarray, np.ndarray]:
    runs_arr = np.asarray(runs, dtype=np.int64).reshape(-1, 4)
    first, count, shard, first_row = runs_arr.T
    ends = np.cumsum(count)
    if (count <= 0).any() or not np.array_equal(first, ends - count) or (ends[-1] if len(ends) else 0) != length:
        raise ValueError("slot runs do not cover the slots 0..length-1 in order")
    rows_in = np.asarray([s.rows for s in shards], dtype=np.int64)
    outside = (shard < 0) | (shard >= len(shards))
    if outside.any() or (first_row < 0).any() or (first_row + count > rows_in[shard]).any():
        raise ValueError("a slot run points outside its shard")
    src = np.repeat(shard, count)
    row = np.repeat(first_row - first, count) + np.arange(length, dtype=np.int64)
    return src, row
