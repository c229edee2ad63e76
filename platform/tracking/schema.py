"""The MLflow schema clgrid writes and reads, and the one way it talks to a tracking server.

Tag, role and artifact names live here and nowhere else; every MLflow call goes through
``with_retries`` on a ``client(uri)``; ``search`` pages through runs with retries. Imports no torch
and no clgrid.spec, so ``clgrid report``, ``sync`` and ``reap`` start fast.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from clgrid.errors import UsageError

# MLflow 3's UI opens an experiment on its runs only when it is of the training kind (without the
# tag it may open the GenAI overview: traces, token usage).
EXPERIMENT_KIND, TRAINING = "mlflow.experimentKind", "custom_model_development"

# Run tags. A sweep has one parent run (ROLE = SWEEP) and one child run per trial (ROLE = TRIAL).
PARENT = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"  # a run's description in the UI
DATASET_CONTEXT, TRAIN_CONTEXT = "mlflow.data.context", "train"  # tag of a run's dataset input
ROLE, SWEEP, TRIAL = "clgrid.role", "sweep", "trial"
SWEEP_ID = "clgrid.sweep_id"
STRATEGY = "clgrid.strategy"
BENCHMARK = "clgrid.benchmark"
SCENARIO = "clgrid.scenario"
SEED = "clgrid.seed"
TRIAL_KEY = "clgrid.trial_key"
CONFIG_KEY = "clgrid.config_key"
SPEC_HASH = "clgrid.spec_hash"
DRIVER = "clgrid.driver"  # on the parent: who drives the sweep (clgrid.sweep.liveness)
HEARTBEAT = "clgrid.heartbeat"  # on the parent: unix seconds of the driver's last sign of life
# Tune-then-test (clgrid.sweep.tune_phase): every child run's phase; a final run names the tuning
# runs behind its configuration and carries the tuning cost of its strategy on its benchmark.
PHASE, TUNE, FINAL = "clgrid.phase", "tune", "final"
SELECTED_FROM = "clgrid.selected_from"  # comma-separated run ids
TUNE_ENTRY = "clgrid.tune_entry"  # the index of the spec's strategy entry a tuning or final run belongs to
TUNING_TRAIN_FLOPS, TUNING_DEVICE_SECONDS = "tuning_train_flops", "tuning_device_seconds"
CLASS_ORDER = "clgrid.class_order"  # the classes in the order the stream presented them

# Artifacts of a trial run, and the folder of the report's files on the parent run.
MATRIX_JSON, MATRIX_PNG = "accuracy_matrix.json", "accuracy_matrix.png"
MATRIX_FILES = (MATRIX_JSON, MATRIX_PNG)
# The validation split's accuracy matrix (issue 14), beside the test one when the benchmark has a split.
VAL_MATRIX_JSON, VAL_MATRIX_PNG = "val_accuracy_matrix.json", "val_accuracy_matrix.png"
VAL_MATRIX_FILES = (VAL_MATRIX_JSON, VAL_MATRIX_PNG)
CONTINUAL_JSON = "continual.json"  # continual evaluation (issue 15): {"steps", "acc", "boundaries"}
REPORT_DIR = "report"

T = TypeVar("T")
RETRY_ENV = "CLGRID_TRACKING_RETRY_SECONDS"
RETRY_SECONDS = 60.0
# Answers another try cannot change: fail at once instead of for the whole budget.
PERMANENT = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def retry_seconds() -> float:
    """How long one MLflow call keeps retrying: ``CLGRID_TRACKING_RETRY_SECONDS``, default 60."""
    value = os.environ.get(RETRY_ENV, "")
    try:
        seconds = float(value) if value else RETRY_SECONDS
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise UsageError(f"{RETRY_ENV}={value!r}: expected a number of seconds >= 0")
    return seconds


def with_retries(fn: Callable[[], T], seconds: float | None = None) -> T:
    """Calls ``fn``, retrying with jittered exponential backoff (0.2 s doubling, at most 10 s apart)
    for up to ``seconds`` (default ``retry_seconds()``): SQLite "database is locked" from concurrent
    trials, a tracking server that is briefly away. PERMANENT MLflow errors are raised at once."""
    deadline = time.monotonic() + (retry_seconds() if seconds is None else seconds)
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            pause = min(delay, 10.0) * (0.5 + random.random())
            if getattr(exc, "error_code", None) in PERMANENT or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            delay *= 2


@functools.lru_cache(maxsize=4)
def client(uri: str) -> MlflowClient:
    # MLflow's HTTP client retries a refused connection for about 4 minutes per call (7 retries,
    # backoff factor 2) and waits 120 s for an answer; under with_retries that multiplies into
    # half an hour. One budget, ours, unless the user set MLflow's.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run" line per ended run
    # "Creating initial MLflow database tables...", "Updating database tables": INFO about a SQLite
    # store clgrid manages; its warnings still show.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


# Where MLflow's HTTP client reads basic-auth credentials (and where trials find them).
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def split_credentials(uri: str) -> str:
    """``uri`` without its ``user:password@``, which moves to MLFLOW_TRACKING_USERNAME / _PASSWORD in
    this process's environment (MLflow reads them there; local trials inherit them; cluster nodes
    have their own). A tracking URI is printed, stored in sweep.json and sent as a Ray job's
    entrypoint: credentials inside it would land in all of these.

    A database URI (postgresql://user:pass@db) cannot take its password from those variables: it
    is refused, redacted, and the driver's own mechanism named instead."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri  # not a URL: MLflow will say what it expected
    http = parts.scheme in ("http", "https")
    if parts.password is None and (parts.username is None or not http):
        return uri  # a database user name alone is no secret (postgresql://mlflow@db/mlflow)
    host = parts.netloc.rpartition("@")[2]
    if not http:
        shown = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
        raise UsageError(f"tracking URI {shown}: a password in a database URI would be printed and stored in "
                         f"sweep.json; expected it from the database driver's environment (PostgreSQL: PGPASSWORD, "
                         f"MySQL: an option file) or an MLflow server (infra/mlflow)")
    os.environ[USERNAME_ENV] = urllib.parse.unquote(parts.username or "")
    if parts.password is not None:
        os.environ[PASSWORD_ENV] = urllib.parse.unquote(parts.password)
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Raises UsageError (one line) when an HTTP tracking server does not answer within ``timeout``.

    Asked with plain urllib, once: MLflow's own client retries a refused connection for minutes
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _TIMEOUT), long after the user should have been told. Any HTTP
    answer counts as reachable (a 401 from an authenticating proxy is the server's business)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as exc:  # URLError, refused, timeout, bad host; ValueError: malformed URI
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"tracking server {uri} is unreachable ({reason}); expected an MLflow tracking server "
                         f"answering HTTP there (start it first, or leave out --tracking-uri to use SQLite in "
                         f"the storage root)") from None


def local_artifact_root(uri: str, storage_root: str) -> str | None:
    """Where an embedded store keeps artifacts: beside the database, not in the caller's cwd."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None  # a server decides
    return (Path(storage_root).resolve() / "mlartifacts").as_uri()


def search(uri: str, exp_id: str, filter_string: str = "", order_by: list[str] | None = None) -> list[Run]:
    """Every run of the experiment matching ``filter_string``, page by page, each page with retries."""
    c = client(uri)
    runs, token = [], None
    while True:
        page = with_retries(lambda: c.search_runs([exp_id], filter_string, max_results=1000, order_by=order_by,
                                                  page_token=token))
        runs += page
        token = page.token
        if not token:
            return runs

# The representation probes' artifacts of a trial run (issue 16; clgrid.train.probes.Probes.artifacts).
PROBE_MATRIX_JSON, CKA_JSON, WEIGHT_DRIFT_JSON = "probe_matrix.json", "cka.json", "weight_drift.json"
PROBE_FILES = (PROBE_MATRIX_JSON, CKA_JSON, WEIGHT_DRIFT_JSON)

# Continual evaluation's metrics of a trial run (issue 15), logged with step = the stream step:
# the mean over the seen experiences, each one's accuracy, and the step at which experience i starts
# (value i); the trace itself is CONTINUAL_JSON.
CONT_ACC, CONT_ACC_EXP, CONT_BOUNDARY = "cont_acc", "cont_acc_exp_{}", "cont_boundary"
