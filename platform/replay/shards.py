"""Immutable Arrow IPC shards (file format) with one schema: a fixed-shape tensor column per input or
extra (``x``, DER's logits, ...), scalar columns as plain Arrow columns (``y``, ``t``).

A shard is written whole and never changed. Reading verifies its size and sha256 against the
manifest, then exposes each column as a read-only torch view of the (memory-mapped) file.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from torch import Tensor

from clgrid.replay.errors import ShardCorruptError, ShardMissingError, UnsupportedFormatError
from clgrid.replay.storage import StoreRoot

FORMAT_VERSION = 1  # of shards and manifests; bump on any incompatible change
META_VERSION = b"clgrid.replay.format_version"
META_COLUMNS = b"clgrid.replay.columns"


@dataclass(frozen=True)
class ColumnSpec:
    """One column: numpy dtype name and per-sample shape (``()`` for a scalar)."""

    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, values: Tensor) -> ColumnSpec:
        try:
            dtype = np.dtype(str(values.dtype).removeprefix("torch."))
        except TypeError:  # torch-only dtypes such as bfloat16
            dtype = np.dtype(object)
        if dtype.kind not in "iuf":
            raise ValueError(f"replay column {name!r} has dtype {values.dtype}; expected an integer or float dtype")
        return cls(dtype.name, tuple(values.shape[1:]))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def arrow_type(self) -> pa.DataType:
        value = pa.from_numpy_dtype(np.dtype(self.dtype))
        return pa.fixed_shape_tensor(value, self.shape) if self.shape else value

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ColumnSpec:
        return cls(str(d["dtype"]), tuple(int(s) for s in d["shape"]))


Columns = dict[str, ColumnSpec]


@dataclass(frozen=True)
class ShardInfo:
    """What a manifest records about a shard."""

    name: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Shard:
    """An opened, verified shard: ``cols`` are read-only zero-copy views; never write to them."""

    info: ShardInfo
    cols: dict[str, Tensor]


def shard_name(commit_id: int) -> str:
    return f"shard-{commit_id:06d}.arrow"


def arrow_schema(columns: Columns) -> pa.Schema:
    meta = {
        META_VERSION: str(FORMAT_VERSION),
        META_COLUMNS: json.dumps({n: c.to_json() for n, c in columns.items()}),
    }
    return pa.schema([pa.field(n, c.arrow_type(), nullable=False) for n, c in columns.items()], metadata=meta)


def write_shard(root: StoreRoot, name: str, columns: Columns, rows: dict[str, Tensor]) -> ShardInfo:
    """Writes ``rows`` (one tensor per column, same length, CPU) as the shard ``name``."""
    schema = arrow_schema(columns)
    arrays = [_array(rows[col].contiguous().numpy(), spec) for col, spec in columns.items()]
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch(arrays, schema=schema))
    data = sink.getvalue()
    root.write(name, data)
    return ShardInfo(name, len(arrays[0]), data.size, hashlib.sha256(data).hexdigest())


def open_shard(root: StoreRoot, info: ShardInfo, columns: Columns, manifest: str, verify: bool = True) -> Shard:
    """Opens a shard, verifying size and checksum unless it was just written by this process.

    Errors name the shard and the ``manifest`` that references it.
    """
    where = f"{info.name} referenced by {manifest} in {root}"
    size = root.size(info.name)
    if size is None:
        raise ShardMissingError(f"{where} is missing", info.name, manifest)
    if size != info.bytes:
        raise ShardCorruptError(f"{where} has {size} bytes; the manifest recorded {info.bytes}", info.name, manifest)
    data = root.read(info.name)
    found = hashlib.sha256(data).hexdigest() if verify else info.sha256
    if found != info.sha256:
        raise ShardCorruptError(
            f"{where} fails its checksum (sha256 {found[:16]}..., manifest has {info.sha256[:16]}...): "
            "the file changed after it was written",
            info.name,
            manifest,
        )
    reader = ipc.open_file(data)
    version = int((reader.schema.metadata or {}).get(META_VERSION, b"0"))
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(f"{where} has format version {version}; this clgrid reads up to {FORMAT_VERSION}")
    expected = arrow_schema(columns)
    if not reader.schema.equals(expected) or reader.num_record_batches != 1:
        raise ShardCorruptError(f"{where} does not hold the manifest's columns {list(columns)}", info.name, manifest)
    batch = reader.get_batch(0)
    if batch.num_rows != info.rows:
        message = f"{where} has {batch.num_rows} rows; the manifest recorded {info.rows}"
        raise ShardCorruptError(message, info.name, manifest)
    return Shard(info, {n: _view(batch.column(n), spec) for n, spec in columns.items()})


def _array(values: np.ndarray, spec: ColumnSpec) -> pa.Array:
    """The Arrow column over ``values``' memory (built from buffers: ``pa.array`` imports pandas)."""
    flat = pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), values.size, [None, pa.py_buffer(values)])
    if not spec.shape:
        return flat
    storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(spec.shape)))
    return pa.ExtensionArray.from_storage(spec.arrow_type(), storage)


def _view(array: pa.Array, spec: ColumnSpec) -> Tensor:
    flat = array.storage.flatten() if spec.shape else array
    dtype = np.dtype(spec.dtype)
    # straight from the data buffer: no copy (and no pandas import, which to_numpy does)
    data = np.frombuffer(flat.buffers()[1], dtype, count=len(flat), offset=flat.offset * dtype.itemsize)
    values = data.reshape(len(array), *spec.shape)
    with warnings.catch_warnings():
        # The mapping is read-only and torch warns about it; the store only ever copies out of it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)
