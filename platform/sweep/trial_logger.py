"""One trial's MLflow logging, which never stops the trial.

What it logs is on disk first: each experience's report in ``history.json``, the matrix (and probe)
files in ``artifacts/``; so whatever an upload misses, ``clgrid sync`` finds in the folder.

Each upload retries with backoff for the trial's budget (``tracking.with_retries``). When one still
fails, the logger goes offline for the rest of this attempt: the trial keeps training, and what it
would have uploaded is written to its outbox (``clgrid.sweep.outbox``) for ``clgrid sync``. Waiting the
budget out once per attempt is enough: a server away that long is not back at the next experience.

A run is ended FINISHED only when nothing of the trial is missing from it; otherwise ``clgrid
sync`` ends it once it has uploaded the rest. The logger changes its outbox item by item
(``Outbox.update``), never writing back what it read, so a sync running beside it loses nothing.

An experience's metrics go up when it ends, unless the last upload was under ``UPLOAD_SECONDS``
ago: then they wait for the next upload (one call for all that wait), at the latest the trial's
end (``flush``). A trial of many short experiences makes one MLflow call, not one per experience;
one of long experiences logs each as it ends. What waits is in ``history.json`` already: an
attempt that dies with experiences waiting uploads them when the trial resumes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from clgrid import fsio, tracking
from clgrid.tracking import runs
from clgrid.sweep.layout import TrialDir
from clgrid.sweep.outbox import Outbox, describe

if TYPE_CHECKING:
    from mlflow.entities import Dataset

UPLOAD_SECONDS = 1.0


class TrialLogger:
    def __init__(self, uri: str, run_id: str, folder: TrialDir, seconds: float):
        self.uri, self.run_id, self.folder, self.seconds = uri, run_id, folder, seconds
        self.outbox = Outbox.open(folder, run_id)  # as the file held it when last read or changed here
        self.online = True
        self.error = ""  # why the logger went offline
        self.logged: set[int] = set()  # experiences the run already has
        self.waiting: list[int] = []  # experiences in history.json not uploaded yet (nor listed as missing)
        self.uploaded = time.monotonic()  # when experiences were last uploaded
        # Kept from earlier attempts: an experience their outboxes list stays in the file.
        self.history = read_history(folder)

    def _upload(self, fn: Callable[[], Any]) -> bool:
        """Whether ``fn`` (an upload with retries) went through; a failure takes the logger offline."""
        if not self.online:
            return False
        try:
            fn()
            return True
        except Exception as exc:
            self.online = False
            self.error = describe(exc)
            return False

    def _change(self, change: Callable[[Outbox], None]) -> None:
        def recorded(box: Outbox) -> None:
            change(box)
            box.error = self.error or box.error

        self.outbox = Outbox.update(self.folder, self.run_id, recorded)

    def _steps(self, experiences: list[int], missing: bool) -> None:
        """Lists or unlists experiences' metrics; the file is touched only when that changes (never
        while all goes well): only this logger lists steps, so its view holds them all."""
        if any(missing != (e in self.outbox.steps) for e in experiences):
            self._change(lambda box: box.steps.update(experiences) if missing else box.steps.difference_update(experiences))

    def _update(self, *, matrix: bool) -> None:
        """``matrix=True``: artifact files were written and not uploaded (counted: a sync that
        uploaded older ones keeps them listed); ``False``: this logger uploaded the newest."""
        if matrix or self.outbox.matrix:
            self._change(lambda box: setattr(box, "matrix", box.matrix + 1 if matrix else 0))

    def _status(self, status: str | None) -> None:
        """The status the run should end with once the rest is uploaded; None: nothing to end."""
        if status != self.outbox.status:
            self._change(lambda box: setattr(box, "status", status))

    def start(self, first: bool) -> None:
        """A later attempt marks the run RUNNING again and learns which experiences it has (a
        resumed trial re-reports them); a ``first`` one finds the run as the driver created it:
        RUNNING, nothing logged."""
        if not first and self._upload(lambda: tracking.with_retries(
                lambda: tracking.client(self.uri).update_run(self.run_id, "RUNNING"), self.seconds)):
            self._upload(lambda: self.logged.update(tracking.logged_steps(self.uri, self.run_id, self.seconds)))

    def dataset(self, dataset: Dataset, first: bool) -> None:
        """The run's training input (a ``first`` attempt's run has none yet). Missed, it costs the
        run its Dataset column only (clgrid sync does not upload it), and takes the logger offline
        like any upload: a server away is waited for once."""
        self._upload(lambda: tracking.log_dataset(self.uri, self.run_id, dataset, self.seconds, known_new=first))

    def experience(self, experience: int, row: list[float], metrics: dict[str, float], costs: dict[str, float],
                   val_row: list[float] = ()) -> None:
        # val_row (the validation split's accuracies) only when there is one: history.json stays as it was
        report = {"experience": experience, "row": row, "metrics": metrics, "costs": costs} \
            | ({"val_row": list(val_row)} if val_row else {})
        if self.history.get(experience) != report:  # a resumed trial re-reports what the file holds
            self.history[experience] = report
            fsio.write_json(self.folder.history, [self.history[k] for k in sorted(self.history)])
        if experience in self.logged:
            self._steps([experience], missing=False)
            return
        self.waiting.append(experience)
        if not self.online or time.monotonic() - self.uploaded >= UPLOAD_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Uploads the experiences waiting, in one call; offline, lists them in the outbox."""
        if not self.waiting:
            return
        waiting, self.waiting = self.waiting, []
        uploaded = self._upload(lambda: tracking.log_experiences(
            self.uri, self.run_id, [self.history[e] for e in waiting], self.seconds))
        self._steps(waiting, missing=not uploaded)
        self.uploaded = time.monotonic()

    def matrix(self, R: list[list[float]], b: list[float], R_val: list[list[float]] = (), b_val: list[float] = ()) -> None:
        folder = self.folder.artifacts
        tracking.write_matrix(folder, R, b, R_val, b_val)  # on disk first: the upload may fail, the file stays
        uploaded = self._upload(lambda: tracking.upload_matrix(self.uri, self.run_id, folder, self.seconds))
        self._update(matrix=not uploaded)

    def probes(self, artifacts: dict[str, Any]) -> None:
        """The probes' JSON artifacts, on disk first. A failed upload holds the run open like the
        matrix's does; the files stay in ``artifacts/``."""
        if not artifacts:
            return
        folder = self.folder.artifacts
        names = runs.write_probes(folder, artifacts)
        uploaded = self._upload(lambda: runs.upload_files(self.uri, self.run_id, folder, names, self.seconds))
        if not uploaded:
            self._update(matrix=True)

    def continual(self, trace: dict[str, Any] | None) -> None:
        """The continual-evaluation trace: ``continual.json`` on disk first, then its metrics and the
        file. A failed upload holds the run open like the matrix's does (sync uploads the file)."""
        if trace is None:
            return
        folder = self.folder.artifacts
        fsio.write_json(folder / tracking.schema.CONTINUAL_JSON, trace)
        if not self._upload(lambda: runs.log_continual(self.uri, self.run_id, folder, self.seconds)):
            self._update(matrix=True)

    def end(self, status: str) -> None:
        """Ends the run (after the experiences waiting); FINISHED waits in the outbox while anything
        else does."""
        self.flush()
        self.outbox = Outbox.open(self.folder, self.run_id)  # a sync may have uploaded some since
        if status == "FINISHED" and (self.outbox.steps or self.outbox.matrix):
            self._status(status)
        else:
            self._status(None if self._upload(
                lambda: tracking.end_run(self.uri, self.run_id, status, self.seconds)) else status)

    def finished_earlier(self) -> None:
        """A trial whose result.json exists: its run is FINISHED, unless it was killed between
        result.json and end_run, or its outbox still holds something (then sync ends it)."""
        status: list[str] = []
        if Outbox.open(self.folder, self.run_id).empty and self._upload(lambda: status.append(
                tracking.run_status(self.uri, self.run_id, self.seconds))) and status == ["FINISHED"]:
            return
        self.end("FINISHED")


def read_history(folder: TrialDir) -> dict[int, dict[str, Any]]:
    """The reports in ``history.json`` (ExperienceReport fields) by experience; none before the first."""
    return {h["experience"]: h for h in fsio.read_json(folder.history)} if folder.history.exists() else {}
