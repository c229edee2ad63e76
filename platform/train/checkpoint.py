"""Trial state after each experience, written atomically and read back without unpickling code.

A trial folder holds one checkpoint per recent experience (``clgrid.sweep.layout.TrialDir``). Each
is written to a temporary file in the same folder, flushed, fsynced and renamed, so a reader sees
the old file or the new one, never a torn one.
Loading uses ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import torch

from clgrid.fsio import atomic_write
from clgrid.sweep.layout import TrialDir

FORMAT = 1
KEEP = 2  # checkpoints kept per trial: the newest one and its predecessor


class CheckpointError(Exception):
    """A checkpoint that cannot be trusted (tampered, truncated, or of another format)."""


def save(trial_dir: Path, experience: int, state: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "experience": experience, **state}, buf)
    folder = TrialDir(trial_dir)
    path = folder.checkpoint(experience)
    atomic_write(path, buf.getvalue())
    for old in folder.checkpoint_files()[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def latest(trial_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint of a trial, or None when it has none.

    An unreadable newest one (a bad disk block, a tampered file) falls back to its predecessor, with
    a warning naming the file and why: the trial redoes one experience instead of failing on every
    retry. CheckpointError when none is readable."""
    paths = TrialDir(trial_dir).checkpoint_files()
    for i, path in enumerate(reversed(paths)):
        try:
            return load(path)
        except CheckpointError as exc:
            if i == len(paths) - 1:
                raise
            print(f"clgrid: warning: {exc}; resuming from the checkpoint before it", file=sys.stderr, flush=True)
    return None


def load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling error names only a class; say which file and why
        raise CheckpointError(f"{path}: not a clgrid checkpoint or tampered ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format') if isinstance(state, dict) else '?'}, "
                              f"expected {FORMAT}")
    return state

