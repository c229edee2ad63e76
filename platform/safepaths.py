"""Names that become path components: the one place clgrid turns a user's name into a folder name.

Experiment names (MLflow allows almost anything: ``a/b``, ``..``, spaces, unicode) and any other
name taken from a spec or the command line go through ``component`` before they are joined to a
folder, and ``inside`` checks the joined path stays under the folder the user named. Generated
names (sweep ids, trial keys) are already safe; they pass through unchanged.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from clgrid.errors import UsageError

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class UnsafePathError(UsageError, ValueError):
    """A path built from a name would leave the folder it belongs in (the CLI exits 2)."""


def component(name: str) -> str:
    """``name`` as one safe path component: itself when it is plain ASCII (letters, digits, ``_.-``,
    not starting with a dot, at most 100 characters), otherwise a readable stand-in plus a hash of
    the original, so two different names never share a folder and none of them is ``..``."""
    if _SAFE.fullmatch(name):
        return name
    stem = _UNSAFE_CHARS.sub("_", name).strip("._-")[:60] or "name"
    return f"{stem}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def inside(root: str | Path, *names: str) -> Path:
    """``root / component(name) / ...``, resolved, and refused if it is not under ``root``
    (a symlink inside ``root`` pointing out of it is the only way left to get there)."""
    base = Path(root).resolve()
    path = base.joinpath(*(component(n) for n in names)).resolve()
    if not path.is_relative_to(base):
        raise UnsafePathError(f"{path} is outside {base} (built from the names {list(names)!r})")
    return path


def check_writable(root: str | Path) -> None:
    """Refuses (one line, exit 2) a local storage root clgrid cannot create files in: read-only,
    full, or not a folder. Checked before anything starts; a URI (``s3://...``) is left to its
    filesystem."""
    if "://" in str(root):
        return
    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".clgrid-write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"storage root {path} is not writable ({exc.strerror or exc}); expected a folder "
                         f"clgrid can create files in (or --storage DIR)") from None
