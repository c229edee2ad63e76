"""Files written so that a crash leaves either the old file or the new one, never a torn one.

Each write goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
the target; the folder is fsynced too, so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any


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
    fsync_dir(path.parent)


def create_json(path: Path, obj: Any) -> None:
    """Like ``write_json``, but never replaces a file: FileExistsError when ``path`` exists. The
    whole file is written aside, then linked into place (a link, unlike a rename, fails when the
    name exists, also on NFS)."""
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.new")
    write_json(aside, obj)
    try:
        os.link(aside, path)
    finally:
        aside.unlink()
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Makes a rename or link in ``folder`` survive a power cut."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
