"""``clgrid``: validate, run and list pipelines.

Exit codes: 0 success, 1 a sweep ran but some trials failed, 2 bad input (nothing was started).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from clgrid import safepaths
from clgrid import spec as specs
from clgrid.errors import UsageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clgrid", description="Evaluate continual-learning strategies at scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a spec and show its grid; starts nothing")
    p.add_argument("spec", help="a YAML file or the name of a bundled pipeline")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a spec's grid as Ray Tune trials, tracked in MLflow")
    p.add_argument("spec", help="a YAML file or the name of a bundled pipeline (e.g. quickstart)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in the storage root)")
    p.add_argument("--storage", help="storage root for checkpoints, replay shards and results")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    p.add_argument("--address", help="attach to a running Ray cluster (ray://HOST:10001 or 'auto')")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit a spec's sweep to a Ray cluster as a Ray job; prints the job id")
    p.add_argument("spec", help="a YAML file or the name of a bundled pipeline")
    p.add_argument("--address", required=True, help="the cluster's job API (Ray dashboard), e.g. http://127.0.0.1:8265")
    p.add_argument("--tracking-uri", help="MLflow tracking URI as the cluster nodes see it (e.g. http://MLFLOW:5000)")
    p.add_argument("--storage", help="storage root every cluster node mounts (absolute path)")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    p.add_argument("--follow", action="store_true", help="then print the job's logs until it ends")
    p.set_defaults(func=cmd_submit)

    for name, helptext in (("status", "a submitted job's status"), ("logs", "a submitted job's logs")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job", help="the job id that `clgrid submit` printed")
        p.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        p.set_defaults(func=cmd_status if name == "status" else cmd_logs)

    p = sub.add_parser("resume", help="continue an interrupted sweep: finished trials are kept, the others resume")
    p.add_argument("target", help="a sweep folder (with sweep.json), or a spec: its newest sweep in the storage root")
    p.add_argument("--storage", help="with a spec: the --storage it ran with")
    p.add_argument("--tracking-uri", help="with a spec: the --tracking-uri it ran with")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    p.add_argument("--address", help="attach to a running Ray cluster (ray://HOST:10001, HOST:6379 or 'auto')")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("sync", help="upload to the tracking server what it missed while it was away (from the "
                                     "sweep's trial folders); idempotent")
    p.add_argument("target", help="a sweep folder (with sweep.json), or a spec: its newest sweep in the storage root")
    p.add_argument("--tracking-uri", help="upload there (default: the sweep's; with a spec: the --tracking-uri it ran with)")
    p.add_argument("--storage", help="with a spec: the --storage it ran with")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("reap", help="mark runs left RUNNING by dead sweeps (driver killed) as KILLED")
    p.add_argument("target", help="an MLflow experiment name, a spec file or a bundled pipeline name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's, or SQLite in ./clgrid-runs)")
    p.add_argument("--storage", help="with a spec: the storage root it ran with (where its SQLite file is)")
    p.add_argument("--older-than", type=float, default=3.0, metavar="MINUTES",
                   help="a driver elsewhere is dead after this long without a heartbeat (default 3)")
    p.set_defaults(func=cmd_reap)

    p = sub.add_parser("list", help="benchmarks, scenarios, strategies and models with their parameters")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("report", help="cost-vs-forgetting report (HTML + Markdown) of a sweep's MLflow runs")
    p.add_argument("target", help="an MLflow experiment name, a spec file or a bundled pipeline name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's, or SQLite in ./clgrid-runs)")
    p.add_argument("--out", help="output folder (default: <storage>/reports/<experiment>)")
    p.add_argument("--sweep", help="a sweep id (default: the latest sweep of the experiment)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("replay", help="replay-store tools")
    replay = p.add_subparsers(dest="replay_command", required=True)
    p = replay.add_parser("inspect", help="a replay store's manifest, shards, rows per class and checksums")
    p.add_argument("path", help="the store folder (a trial's replay/ folder) or URI")
    p.set_defaults(func=cmd_replay_inspect)

    p = sub.add_parser("bench", help="the platform's cost against a plain torch loop, as ratios "
                                     "(minutes)")
    p.add_argument("--quick", action="store_true", help="tiny workloads: digits, a few steps, a 2-trial sweep")
    p.add_argument("--reps", type=int, help="repetitions of each trainer comparison (default 5)")
    p.add_argument("--epochs", type=int, help="epochs per experience (default: the quickstart's)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except specs.SpecError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"clgrid {args.command}: {exc}", file=sys.stderr)
        return 2


def _load(args: argparse.Namespace) -> specs.PipelineSpec:
    spec = specs.load_spec(args.spec)
    overrides: dict = {}
    if getattr(args, "storage", None):
        overrides["storage"] = spec.storage.model_copy(update={"root": args.storage})
    if getattr(args, "tracking_uri", None):
        overrides["tracking"] = spec.tracking.model_copy(update={"uri": args.tracking_uri})
    if getattr(args, "max_concurrent", None):
        overrides["resources"] = spec.resources.model_copy(update={"max_concurrent": args.max_concurrent})
    return spec.model_copy(update=overrides) if overrides else spec


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _load(args)
    trials = specs.expand(spec)
    configs = {t.config_key for t in trials}
    print(f"{args.spec}: valid. {len(trials)} trials = {len(configs)} configurations x {len(spec.seeds)} seeds")
    for grid in spec.strategies:
        points = specs.strategy_points(grid)
        print(f"  {grid.name}: {len(points)} configuration(s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load(args)
    from clgrid import tracking
    from clgrid.sweep import driver as sweep

    tracking.check_reachable(spec.tracking_uri)  # before Ray starts: MLflow itself retries for minutes
    safepaths.check_writable(spec.storage.root)  # creates the root: after the check above, which creates nothing
    n = len(specs.expand(spec))
    print(f"clgrid: {spec.name}: {n} trials; storage {Path(spec.storage.root).resolve()}; tracking {spec.tracking_uri}",
          flush=True)
    sweep_dir = sweep.prepare_and_connect(spec, args.address)
    outcome = sweep.run(sweep_dir, address=args.address)
    print_summary(outcome)
    if outcome.unsynced and not args.no_report:
        print("Report skipped: the runs miss what clgrid sync will upload; then: clgrid report " + args.spec)
    elif not args.no_report:
        _write_report(spec.experiment, outcome.tracking_uri, Path(spec.storage.root), None, spec, outcome.sweep_id)
    return 1 if outcome.failed else 0


def cmd_submit(args: argparse.Namespace) -> int:
    spec = _load(args)  # validated here: a bad spec never reaches the cluster
    from clgrid.sweep import jobs

    job_id = jobs.submit(args.address, specs.resolve_spec_path(args.spec), spec, max_concurrent=args.max_concurrent)
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


def _find_sweep(args: argparse.Namespace) -> Path:
    """``args.target``: a sweep folder, or a spec whose newest sweep is wanted."""
    from clgrid.sweep import driver as sweep

    if Path(args.target).is_dir():
        return sweep.sweep_dir_of(Path(args.target))
    return sweep.find_sweep(_load(argparse.Namespace(spec=args.target, storage=args.storage,
                                                     tracking_uri=args.tracking_uri)))


def cmd_resume(args: argparse.Namespace) -> int:
    from clgrid import tracking
    from clgrid.sweep import driver as sweep, liveness

    sweep_dir = _find_sweep(args)
    meta = sweep.read_meta(sweep_dir)
    tracking.check_reachable(meta["tracking_uri"])  # one line now, not MLflow's retries later
    liveness.ensure_not_running(meta["tracking_uri"], meta["parent_run_id"], meta["sweep_id"])
    done = sweep.finished_trials(sweep_dir)
    print(f"clgrid: resuming sweep {meta['sweep_id']} ({sweep_dir}): {len(done)}/{len(meta['trials'])} trials "
          f"finished; tracking {meta['tracking_uri']}", flush=True)
    outcome = sweep.run(sweep_dir, address=args.address, max_concurrent=args.max_concurrent)
    print_summary(outcome)
    return 1 if outcome.failed else 0


def cmd_sync(args: argparse.Namespace) -> int:
    from clgrid import tracking
    from clgrid.sweep import driver as sweep, sync

    sweep_dir = _find_sweep(args)
    meta = sweep.read_meta(sweep_dir)
    uri = args.tracking_uri or meta["tracking_uri"]
    tracking.check_reachable(uri)
    done = sync.sync_sweep(sweep_dir, uri)
    if not done.folders:
        print(f"sweep {meta['sweep_id']}: nothing to upload; {uri} has everything its folders hold")
    else:
        print(f"sweep {meta['sweep_id']}: uploaded {done.points} metric values, {done.artifacts} artifacts and "
              f"{done.statuses} run statuses from {done.folders} folder(s) to {uri}")
    return 0


def cmd_reap(args: argparse.Namespace) -> int:
    """The target is a spec (its experiment and tracking URI) or an experiment name."""
    from clgrid.sweep import liveness

    try:
        spec = _load(argparse.Namespace(spec=args.target, tracking_uri=args.tracking_uri, storage=args.storage))
    except specs.SpecError:
        if Path(args.target).suffix in (".yaml", ".yml"):
            raise
        spec = None
    experiment = spec.experiment if spec else args.target
    uri = spec.tracking_uri if spec else (args.tracking_uri or f"sqlite:///{Path('clgrid-runs').resolve()}/mlflow.db")
    reaped, alive = liveness.reap(uri, experiment, older_than=args.older_than * 60)
    for r in reaped:
        print(f"sweep {r.sweep_id}: {len(r.run_ids)} RUNNING run(s) marked KILLED ({r.reason})")
    print(f"{experiment}: reaped {sum(len(r.run_ids) for r in reaped)} run(s) of {len(reaped)} dead sweep(s); "
          f"{len(alive)} sweep(s) still running" + (f": {', '.join(alive)}" if alive else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The target is a spec (its experiment, tracking URI and storage) or an experiment name."""
    try:
        spec = _load(argparse.Namespace(spec=args.target, tracking_uri=args.tracking_uri))
    except specs.SpecError:
        if Path(args.target).suffix in (".yaml", ".yml"):
            raise
        spec = None
    experiment = spec.experiment if spec else args.target
    uri = spec.tracking_uri if spec else (args.tracking_uri or f"sqlite:///{Path('clgrid-runs').resolve()}/mlflow.db")
    root = Path(spec.storage.root) if spec else Path("clgrid-runs")
    from clgrid import tracking

    tracking.check_reachable(uri)
    return _write_report(experiment, uri, root, args.out, spec, args.sweep)


def _write_report(experiment: str, uri: str, root: Path, out: str | None, spec: specs.PipelineSpec | None,
                  sweep_id: str | None) -> int:
    from clgrid.report import ReportError, build_report

    budgets = None
    if spec is not None:
        budgets = {"compute_flops": spec.report.compute_budget_flops, "storage_bytes": spec.report.storage_budget_bytes}
    out_dir = Path(out) if out else safepaths.inside(root, "reports", experiment)  # an experiment may be "../x"
    try:
        result = build_report(experiment, uri, out_dir, budgets=budgets, sweep_id=sweep_id)
    except ReportError as exc:
        print(f"clgrid report: {exc}", file=sys.stderr)
        return 1
    print(f"Report of {result.n_finished}/{result.n_runs} runs, {result.n_configs} configurations: "
          f"{result.html} (and {result.markdown.name})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """The platform's costs against plain loops (clgrid.bench)."""
    from clgrid.bench import overhead

    options = [f"--{k}={v}" for k in ("reps", "epochs", "out") if (v := getattr(args, k)) is not None]
    overhead.main(["--quick"] * args.quick + options)
    return 0


def cmd_replay_inspect(args: argparse.Namespace) -> int:
    from clgrid.replay.inspect import inspect_store

    report = inspect_store(args.path)
    print(report)
    return report.exit_status


def print_summary(outcome) -> None:
    """Strategy rows: mean ± std over seeds of final accuracy, forgetting, BWT and train seconds."""
    from rich.console import Console
    from rich.table import Table

    groups: dict[tuple[str, str, str], list[dict]] = {}
    for t in outcome.trials:
        key = (t.trial.benchmark.id, t.trial.benchmark.scenario, _config_label(t.trial))
        groups.setdefault(key, []).append(t.result["metrics"] if t.result else None)
    table = Table(title=f"{outcome.experiment} (sweep {outcome.sweep_id})")
    for col in ("benchmark", "scenario", "strategy", "seeds", "acc", "forgetting", "bwt", "train s"):
        table.add_column(col, justify="left" if col in ("benchmark", "scenario", "strategy") else "right")
    for (bench, scenario, label), results in groups.items():
        done = [r for r in results if r is not None]
        cells = [_mean_std([r[k] for r in done]) for k in ("acc", "forgetting", "bwt", "train_seconds")]
        seeds = f"{len(done)}/{len(results)}"
        table.add_row(bench, scenario, label, seeds, *cells)
    console = Console(width=140)
    console.print(table)
    for t in outcome.failed:
        console.print(f"[red]failed[/red]: {t.trial.label} (MLflow run {t.run_id}); see {outcome.sweep_dir / 'ray'}")
    if outcome.unsynced:
        print(f"The tracking server did not get everything: {len(outcome.unsynced)} folder(s) keep the rest "
              f"(unsynced.json). Once it answers, run:  clgrid sync {outcome.sweep_dir}", flush=True)
    console.print(f"Open the runs in the MLflow UI:  mlflow ui --backend-store-uri {outcome.tracking_uri}"
                  if not outcome.tracking_uri.startswith("http") else f"Runs are at {outcome.tracking_uri}")


def _config_label(trial: specs.TrialSpec) -> str:
    cfg = trial.strategy.model_dump()
    defaults = type(trial.strategy)().model_dump()
    changed = [f"{k}={v}" for k, v in cfg.items() if k != "name" and v != defaults[k]]
    return trial.strategy.name + (f" ({', '.join(changed)})" if changed else "")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def cmd_list(args: argparse.Namespace) -> int:
    from clgrid.benchmarks import SOURCES, BenchmarkSpec
    from clgrid.train.models import ModelSpec
    from clgrid.strategies import REGISTRY

    print("benchmark sources: " + ", ".join(SOURCES))
    print("scenarios: class-il, task-il, domain-il (domain: permuted | rotated | split)")
    print("benchmark fields:")
    _print_fields(BenchmarkSpec)
    print("models: mlp, cnn, resnet18; model fields:")
    _print_fields(ModelSpec)
    print("strategies:")
    for name, cls in sorted(REGISTRY.items()):
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"  {name} [{', '.join(cls.scenarios)}]: {doc}")
        _print_fields(cls.Config, indent=4, skip=("name",))
    return 0


def _print_fields(model, indent: int = 2, skip: tuple[str, ...] = ()) -> None:
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        desc = f"  # {info.description}" if info.description else ""
        print(f"{' ' * indent}{name}: {info.default!r}{desc}")


if __name__ == "__main__":
    sys.exit(main())
