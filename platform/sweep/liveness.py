"""Is a sweep's driver alive? Its lease, else heartbeats on its MLflow parent run; and reaping dead sweeps.

Where the sweep's folder is at hand, its lease decides (``clgrid.sweep.lease``): a sweep whose lease
``reap`` can take has no live driver, and reap holds it while it marks the runs, so no driver starts
meanwhile. A sweep whose folder is elsewhere (another storage root) is judged from MLflow alone. A
driver (``sweep.run``) tags its parent run with who it is (``clgrid.driver``: host, boot id, pid,
process start time, Ray job) and refreshes ``clgrid.heartbeat`` (unix seconds) every
``HEARTBEAT_SECONDS``. A sweep is **dead** when

- its parent run is terminal: its driver ended, so children still RUNNING will never be updated;
- or its driver ran on this machine (same host name and boot id) and that process is gone (no
  such pid, or the pid was reused: another start time);
- or its last sign of life (the heartbeat, else the parent run's start) is older than
  ``older_than`` seconds: this covers drivers elsewhere (a Ray job on the head node, a laptop).

Otherwise it is alive. ``reap`` marks the RUNNING runs (parent and children) of dead sweeps
KILLED and leaves live sweeps alone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from clgrid import tracking
from clgrid.errors import UsageError
from clgrid.sweep import lease
from clgrid.sweep.layout import SweepDir
from clgrid.tracking.schema import DRIVER, HEARTBEAT, ROLE, SWEEP, SWEEP_ID

HEARTBEAT_SECONDS = 30.0
DEFAULT_OLDER_THAN = 180.0  # six missed heartbeats


def driver_identity() -> dict:
    return {**lease.identity(), "ray_job": os.environ.get("CLGRID_RAY_JOB")}


class Heartbeat:
    """Context manager: tags the parent run with this driver and refreshes its heartbeat."""

    def __init__(self, uri: str, parent_run_id: str, interval: float = HEARTBEAT_SECONDS):
        self.uri, self.run_id, self.interval = uri, parent_run_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="clgrid-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        c = tracking.client(self.uri)
        tracking.with_retries(lambda: c.set_tag(self.run_id, DRIVER, json.dumps(driver_identity())))
        tracking.with_retries(lambda: c.set_tag(self.run_id, HEARTBEAT, f"{time.time():.0f}"))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        c = MlflowClient(self.uri)  # its own client: the driver's is busy in the main thread
        while not self._stop.wait(self.interval):
            try:
                c.set_tag(self.run_id, HEARTBEAT, f"{time.time():.0f}")
            except Exception:  # a tracking server briefly away: the next beat tries again
                pass


@dataclass
class Verdict:
    alive: bool
    reason: str


def judge(parent: Run, older_than: float = DEFAULT_OLDER_THAN, now: float | None = None) -> Verdict:
    """Whether the sweep of ``parent`` (its MLflow parent run) still has a live driver."""
    if parent.info.status != "RUNNING":
        return Verdict(False, f"sweep run is {parent.info.status}")
    tags = parent.data.tags
    driver = json.loads(tags.get(DRIVER, "{}"))
    if driver and driver.get("start") is not None and lease.on_this_machine(driver):
        if lease.start_ticks(driver["pid"]) != driver["start"]:
            return Verdict(False, f"driver pid {driver['pid']} on this machine is gone")
        return Verdict(True, f"driver pid {driver['pid']} on this machine is running")
    last = float(tags.get(HEARTBEAT, parent.info.start_time / 1000))
    age = (now or time.time()) - last
    where = f" on {driver['host']}" if driver else ""
    if age > older_than:
        return Verdict(False, f"driver{where} silent for {age:.0f}s (> {older_than:.0f}s)")
    return Verdict(True, f"driver{where} seen {age:.0f}s ago")


@dataclass
class Reaped:
    sweep_id: str
    reason: str
    run_ids: list[str]


def reap(uri: str, experiment: str, older_than: float = DEFAULT_OLDER_THAN,
         root: Path | None = None) -> tuple[list[Reaped], list[str]]:
    """Marks the RUNNING runs of dead sweeps KILLED. Returns (reaped sweeps, ids of live sweeps).
    A sweep with a folder under storage root ``root`` is judged by its lease, others by MLflow."""
    exp = tracking.with_retries(lambda: tracking.client(uri).get_experiment_by_name(experiment))
    if exp is None:
        raise UsageError(f"no MLflow experiment '{experiment}' at {uri}")
    running: dict[str, list[Run]] = {}
    for run in tracking.search(uri, exp.experiment_id, "attributes.status = 'RUNNING'"):
        if SWEEP_ID in run.data.tags:
            running.setdefault(run.data.tags[SWEEP_ID], []).append(run)
    reaped, alive, timeout = [], [], lease.timeout_seconds()
    for sweep_id, runs in sorted(running.items()):
        folder = SweepDir.at(root, sweep_id) if root is not None else None
        if folder is not None and folder.path.is_dir():
            try:
                with lease.SweepLease(folder, "clgrid reap", timeout) as held:
                    reaped.append(_kill(uri, sweep_id, runs, _reason(held)))
            except lease.LeaseHeld:  # a live command works on it
                alive.append(sweep_id)
            continue
        parent = (next((r for r in runs if r.data.tags.get(ROLE) == SWEEP), None)
                  or _parent(uri, exp.experiment_id, sweep_id))
        verdict = judge(parent, older_than) if parent else Verdict(False, "sweep run is missing")
        if verdict.alive:
            alive.append(sweep_id)
        else:
            reaped.append(_kill(uri, sweep_id, runs, verdict.reason))
    return reaped, alive


def reap_sweep(folder: SweepDir, held: lease.SweepLease) -> Reaped:
    """Marks the RUNNING runs of the sweep in ``folder``, whose lease the caller ``held`` took, KILLED."""
    meta = folder.meta()
    tracking.check_reachable(meta.tracking_uri)
    exp = tracking.with_retries(lambda: tracking.client(meta.tracking_uri).get_experiment_by_name(meta.experiment))
    runs = [] if exp is None else tracking.search(
        meta.tracking_uri, exp.experiment_id, f"attributes.status = 'RUNNING' and tags.`{SWEEP_ID}` = '{meta.sweep_id}'")
    return _kill(meta.tracking_uri, meta.sweep_id, runs, _reason(held))


def _reason(held: lease.SweepLease) -> str:
    """Why the sweep whose lease was just taken has no live driver."""
    if held.previous is None:
        return "its folder has no lease: no driver took it"
    holder, why = held.previous
    return f"driver {why}" if holder["command"] in ("clgrid run", "clgrid resume") else f"`{holder['command']}` {why}"


def _kill(uri: str, sweep_id: str, runs: list[Run], reason: str) -> Reaped:
    for run in runs:
        tracking.end_run(uri, run.info.run_id, "KILLED")
    return Reaped(sweep_id, reason, [r.info.run_id for r in runs])


def _parent(uri: str, exp_id: str, sweep_id: str) -> Run | None:
    found = tracking.search(uri, exp_id, f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{ROLE}` = '{SWEEP}'")
    return found[0] if found else None
