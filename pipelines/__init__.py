"""The bundled pipeline specs: ``clgrid run quickstart`` finds ``quickstart.yaml`` here."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from clgrid.errors import SpecError


def bundled() -> list[str]:
    """The names of the bundled pipelines."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def find(spec: str | Path) -> Path | None:
    """A path to a YAML file, or the bundled pipeline of that name; None when it is neither."""
    path = Path(spec)
    if path.is_file():
        return path
    named = resources.files(__name__) / f"{spec}.yaml"
    return Path(str(named)) if named.is_file() else None


def resolve(spec: str | Path) -> Path:
    """``find``, or a SpecError naming the bundled pipelines."""
    path = find(spec)
    if path is None:
        raise SpecError([f"{spec}: no such file, and not a bundled pipeline (bundled: {', '.join(bundled())})"])
    return path
