"""Every path under a storage root: the one module that names the files of a sweep.

    <root>/mlflow.db                      the embedded MLflow store (without a tracking server)
    <root>/mlartifacts/                   its artifacts
    <root>/reports/<experiment>/          reports
    <root>/sweeps/<sweep_id>/             one sweep (SweepDir)
        sweep.json                        the spec, the trials and their MLflow run ids (SweepMeta),
                                          written before any trial starts
        unsynced.json                     the sweep run's status while its tracking server lacks it
        unsynced.lock                     the lock under which outboxes are merged (clgrid.sweep.outbox)
        lease/NNNNNN.json                 who writes the sweep: one file per command (clgrid.sweep.lease)
        ray/                              Ray Tune's experiment state
        tune.json                         with `tune:`: the tuning phase's points, their states, the
                                          final trials once chosen (clgrid.sweep.tune_phase)
        <trial_key>/                      one trial (TrialDir)
            checkpoints/exp-NNN.pt        the trial's state after experience NNN (clgrid.train.checkpoint)
            replay/                       its replay store (Arrow shards)
            history.json                  every experience's report, written before it is logged
            artifacts/accuracy_matrix.*   the matrix files logged to MLflow
            result.json                   final metrics, R and b, once finished
            attempts.log                  one line per trainer start
            unsynced.json                 what the tracking server lacks (clgrid.sweep.outbox)
            unsynced.lock                 its lock
            writer.json                   the running attempt: host, pid, renewal (clgrid.sweep.lease)

Reading a sweep needs neither Ray nor torch: ``clgrid sync`` and ``resume`` find and read sweeps
with this module alone; the trials' specs are validated only when asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError, field_validator

from clgrid import fsio, safepaths
from clgrid.errors import UsageError

if TYPE_CHECKING:  # the spec imports the strategy registry (torch)
    from clgrid.spec import PipelineSpec, TrialSpec

DEFAULT_ROOT = "clgrid-runs"  # the storage root when neither the spec nor --storage names one
SWEEP_JSON, UNSYNCED = "sweep.json", "unsynced.json"
_CHECKPOINT = re.compile(r"^exp-(\d{3,})\.pt$")


def sqlite_uri(root: str | Path) -> str:
    """The embedded MLflow store of a storage root: a SQLite file beside the sweeps."""
    return f"sqlite:///{Path(root).resolve()}/mlflow.db"


def reports_dir(root: str | Path, experiment: str) -> Path:
    """Where ``clgrid report`` writes an experiment's report (an experiment name may be ``../x``)."""
    return safepaths.inside(root, "reports", experiment)


def check_storage(root: str) -> None:
    """Checkpoints and results are written with POSIX file operations: a path, not an object store."""
    if "://" in root:
        raise UsageError(f"storage root {root}: expected a filesystem path (on a cluster, one every node "
                         f"mounts at the same place), not a URI")


class SweepTrial(BaseModel):
    """One trial of sweep.json. The trial stays JSON: validating it imports the strategy registry."""

    trial: dict[str, Any]
    run_id: str
    trial_key: str

    def trial_spec(self) -> TrialSpec:
        from clgrid.spec import TrialSpec

        return TrialSpec.model_validate(self.trial)


class SweepMeta(BaseModel):
    """sweep.json: what the driver decided before any trial started."""

    sweep_id: str
    spec: dict[str, Any]  # the PipelineSpec as JSON
    spec_hash: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[SweepTrial]

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        """sweep.json never holds a password: a URI's ``user:password@`` moves to the environment."""
        if "@" not in uri:  # no user info: reading sweep.json stays free of MLflow's import (lease refusals are fast)
            return uri
        from clgrid.tracking.schema import split_credentials

        return split_credentials(uri)


def _entry(name: str) -> property:
    """A file or folder of a sweep's folder: ``folder.<attribute>`` is ``folder.path / name``."""
    return property(lambda self: self.path / name)


@dataclass(frozen=True)
class _Folder:
    path: Path
    unsynced = _entry(UNSYNCED)
    unsynced_lock = _entry("unsynced.lock")


@dataclass(frozen=True)
class TrialDir(_Folder):
    """One trial's folder, ``<sweep>/<trial_key>/``."""

    checkpoints = _entry("checkpoints")
    replay = _entry("replay")
    history = _entry("history.json")
    artifacts = _entry("artifacts")
    result = _entry("result.json")
    attempts = _entry("attempts.log")
    run = _entry("run.json")  # a tuning trial's MLflow run id: the trial creates its run (clgrid.sweep.tune_phase)
    writer = _entry("writer.json")

    def checkpoint(self, experience: int) -> Path:
        return self.checkpoints / f"exp-{experience:03d}.pt"

    def checkpoint_files(self) -> list[Path]:
        """The trial's checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        files = [p for p in self.checkpoints.iterdir() if _CHECKPOINT.match(p.name)]
        return sorted(files, key=lambda p: int(_CHECKPOINT.match(p.name)[1]))


@dataclass(frozen=True)
class SweepDir(_Folder):
    """One sweep's folder, ``<root>/sweeps/<sweep_id>/``."""

    meta_file = _entry(SWEEP_JSON)
    ray = _entry("ray")
    tune = _entry("tune.json")
    lease = _entry("lease")

    @classmethod
    def at(cls, root: Path, sweep_id: str) -> SweepDir:
        """The folder of sweep ``sweep_id`` under storage root ``root``."""
        return cls(_sweeps(root) / sweep_id)

    @classmethod
    def of(cls, path: Path) -> SweepDir:
        """The sweep in folder ``path``, which the user named."""
        if not (path / SWEEP_JSON).is_file():
            raise UsageError(f"{path}: not a sweep folder (expected {path / SWEEP_JSON})")
        return cls(path.resolve())

    @classmethod
    def newest(cls, spec: PipelineSpec) -> SweepDir:
        """The newest sweep of ``spec`` (same spec_hash) under its storage root."""
        check_storage(spec.storage.root)
        folder = _sweeps(Path(spec.storage.root).resolve())
        found = sorted(p.parent for p in folder.glob(f"*/{SWEEP_JSON}")
                       if cls(p.parent).meta().spec_hash == spec.spec_hash)
        if not found:
            raise UsageError(f"no sweep of {spec.name} (spec_hash {spec.spec_hash}) under {folder}: expected a "
                             f"folder with a sweep.json written by `clgrid run` with the same spec and --storage")
        return cls(found[-1])  # sweep ids start with their creation time

    def trial(self, trial_key: str) -> TrialDir:
        return TrialDir(self.path / trial_key)

    def meta(self) -> SweepMeta:
        try:
            return SweepMeta.model_validate_json(self.meta_file.read_bytes())
        except ValidationError as exc:
            problem = exc.errors()[0]
            field = ".".join(map(str, problem["loc"]))
            raise UsageError(f"{self.meta_file}: {field + ': ' if field else ''}{problem['msg']}; expected a "
                             f"sweep.json written by `clgrid run`") from None

    def write_meta(self, meta: SweepMeta) -> None:
        """Creates sweep.json, never replaces one: a sweep folder belongs to the sweep that wrote it."""
        try:
            fsio.create_json(self.meta_file, meta.model_dump(mode="json"))
        except FileExistsError:
            raise UsageError(f"{self.meta_file}: already exists; expected a new sweep folder (one sweep "
                             "per folder)") from None

    def trial_runs(self) -> dict[str, str]:
        """Trial key -> MLflow run id of every trial of the sweep: sweep.json's and, in a sweep with
        ``tune:``, the tuning trials' (each folder's run.json, written by its first attempt) and the
        final ones (tune.json, once chosen)."""
        runs = {t.trial_key: t.run_id for t in self.meta().trials}
        for path in sorted(self.path.glob("*/run.json")):
            runs.setdefault(path.parent.name, fsio.read_json(path)["run_id"])
        if self.tune.exists():
            for final in fsio.read_json(self.tune).get("final") or []:
                runs.setdefault(final["trial"]["trial_key"], final["trial"]["run_id"])
        return runs

    def finished(self) -> list[str]:
        """The trial keys of the sweep that have their result.json."""
        return [key for key in self.trial_runs() if self.trial(key).result.exists()]


def _sweeps(root: Path) -> Path:
    return root / "sweeps"
