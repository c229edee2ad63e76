"""Every path under a storage root: the one module that names the files of a sweep.

    <root>/mlflow.db                     the embedded MLflow store (without a tracking server)
    <root>/mlartifacts/                  its artifacts
    <root>/reports/<experiment>/         reports
    <root>/sweeps/<sweep_id>/            one sweep (SweepDir)
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_ROOT = "clgrid-runs"  # the storage root when neither the spec nor --storage names one


def sqlite_uri(root: str | Path) -> str:
    """The embedded MLflow store of a storage root: a SQLite file beside the sweeps."""
    return f"sqlite:///{Path(root).resolve()}/mlflow.db"
