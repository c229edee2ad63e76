"""``clgrid sync``: uploads what a sweep's tracking server missed, from the sweep's folders.

For every folder with an outbox (``clgrid.sweep.outbox``), into the run created for it before the sweep
started: the metrics of the missing experiences (from the folder's ``history.json``), only the
(metric, step) points the run does not have, so a point the server stored before its answer was
lost is not logged twice; then the accuracy matrix files (an upload overwrites, never duplicates);
then the run's status, last, so FINISHED means complete. The outbox is rewritten after each item:
an interrupted sync continues where it stopped, and a second one finds nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from clgrid import tracking
from clgrid.tracking import runs
from clgrid.errors import UsageError
from clgrid.sweep import liveness
from clgrid.sweep.layout import SweepDir, SweepMeta
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
    ended = Outbox.open(folder, meta.parent_run_id)
    _check_sweep(uri, meta, driver_ended=ended.status is not None)
    boxes = [Outbox.open(folder.trial(t.trial_key), t.run_id) for t in meta.trials]
    done = Synced()
    for box in [b for b in boxes + [ended] if not b.empty]:  # the sweep's own status last
        done.folders += 1
        try:
            _upload(uri, box, done)
        except UsageError:
            raise
        except Exception as exc:  # MLflow's, or the artifact upload's HTTP errors
            raise UsageError(f"tracking server {uri} failed during sync ({describe(exc)}); what was uploaded is "
                             f"kept, run clgrid sync again for the rest") from None
    return done


def _check_sweep(uri: str, meta: SweepMeta, driver_ended: bool) -> None:
    """The sweep's runs are at ``uri``, and no driver is still writing to them."""
    try:
        parent = tracking.with_retries(lambda: tracking.client(uri).get_run(meta.parent_run_id))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UsageError(f"{uri} has no run {meta.parent_run_id} (sweep {meta.sweep_id}); expected the "
                         f"tracking server the sweep ran with ({meta.tracking_uri})") from None
    verdict = liveness.judge(parent)
    if verdict.alive and not driver_ended:  # a sweep-level outbox status is the driver's last act
        raise UsageError(f"sweep {meta.sweep_id} is still running ({verdict.reason}); sync it once it ended")


def _upload(uri: str, box: Outbox, done: Synced) -> None:
    if box.steps:
        history = _history(box)
        values = {step: tracking.experience_metrics(**history[step]) for step in sorted(box.steps)}
        have = tracking.metric_steps(uri, box.run_id, {k for v in values.values() for k in v})
        for step, metrics in values.items():
            missing = {k: v for k, v in metrics.items() if step not in have[k]}
            if missing:
                tracking.log_metrics(uri, box.run_id, step, missing)
            done.points += len(missing)
            box.steps.discard(step)
            box.save()
    if box.matrix:  # the artifacts folder's files: the matrix and, with probes, theirs
        names = runs.artifact_files(box.folder.artifacts)
        runs.upload_files(uri, box.run_id, box.folder.artifacts, names)
        done.artifacts += len(names)
        box.matrix = False
        box.save()
    if box.status:
        tracking.end_run(uri, box.run_id, box.status)
        done.statuses += 1
        box.status = None
        box.save()


def _history(box: Outbox) -> dict[int, dict]:
    """The per-experience reports the trial wrote before logging them, by experience."""
    history = read_history(box.folder)
    if not box.steps <= history.keys():
        raise UsageError(f"{box.folder.unsynced} lists experiences {sorted(box.steps - history.keys())} that "
                         f"{box.folder.history} does not hold")
    return history
