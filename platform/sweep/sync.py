"""``clgrid sync``: uploads what a sweep's tracking server missed, from the sweep's folders.

For every folder with an outbox (``clgrid.sweep.outbox``), into the run created for it before the sweep
started: the metrics of the missing experiences (from the folder's ``history.json``), only the
(metric, step) points the run does not have, so a point the server stored before its answer was
lost is not logged twice; then the accuracy matrix files (an upload overwrites, never duplicates);
then the run's status, last, so FINISHED means complete. The outbox is updated after each item:
an interrupted sync continues where it stopped, and a second one finds nothing to do.

``clgrid sync`` holds the sweep's lease (``clgrid.sweep.lease``): no driver, and no trial of a dead
one, writes the folders while it works, and it refuses (exit 2) while a command holds the sweep. It
changes each outbox item by item (``Outbox.update``), never writing back what it read, and reads the
outbox again after each item: an item a writer adds meanwhile is uploaded too, or stays listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from clgrid import tracking
from clgrid.tracking import runs
from clgrid.errors import UsageError
from clgrid.sweep.layout import SweepDir, SweepMeta, TrialDir
from clgrid.sweep.outbox import Outbox, describe
from clgrid.sweep.trial_logger import read_history


@dataclass
class Synced:
    folders: int = 0  # folders that had an outbox
    points: int = 0  # metric values uploaded
    artifacts: int = 0
    statuses: int = 0


def sync_sweep(sweep_dir: Path, uri: str) -> Synced:
    folder = SweepDir(sweep_dir)
    meta = folder.meta()
    _check_sweep(uri, meta)
    folders = [(folder.trial(key), run_id) for key, run_id in folder.trial_runs().items()] + [(folder, meta.parent_run_id)]
    done = Synced()
    for where, run_id in folders:  # the sweep's own status last
        if Outbox.open(where, run_id).empty:
            continue
        done.folders += 1
        try:
            _upload(uri, where, run_id, done)
        except UsageError:
            raise
        except Exception as exc:  # MLflow's, or the artifact upload's HTTP errors
            raise UsageError(f"tracking server {uri} failed during sync ({describe(exc)}); what was uploaded is "
                             f"kept, run clgrid sync again for the rest") from None
    return done


def _check_sweep(uri: str, meta: SweepMeta) -> None:
    """The sweep's runs are at ``uri``."""
    try:
        tracking.with_retries(lambda: tracking.client(uri).get_run(meta.parent_run_id))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UsageError(f"{uri} has no run {meta.parent_run_id} (sweep {meta.sweep_id}); expected the "
                         f"tracking server the sweep ran with ({meta.tracking_uri})") from None


def _upload(uri: str, folder: SweepDir | TrialDir, run_id: str, done: Synced) -> None:
    """Uploads what the outbox lists, one kind of item at a time, reading it again after each."""
    while not (box := Outbox.open(folder, run_id)).empty:
        if box.steps:
            history = _history(box)
            values = {step: tracking.experience_metrics(**history[step]) for step in sorted(box.steps)}
            have = tracking.metric_steps(uri, run_id, {k for v in values.values() for k in v})
            for step, metrics in values.items():
                missing = {k: v for k, v in metrics.items() if step not in have[k]}
                if missing:
                    tracking.log_metrics(uri, run_id, step, missing)
                done.points += len(missing)
                Outbox.update(folder, run_id, lambda b, step=step: b.steps.discard(step))
        elif box.matrix:  # the artifacts folder's files: the matrix and, with probes, theirs
            names = runs.artifact_files(folder.artifacts)
            runs.upload_files(uri, run_id, folder.artifacts, names)
            if tracking.schema.CONTINUAL_JSON in names:  # its metrics too, those the run misses
                runs.log_continual(uri, run_id, folder.artifacts)
            done.artifacts += len(names)
            Outbox.update(folder, run_id, lambda b, seen=box.matrix: setattr(b, "matrix", b.matrix if b.matrix != seen else 0))
        else:
            tracking.end_run(uri, run_id, box.status)
            done.statuses += 1
            Outbox.update(folder, run_id, lambda b, seen=box.status: setattr(b, "status", b.status if b.status != seen else None))


def _history(box: Outbox) -> dict[int, dict]:
    """The per-experience reports the trial wrote before logging them, by experience."""
    history = read_history(box.folder)
    if not box.steps <= history.keys():
        raise UsageError(f"{box.folder.unsynced} lists experiences {sorted(box.steps - history.keys())} that "
                         f"{box.folder.history} does not hold")
    return history
