"""``clgrid``: validate, run and list pipelines.

Exit codes: 0 success, 1 a sweep ran but some trials failed, 2 bad input (nothing was started).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clgrid import safepaths
from clgrid.errors import SpecError, UsageError
from clgrid.sweep import layout

if TYPE_CHECKING:  # the spec imports the strategy registry (torch): commands import it when they need it
    from clgrid.spec import PipelineSpec
    from clgrid.sweep.driver import SweepOutcome


SPEC = "a YAML file or the name of a bundled pipeline (e.g. quickstart)"
SWEEP_OR_SPEC = "a sweep folder (with sweep.json), or a spec: its newest sweep in the storage root"
EXPERIMENT_OR_SPEC = "an MLflow experiment name, a spec file or a bundled pipeline name"
WITH_SPEC_STORAGE = f"the storage root it ran with (default: the spec's, else ./{layout.DEFAULT_ROOT})"
WITH_SPEC_TRACKING = "the MLflow tracking URI it ran with (default: the spec's, else SQLite in the storage root)"
JOB_API = "the cluster's job API (Ray dashboard), e.g. http://127.0.0.1:8265"
RAY_ADDRESS = "attach to a running Ray cluster (ray://HOST:10001, HOST:6379 or 'auto')"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clgrid", description="Evaluate continual-learning strategies at scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, helptext: str, *positional: tuple[str, str]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext)
        for arg, arg_help in positional:
            p.add_argument(arg, help=arg_help)
        p.set_defaults(func=func)
        return p

    def where(p: argparse.ArgumentParser, storage: str = WITH_SPEC_STORAGE, tracking: str = WITH_SPEC_TRACKING) -> None:
        p.add_argument("--storage", help=storage)
        p.add_argument("--tracking-uri", help=tracking)

    def local_sqlite(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sqlite-on-local-disk", action="store_true",
                       help="on a cluster, allow a SQLite tracking URI: its file is on local disk of a single-node cluster")

    def concurrency(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")

    command("validate", cmd_validate, "check a spec and show its grid; starts nothing", ("spec", SPEC))

    p = command("run", cmd_run, "run a spec's grid as Ray Tune trials, tracked in MLflow", ("spec", SPEC))
    where(p, "storage root for checkpoints, replay shards and results",
          "MLflow tracking URI (default: SQLite in the storage root)")
    concurrency(p)
    p.add_argument("--address", help=RAY_ADDRESS)
    local_sqlite(p)
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")

    p = command("submit", cmd_submit, "submit a spec's sweep to a Ray cluster as a Ray job; prints the job id",
                ("spec", SPEC))
    p.add_argument("--address", required=True, help=JOB_API)
    where(p, "storage root every cluster node mounts (absolute path)",
          "MLflow tracking URI as the cluster nodes see it (e.g. http://MLFLOW:5000)")
    concurrency(p)
    local_sqlite(p)
    p.add_argument("--follow", action="store_true", help="then print the job's logs until it ends")

    p = command("status", cmd_status, "a submitted job's status", ("job", "the job id that `clgrid submit` printed"))
    p.add_argument("--address", required=True, help=JOB_API)
    p = command("logs", cmd_logs, "a submitted job's logs", ("job", "the job id that `clgrid submit` printed"))
    p.add_argument("--address", required=True, help=JOB_API)
    p.add_argument("--follow", action="store_true", help="keep printing until the job ends")

    p = command("resume", cmd_resume, "continue an interrupted sweep: finished trials are kept, the others resume",
                ("target", SWEEP_OR_SPEC))
    where(p)
    concurrency(p)
    p.add_argument("--address", help=RAY_ADDRESS)
    local_sqlite(p)

    p = command("sync", cmd_sync, "upload to the tracking server what it missed while it was away (from the "
                                  "sweep's trial folders); idempotent", ("target", SWEEP_OR_SPEC))
    where(p, tracking="upload there (default: the sweep's; with a spec: the --tracking-uri it ran with)")

    p = command("reap", cmd_reap, "mark runs left RUNNING by dead sweeps (driver killed) as KILLED",
                ("target", f"a sweep folder (with sweep.json), or {EXPERIMENT_OR_SPEC}: each of its sweeps"))
    where(p)
    p.add_argument("--older-than", type=float, default=3.0, metavar="MINUTES",
                   help="a sweep whose folder is not under the storage root (judged by MLflow, not its lease): "
                        "its driver elsewhere is dead after this long without a heartbeat (default 3)")

    command("list", cmd_list, "benchmarks, scenarios, strategies and models with their parameters")

    p = command("report", cmd_report, "cost-vs-forgetting report (HTML + Markdown) of a sweep's MLflow runs",
                ("target", EXPERIMENT_OR_SPEC))
    where(p)
    p.add_argument("--out", help="output folder (default: <storage>/reports/<experiment>)")
    p.add_argument("--sweep", help="a sweep id (default: the latest sweep of the experiment)")

    replay = sub.add_parser("replay", help="replay-store tools").add_subparsers(dest="replay_command", required=True)
    p = replay.add_parser("inspect", help="a replay store's manifest, shards, rows per class and checksums")
    p.add_argument("path", help="the store folder (a trial's replay/ folder) or URI")
    p.set_defaults(func=cmd_replay_inspect)

    p = command("bench", cmd_bench, "the platform's cost against plain torch loops, as ratios (minutes)")
    p.add_argument("--quick", action="store_true", help="tiny workloads: digits, a few steps, a 2-trial sweep")
    p.add_argument("--reps", type=int, help="repetitions of each trainer comparison (default 5)")
    p.add_argument("--epochs", type=int, help="epochs per experience (default: the quickstart's)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: samples/s per model and precision, trials per GPU, GPU memory per trial "
                        "(clgrid.bench.gpu; exit 2 without CUDA)")
    p.add_argument("--scale", action="store_true",
                   help="thousands of tiny trials: platform cost per trial, the driver's memory, `clgrid report` "
                        "over 2,000 runs (clgrid.bench.scale; an hour on 2 cores, --quick: a minute)")
    p.add_argument("--scale-trials", help="with --scale: sweep sizes, comma-separated multiples of 8 (default 240,2000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"clgrid {args.command}: {exc}", file=sys.stderr)
        return 2


def _load_spec(spec: str, *, storage: str | None = None, tracking_uri: str | None = None,
               max_concurrent: int | None = None) -> PipelineSpec:
    """The validated spec, with the command line's overrides of where it stores and logs."""
    from clgrid.spec import load_spec  # the strategy registry, so torch: only for commands that need a spec

    spec_ = load_spec(spec)
    overrides: dict = {}
    if storage:
        overrides["storage"] = spec_.storage.model_copy(update={"root": storage})
    if uri := tracking_uri or spec_.tracking.uri:  # printed, stored, sent to a cluster: never with a password
        from clgrid.tracking.schema import split_credentials

        overrides["tracking"] = spec_.tracking.model_copy(update={"uri": split_credentials(uri)})
    if max_concurrent:
        overrides["resources"] = spec_.resources.model_copy(update={"max_concurrent": max_concurrent})
    return spec_.model_copy(update=overrides) if overrides else spec_


@dataclass(frozen=True)
class Experiment:
    """What `report` and `reap` work on: a spec's experiment, or an experiment named directly."""

    name: str
    tracking_uri: str
    root: Path  # the storage root: where the SQLite store and the reports are
    spec: PipelineSpec | None


def _experiment(target: str, *, storage: str | None, tracking_uri: str | None) -> Experiment:
    """``target`` is a spec file or bundled pipeline (its experiment, tracking URI and storage),
    else the name of an MLflow experiment (in ``--storage``'s SQLite store unless --tracking-uri)."""
    from clgrid import pipelines

    if pipelines.find(target) is not None or Path(target).suffix in (".yaml", ".yml"):
        spec = _load_spec(target, storage=storage, tracking_uri=tracking_uri)
        return Experiment(spec.experiment, spec.tracking_uri, Path(spec.storage.root), spec)
    root = Path(storage or layout.DEFAULT_ROOT)
    if tracking_uri:
        from clgrid.tracking.schema import split_credentials

        tracking_uri = split_credentials(tracking_uri)
    return Experiment(target, tracking_uri or layout.sqlite_uri(root), root, None)


def cmd_validate(args: argparse.Namespace) -> int:
    from clgrid.spec import expand, grid_size, trial_count

    spec = _load_spec(args.spec)
    if spec.tune is not None:
        print(f"{args.spec}: valid. tune-then-test: {trial_count(spec)} trials at most ({spec.tune.search} search on "
              f"{len(spec.tune.seeds)} tuning seed(s), then each strategy's best configuration on {len(spec.seeds)} seeds)")
        return 0
    trials = expand(spec)
    configs = {t.config_key for t in trials}
    print(f"{args.spec}: valid. {len(trials)} trials = {len(configs)} configurations x {len(spec.seeds)} seeds")
    for grid in spec.strategies:
        print(f"  {grid.name}: {grid_size(grid)} configuration(s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec, storage=args.storage, tracking_uri=args.tracking_uri,
                      max_concurrent=args.max_concurrent)
    from clgrid import tracking
    from clgrid.spec import trial_count
    from clgrid.sweep import driver, jobs

    if args.address:
        jobs.check_cluster_tracking(spec.tracking_uri, args.sqlite_on_local_disk)
    tracking.check_reachable(spec.tracking_uri)  # before Ray starts: MLflow itself retries for minutes
    safepaths.check_writable(spec.storage.root)  # creates the root: after the check above, which creates nothing
    print(f"clgrid: {spec.name}: {trial_count(spec)} trials; storage {Path(spec.storage.root).resolve()}; "
          f"tracking {spec.tracking_uri}", flush=True)
    from clgrid.report.console import print_summary

    with contextlib.ExitStack() as held:  # the sweep's lease, from its folder's creation to the sweep's end
        sweep_dir = driver.prepare_and_connect(spec, args.address, held)
        outcome = driver.run(sweep_dir, address=args.address)
    print_summary(outcome)
    if outcome.unsynced and not args.no_report:
        print("Report skipped: the runs miss what clgrid sync will upload; then: clgrid report " + args.spec)
    elif not args.no_report:
        where = Experiment(spec.experiment, outcome.tracking_uri, Path(spec.storage.root), spec)
        _write_report(where, None, outcome.sweep_id)
    _print_ui(outcome)
    return 1 if outcome.failed else 0


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def _print_ui(outcome: SweepOutcome) -> None:
    """The last lines of a sweep: how to open its runs in the MLflow UI, on the runs page (the
    experiment's id is asked of the store unless the tracking server was lost during the sweep)."""
    from clgrid import tracking

    uri = outcome.tracking_uri
    page = ""
    if not outcome.unsynced:
        found = tracking.with_retries(lambda: tracking.client(uri).get_experiment_by_name(outcome.experiment))
        page = f"/#/experiments/{found.experiment_id}/runs" if found else ""
    if uri.startswith(("http://", "https://")):
        print(f"The runs in the MLflow UI:  {uri.rstrip('/')}{page}")
    else:
        print(f"Open the runs in the MLflow UI:  mlflow ui --backend-store-uri {uri}\n  then {LOCAL_UI}{page}")


def cmd_submit(args: argparse.Namespace) -> int:
    from clgrid import pipelines
    from clgrid.sweep import jobs

    spec = _load_spec(args.spec, storage=args.storage, tracking_uri=args.tracking_uri,
                      max_concurrent=args.max_concurrent)  # validated here: a bad spec never reaches the cluster
    job_id = jobs.submit(args.address, pipelines.resolve(args.spec), spec, max_concurrent=args.max_concurrent,
                         sqlite_on_local_disk=args.sqlite_on_local_disk)
    print(job_id, flush=True)
    if not args.follow:
        print(f"follow it: clgrid logs {job_id} --address {args.address} --follow", file=sys.stderr)
        return 0
    return _job_exit(job_id, jobs.logs(args.address, job_id, follow=True))


def cmd_status(args: argparse.Namespace) -> int:
    from clgrid.sweep import jobs

    status, message = jobs.status(args.address, args.job)
    print(f"{args.job}: {status}" + (f" ({message})" if message else ""))
    return 1 if status in jobs.FAILED else 0


def cmd_logs(args: argparse.Namespace) -> int:
    from clgrid.sweep import jobs

    status = jobs.logs(args.address, args.job, follow=args.follow)
    return _job_exit(args.job, status) if args.follow else 0


def _job_exit(job_id: str, status: str) -> int:
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _sweep_dir(args: argparse.Namespace) -> layout.SweepDir:
    """``args.target``: a sweep folder, or a spec whose newest sweep is wanted."""
    if Path(args.target).is_dir():
        return layout.SweepDir.of(Path(args.target))
    return layout.SweepDir.newest(_load_spec(args.target, storage=args.storage, tracking_uri=args.tracking_uri))


def cmd_resume(args: argparse.Namespace) -> int:
    from clgrid.sweep import jobs
    from clgrid.sweep.lease import SweepLease

    sweep = _sweep_dir(args)
    meta = sweep.meta()
    if args.address:
        jobs.check_cluster_tracking(meta.tracking_uri, args.sqlite_on_local_disk)
    with SweepLease(sweep, "clgrid resume"):  # one driver per sweep; a refusal comes before MLflow and Ray load
        from clgrid import tracking
        from clgrid.sweep import driver

        tracking.check_reachable(meta.tracking_uri)  # one line now, not MLflow's retries later
        print(f"clgrid: resuming sweep {meta.sweep_id} ({sweep.path}): {len(sweep.finished())}/{len(sweep.trial_runs())} "
              f"trials finished; tracking {meta.tracking_uri}", flush=True)
        outcome = driver.run(sweep.path, address=args.address, max_concurrent=args.max_concurrent)
    from clgrid.report.console import print_summary

    print_summary(outcome)
    _print_ui(outcome)
    return 1 if outcome.failed else 0


def cmd_sync(args: argparse.Namespace) -> int:
    from clgrid.sweep.lease import SweepLease

    sweep = _sweep_dir(args)
    meta = sweep.meta()
    with SweepLease(sweep, "clgrid sync"):  # nothing else writes the folders meanwhile; refused before MLflow loads
        from clgrid import tracking
        from clgrid.sweep import sync
        from clgrid.tracking.schema import split_credentials

        uri = split_credentials(args.tracking_uri) if args.tracking_uri else meta.tracking_uri
        tracking.check_reachable(uri)
        done = sync.sync_sweep(sweep.path, uri)
    if not done.folders:
        print(f"sweep {meta.sweep_id}: nothing to upload; {uri} has everything its folders hold")
    else:
        print(f"sweep {meta.sweep_id}: uploaded {done.points} metric values, {done.artifacts} artifacts and "
              f"{done.statuses} run statuses from {done.folders} folder(s) to {uri}")
    return 0


def cmd_reap(args: argparse.Namespace) -> int:
    from clgrid.sweep.lease import SweepLease

    if Path(args.target).is_dir():  # one sweep's folder: its lease first, refused before MLflow loads
        folder = layout.SweepDir.of(Path(args.target))
        with SweepLease(folder, "clgrid reap") as held:
            from clgrid.sweep import liveness

            r = liveness.reap_sweep(folder, held)
        print(f"sweep {r.sweep_id}: {len(r.run_ids)} RUNNING run(s) marked KILLED ({r.reason})")
        return 0
    from clgrid.sweep import liveness

    where = _experiment(args.target, storage=args.storage, tracking_uri=args.tracking_uri)
    reaped, alive = liveness.reap(where.tracking_uri, where.name, older_than=args.older_than * 60, root=where.root)
    for r in reaped:
        print(f"sweep {r.sweep_id}: {len(r.run_ids)} RUNNING run(s) marked KILLED ({r.reason})")
    print(f"{where.name}: reaped {sum(len(r.run_ids) for r in reaped)} run(s) of {len(reaped)} dead sweep(s); "
          f"{len(alive)} sweep(s) still running" + (f": {', '.join(alive)}" if alive else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from clgrid import tracking

    where = _experiment(args.target, storage=args.storage, tracking_uri=args.tracking_uri)
    tracking.check_reachable(where.tracking_uri)
    return _write_report(where, args.out, args.sweep)


def _write_report(where: Experiment, out: str | None, sweep_id: str | None) -> int:
    from clgrid.report import ReportError, build_report

    budgets = None
    if where.spec is not None:
        budgets = {"compute_flops": where.spec.report.compute_budget_flops,
                   "storage_bytes": where.spec.report.storage_budget_bytes}
    out_dir = Path(out) if out else layout.reports_dir(where.root, where.name)
    try:
        result = build_report(where.name, where.tracking_uri, out_dir, budgets=budgets, sweep_id=sweep_id)
    except ReportError as exc:
        print(f"clgrid report: {exc}", file=sys.stderr)
        return 1
    print(f"Report of {result.n_finished}/{result.n_runs} runs, {result.n_configs} configurations: "
          f"{result.html} (and {result.markdown.name})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """The platform's costs against plain loops (clgrid.bench); with ``--device cuda``, the GPU path."""
    if args.device == "cuda":
        from clgrid.bench import gpu

        return gpu.main(["--quick"] * args.quick + ([f"--out={args.out}"] if args.out else []))
    if args.scale:
        from clgrid.bench import scale

        scale.main(["--quick"] * args.quick + [f"--{k.replace('scale_', '')}={v}" for k in ("scale_trials", "out")
                                                if (v := getattr(args, k)) is not None])
        return 0
    from clgrid.bench import overhead

    options = [f"--{k}={v}" for k in ("reps", "epochs", "out") if (v := getattr(args, k)) is not None]
    overhead.main(["--quick"] * args.quick + options)
    return 0


def cmd_replay_inspect(args: argparse.Namespace) -> int:
    from clgrid.replay.inspect import inspect_store

    report = inspect_store(args.path)
    print(report)
    return report.exit_status


def cmd_list(args: argparse.Namespace) -> int:
    from clgrid.benchmarks import BenchmarkSpec
    from clgrid.spec.schema import ResourcesSpec, TrainGrid, TuneSpec
    from clgrid.strategies import REGISTRY
    from clgrid.train.continual import EvaluateSpec
    from clgrid.train.models import ModelSpec
    from clgrid.train.probes import ProbesSpec

    print("benchmark fields:")
    _print_fields(BenchmarkSpec)
    print("model fields:")
    _print_fields(ModelSpec)
    print("train fields:")
    _print_fields(TrainGrid)
    print("tune fields (absent by default: no tuning phase; docs/tuning.md):")
    _print_fields(TuneSpec)
    print("resources fields:")
    _print_fields(ResourcesSpec)
    print("probes fields (all off by default; docs/drift.md):")
    _print_fields(ProbesSpec)
    print("evaluate fields (continual evaluation, off unless the spec has `evaluate:`; docs/online.md):")
    _print_fields(EvaluateSpec)
    print("strategies:")
    for name, cls in sorted(REGISTRY.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        hidden = "" if cls.needs_boundaries else "; runs with boundaries: hidden"
        print(f"  {name} [{', '.join(cls.scenarios)}{hidden}]: {doc}")
        _print_fields(cls.Config, indent=4, skip=("name",))
    return 0


def _print_fields(model, indent: int = 2, skip: tuple[str, ...] = ()) -> None:
    """``name: default  # description``; "required" where there is no default, and the allowed
    values of a Literal field."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        default = "required" if info.is_required() else repr(info.default)
        choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
        allowed = f" (one of {' | '.join(map(str, choices))})" if choices else ""
        desc = f"  # {info.description}" if info.description else ""
        print(f"{' ' * indent}{name}: {default}{allowed}{desc}")


def console() -> int:
    """The ``clgrid`` console script: ``main``, then the process ends."""
    try:
        return main()
    finally:
        # Spare the interpreter's last full collection a walk over everything MLflow, SQLAlchemy
        # and matplotlib allocated (about a second of `clgrid report` over 240 runs).
        gc.freeze()


if __name__ == "__main__":
    sys.exit(console())
