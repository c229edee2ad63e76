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

Several processes may change one outbox (a trial's logger adds, ``clgrid sync`` removes what it
uploaded, a driver records ends), so nobody writes back what it read: ``Outbox.update`` re-reads
the file and applies one change under a lock (``unsynced.lock``, flock: across processes, also on
NFS, which maps it to a POSIX lock; and a thread lock within one). An item one writer adds while
another uploads stays listed. ``matrix`` counts the times the artifact files were written without
being uploaded: sync clears it only if nobody wrote them again since it read the count.
"""

from __future__ import annotations

import fcntl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from clgrid import fsio
from clgrid.sweep.layout import SweepDir, TrialDir

_THREADS = threading.Lock()  # flock on NFS excludes processes only; this excludes threads


@dataclass
class Outbox:
    folder: SweepDir | TrialDir
    run_id: str
    steps: set[int] = field(default_factory=set)
    matrix: int = 0  # artifact writes not uploaded (0: none missing)
    status: str | None = None
    error: str = ""  # the last failure, for whoever reads the file

    @classmethod
    def open(cls, folder: SweepDir | TrialDir, run_id: str) -> Outbox:
        """What the folder's outbox holds now; empty when nothing is missing."""
        if not folder.unsynced.exists():
            return cls(folder, run_id)
        data = fsio.read_json(folder.unsynced)
        return cls(folder, run_id, set(data["steps"]), int(data["matrix"]), data["status"], data["error"])

    @classmethod
    def update(cls, folder: SweepDir | TrialDir, run_id: str, change: Callable[[Outbox], None]) -> Outbox:
        """Applies ``change`` to the outbox as the file holds it now and writes the result atomically
        (removes the file once empty); returns it. A change that leaves an absent outbox empty
        writes nothing and takes no lock."""
        if not folder.unsynced.exists():
            fresh = cls(folder, run_id)
            change(fresh)
            if fresh.empty:
                return fresh
        folder.path.mkdir(parents=True, exist_ok=True)
        with _THREADS, open(folder.unsynced_lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            box = cls.open(folder, run_id)
            change(box)
            box._write()
            return box

    @property
    def empty(self) -> bool:
        return not (self.steps or self.matrix or self.status)

    def _write(self) -> None:
        if self.empty:
            self.folder.unsynced.unlink(missing_ok=True)
            return
        fsio.write_json(self.folder.unsynced, {"run_id": self.run_id, "steps": sorted(self.steps),
                                               "matrix": self.matrix, "status": self.status, "error": self.error})


def record_end(folder: SweepDir | TrialDir, run_id: str, status: str | None, error: str = "") -> None:
    """The status the run should end with once the server is back (None: nothing to end)."""
    def change(box: Outbox) -> None:
        box.status = status
        box.error = error or box.error

    Outbox.update(folder, run_id, change)


def describe(exc: BaseException) -> str:
    """One short line: MLflow's messages run to pages (a whole retry history)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def pending(folders: list[SweepDir | TrialDir]) -> list[Path]:
    """The folders whose outbox holds something."""
    return [f.path for f in folders if f.unsynced.exists()]
