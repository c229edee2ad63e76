"""Trial state after each experience, written atomically and read back without unpickling code.

A trial folder holds ``checkpoints/exp-NNN.pt`` (the state after experience NNN) and, once the
trial finished, ``result.json``. Each checkpoint is written to a temporary file in the same folder,
flushed, fsynced and renamed, so a reader sees the old file or the new one, never a torn one.
Loading uses ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
KEEP = 2  # checkpoints kept per trial: the newest one and its predecessor
_NAME = re.compile(r"^exp-(\d{3,})\.pt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be trusted (tampered, truncated, or of another format)."""


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # "[Errno 28] No space left on device" alone does not say where
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(trial_dir: Path, experience: int, state: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "experience": experience, **state}, buf)
    path = trial_dir / "checkpoints" / f"exp-{experience:03d}.pt"
    atomic_write(path, buf.getvalue())
    for old in _listed(trial_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def latest(trial_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint of a trial, or None when it has none."""
    paths = _listed(trial_dir)
    return load(paths[-1]) if paths else None


def load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling error names only a class; say which file and why
        raise CheckpointError(f"{path}: not a clgrid checkpoint or tampered ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format') if isinstance(state, dict) else '?'}, "
                              f"expected {FORMAT}")
    return state


def _listed(trial_dir: Path) -> list[Path]:
    folder = trial_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name)[1]))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
