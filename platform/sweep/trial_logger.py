"""One trial's MLflow logging, which never stops the trial.

Each upload retries with backoff for the trial's budget (``tracking.with_retries``). When one still
fails, the logger goes offline for the rest of this attempt: the trial keeps training, and what it
would have uploaded is written to its outbox (``clgrid.sweep.outbox``) for ``clgrid sync``. Waiting the
budget out once per attempt is enough: a server away that long is not back at the next experience.

A run is ended FINISHED only when nothing of the trial is missing from it; otherwise ``clgrid
sync`` ends it once it has uploaded the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from clgrid import tracking
from clgrid.sweep.outbox import Outbox, describe


class TrialLogger:
    def __init__(self, uri: str, run_id: str, trial_dir: Path, seconds: float):
        self.uri, self.run_id, self.seconds = uri, run_id, seconds
        self.artifacts = trial_dir / "artifacts"
        self.outbox = Outbox.open(trial_dir, run_id)
        self.online = True
        self.logged: set[int] = set()  # experiences the run already has

    def _upload(self, fn: Callable[[], Any]) -> bool:
        """Whether ``fn`` (an upload with retries) went through; a failure takes the logger offline."""
        if not self.online:
            return False
        try:
            fn()
            return True
        except Exception as exc:
            self.online = False
            self.outbox.error = describe(exc)
            return False

    def _update(self, **fields: Any) -> None:
        """Sets outbox fields; the file is rewritten only when they change (never while all goes well)."""
        if any(getattr(self.outbox, k) != v for k, v in fields.items()):
            for k, v in fields.items():
                setattr(self.outbox, k, v)
            self.outbox.save()

    def start(self) -> None:
        """Marks the run RUNNING and learns which experiences it has (a resumed trial re-reports them)."""
        if self._upload(lambda: tracking.with_retries(
                lambda: tracking.client(self.uri).update_run(self.run_id, "RUNNING"), self.seconds)):
            self._upload(lambda: self.logged.update(tracking.logged_steps(self.uri, self.run_id, self.seconds)))

    def experience(self, experience: int, row: list[float], metrics: dict[str, float], costs: dict[str, float]) -> None:
        uploaded = experience in self.logged or self._upload(lambda: tracking.log_experience(
            self.uri, self.run_id, experience, row, metrics, costs, self.seconds))
        self._update(steps=self.outbox.steps - {experience} if uploaded else self.outbox.steps | {experience})

    def matrix(self, R: list[list[float]], b: list[float]) -> None:
        tracking.write_matrix(self.artifacts, R, b)  # on disk first: the upload may fail, the file stays
        self._update(matrix=not self._upload(lambda: tracking.upload_matrix(self.uri, self.run_id, self.artifacts,
                                                                             self.seconds)))

    def end(self, status: str) -> None:
        """Ends the run; FINISHED waits in the outbox while anything else does."""
        if status == "FINISHED" and (self.outbox.steps or self.outbox.matrix):
            self._update(status=status)
        else:
            self._update(status=None if self._upload(
                lambda: tracking.end_run(self.uri, self.run_id, status, self.seconds)) else status)

    def finished_earlier(self) -> None:
        """A trial whose result.json exists: its run is FINISHED, unless it was killed between
        result.json and end_run, or its outbox still holds something (then sync ends it)."""
        status: list[str] = []
        if self.outbox.empty and self._upload(lambda: status.append(
                tracking.run_status(self.uri, self.run_id, self.seconds))) and status == ["FINISHED"]:
            return
        self.end("FINISHED")
