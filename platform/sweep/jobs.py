"""Sweeps as Ray Jobs: submit through a cluster's job API, then follow status and logs.

The job's entrypoint is ``clgrid run SPEC --storage ... --tracking-uri ...`` on the head node;
Ray sets ``RAY_ADDRESS`` for it, so the sweep attaches to the cluster. clgrid must be installed on
every node (the image in ``infra/docker``): the job ships only the spec file as its working_dir,
never the source tree, whose ``platform/`` folder would shadow the stdlib module in the job.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from clgrid.errors import UsageError
from clgrid.sweep.layout import check_storage

if TYPE_CHECKING:  # the spec imports the strategy registry (torch): `clgrid status` and `logs` need neither
    from clgrid.spec import PipelineSpec

FAILED = ("FAILED", "STOPPED")


def client(address: str):
    """A job client for the dashboard at ``address``; one clear line if it cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    if "://" in address and not address.startswith(("http://", "https://")):
        raise UsageError(f"--address {address}: expected the Ray dashboard's job API, e.g. http://HEAD:8265")
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or a RuntimeError from a refused version check
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot reach the Ray job API at {address} ({reason}): expected a running "
                         f"cluster's dashboard, e.g. http://HEAD:8265 (tunnelled)") from None


def check_cluster_tracking(uri: str, sqlite_on_local_disk: bool) -> None:
    """A cluster's trials all write the tracking store; SQLite on a network filesystem corrupts its
    database (SQLite's own guidance), so a cluster sweep logs to an MLflow server unless the user says
    the file is on local disk of a single-node cluster."""
    if uri.startswith("sqlite:") and not sqlite_on_local_disk:
        raise UsageError(f"tracking URI {uri}: SQLite written by several cluster nodes over a shared filesystem "
                         "corrupts; expected an MLflow server (infra/mlflow, then --tracking-uri http://MLFLOW:5000), "
                         "or --sqlite-on-local-disk when the file is on local disk of a single-node cluster")


def submit(address: str, spec_file: Path, spec: PipelineSpec, *, max_concurrent: int | None = None,
           sqlite_on_local_disk: bool = False) -> str:
    """Submits ``clgrid run`` of the (already validated) spec; returns the job's submission id.
    The job gets the environment a local driver gives its trials (``driver.trial_env``)."""
    from clgrid.sweep.driver import trial_env
    from clgrid.tracking.schema import PASSWORD_ENV, USERNAME_ENV, split_credentials

    check_storage(spec.storage.root)
    root, uri = spec.storage.root, split_credentials(spec.tracking_uri)  # the entrypoint is shown by the job API
    if not Path(root).is_absolute():
        raise UsageError(f"storage root {root}: expected an absolute path that every cluster node mounts "
                         f"(pass --storage /shared/path): a relative one would land in the job's temporary folder")
    check_cluster_tracking(uri, sqlite_on_local_disk)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise UsageError(f"tracking URI {uri}: expected an absolute SQLite path or an MLflow server (--tracking-uri)")
    jobs = client(address)
    job_id = f"clgrid-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    command = ["clgrid", "run", spec_file.name, "--storage", root, "--tracking-uri", uri]
    if max_concurrent:
        command += ["--max-concurrent", str(max_concurrent)]
    with tempfile.TemporaryDirectory(prefix="clgrid-job-") as folder:  # the job's working_dir: the spec only
        shutil.copyfile(spec_file, Path(folder) / spec_file.name)
        jobs.submit_job(
            entrypoint=shlex.join(command), submission_id=job_id,
            runtime_env={"working_dir": folder, "env_vars": {**trial_env(), "CLGRID_RAY_JOB": job_id}},
            metadata={"clgrid.pipeline": spec.name, "clgrid.spec_hash": spec.spec_hash},
        )
    if PASSWORD_ENV in os.environ and uri.startswith(("http://", "https://")):
        print(f"clgrid submit: MLflow credentials stay here (Ray shows a job's environment to anyone with its "
              f"API): the cluster's nodes need {USERNAME_ENV} and {PASSWORD_ENV} in their own environment "
              "(infra/README.md)", file=sys.stderr)
    return job_id


def status(address: str, job_id: str) -> tuple[str, str]:
    """(status, message) of a job, e.g. ("RUNNING", "Job is currently running.")."""
    info = _info(client(address), job_id)
    return str(info.status.value), info.message or ""


def logs(address: str, job_id: str, follow: bool = False) -> str:
    """Prints the job's logs (following them until it ends with ``follow``); returns its status."""
    jobs = client(address)
    _info(jobs, job_id)
    if follow:
        asyncio.run(_tail(jobs, job_id))
    else:
        print(jobs.get_job_logs(job_id), end="", flush=True)
    return str(_info(jobs, job_id).status.value)


async def _tail(jobs, job_id: str) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as exc:  # the SDK's wording for an HTTP error, e.g. 404 for an unknown job
        raise UsageError(f"job {job_id}: {str(exc).strip().splitlines()[-1]}") from None
