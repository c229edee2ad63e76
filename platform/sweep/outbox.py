"""What a tracking server has not got yet: ``unsynced.json`` in a trial (or sweep) folder.

Everything a trial logs to MLflow is on disk in its folder (``clgrid.sweep.layout.TrialDir``)
before it is uploaded, so the folder is the durable record and MLflow holds copies:

- per-experience metrics: ``history.json`` (the accuracy row, summary metrics and costs of every
  experience so far; ``tracking.experience_metrics`` turns one into its MLflow metrics, step = the
  experience index);
- the final metrics, R and b: ``result.json``;
- the artifacts: ``artifacts/accuracy_matrix.{json,png}`` and, with probes, their JSON files
  (``matrix`` below stands for all of them);
- params and tags: the trial's config in the sweep's ``sweep.json`` (the driver logs them when it
  creates the run, before any trial starts).

An upload that still fails after its retries is written down here instead: the experiences whose
metrics are missing, whether the matrix is, and the status the run should end with. The file
exists only while something is missing; ``clgrid sync`` uploads the items and removes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clgrid import fsio
from clgrid.sweep.layout import SweepDir, TrialDir


@dataclass
class Outbox:
    folder: SweepDir | TrialDir
    run_id: str
    steps: set[int] = field(default_factory=set)
    matrix: bool = False
    status: str | None = None
    error: str = ""  # the last failure, for whoever reads the file

    @classmethod
    def open(cls, folder: SweepDir | TrialDir, run_id: str) -> Outbox:
        """The folder's outbox; empty when nothing is missing."""
        if not folder.unsynced.exists():
            return cls(folder, run_id)
        data = fsio.read_json(folder.unsynced)
        return cls(folder, run_id, set(data["steps"]), data["matrix"], data["status"], data["error"])

    @property
    def empty(self) -> bool:
        return not (self.steps or self.matrix or self.status)

    def save(self) -> None:
        """Written atomically; removed once empty."""
        if self.empty:
            self.folder.unsynced.unlink(missing_ok=True)
            return
        fsio.write_json(self.folder.unsynced, {"run_id": self.run_id, "steps": sorted(self.steps),
                                               "matrix": self.matrix, "status": self.status, "error": self.error})


def describe(exc: BaseException) -> str:
    """One short line: MLflow's messages run to pages (a whole retry history)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def pending(folders: list[SweepDir | TrialDir]) -> list[Path]:
    """The folders whose outbox holds something."""
    return [f.path for f in folders if f.unsynced.exists()]
