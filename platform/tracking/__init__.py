"""MLflow: the schema clgrid writes (``schema``) and the runs of a sweep (``runs``). Imports no torch."""

from clgrid.tracking.runs import (
    benchmark_dataset, create_trial_run, end_run, experience_metrics, experiment_id, flat_params, log_dataset, log_experiences,
    log_matrix, log_metrics, logged_steps, metric_steps, run_status, start_sweep, trial_tags, upload_matrix,
    write_matrix,
)
from clgrid.tracking.schema import (
    MATRIX_FILES, check_reachable, client, local_artifact_root, retry_seconds, search, with_retries,
)

__all__ = ["MATRIX_FILES", "benchmark_dataset", "check_reachable", "client", "create_trial_run", "end_run", "experience_metrics",
           "experiment_id", "flat_params", "local_artifact_root", "log_dataset", "log_experiences", "log_matrix",
           "log_metrics", "logged_steps", "metric_steps", "retry_seconds", "run_status", "search", "start_sweep",
           "trial_tags", "upload_matrix", "with_retries", "write_matrix"]
