"""Tune-then-test (issue 14): search spaces in the spec, the `tune:` section's refusals, and sweeps
that tune on the validation split with Ray Tune (random search and FIFO; Optuna and ASHA on the
first experiences), then run each strategy's best configuration on the final seeds, resumably."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from clgrid.cli import main
from clgrid.spec import PipelineSpec, parse_spec
from clgrid.sweep import tune_phase
from clgrid.sweep.layout import SweepDir, sqlite_uri
from clgrid.tracking.schema import PHASE, SELECTED_FROM, STRATEGY, TUNING_DEVICE_SECONDS, TUNING_TRAIN_FLOPS
from conftest import run_clgrid


def tuned_spec(strategies: list[dict] | None = None, stream: int = 2, **tune) -> dict:
    return {
        "name": "tuned",
        "benchmarks": [{"source": "digits", "scenario": "class-il", "experiences": stream}],
        "strategies": strategies or [{"name": "ewc", "ewc_lambda": {"loguniform": [1.0, 10000.0]}}, {"name": "naive"}],
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"iterations": 6, "batch_size": 32, "lr": {"loguniform": [0.001, 0.1]}},
        "seeds": [0],
        "tune": {"search": "random", "num_samples": 2, "seeds": [100, 101], **tune},
        "resources": {"max_concurrent": 2},
    }


def write(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False, default_flow_style=None))
    return path


# ---- the spec ------------------------------------------------------------------------------------

def test_distributions_are_validated_as_values_of_their_field() -> None:
    spec = parse_spec(yaml.safe_dump(tuned_spec([
        {"name": "replay", "buffer_size": {"randint": [50, 500]}, "policy": {"choice": ["reservoir", "class_balanced"]}},
        {"name": "ewc", "ewc_lambda": [10.0, 100.0]}])))
    replay, ewc = spec.strategies
    assert (replay.buffer_size.kind, replay.buffer_size.values) == ("randint", (50, 500))
    assert replay.policy.values == ["reservoir", "class_balanced"]
    assert ewc.ewc_lambda == [10.0, 100.0]  # a list stays a grid axis
    points = tune_phase.planned(spec, 0, 0)
    assert len(points) == 2 and all(50 <= p["strategy.buffer_size"] <= 500 and 0.001 <= p["train.lr"] <= 0.1
                                    for p in points)
    assert tune_phase.planned(spec, 0, 0) == points  # seeded: a resumed sweep draws the same


def test_a_spec_without_tune_keeps_its_hash_and_its_trials() -> None:
    plain = {k: v for k, v in tuned_spec().items() if k != "tune"}
    plain["train"] = {**plain["train"], "lr": 0.01}
    plain["strategies"] = [{"name": "naive"}]
    spec = PipelineSpec.model_validate(plain)
    assert spec.spec_hash == PipelineSpec.model_validate({**plain, "tune": None}).spec_hash
    assert spec.spec_hash != PipelineSpec.model_validate({**plain, "tune": {"seeds": [7]}}).spec_hash
    assert spec.model_dump(mode="json")["train"]["lr"] == 0.01  # a scalar stays a scalar in sweep.json


def test_a_learning_rate_list_is_a_grid_axis(tmp_path, capsys) -> None:
    plain = {k: v for k, v in tuned_spec().items() if k != "tune"}
    plain["train"] = {**plain["train"], "lr": [0.01, 0.001]}
    plain["strategies"] = [{"name": "naive"}]
    assert main(["validate", str(write(tmp_path, plain))]) == 0
    assert "2 trials = 2 configurations x 1 seeds" in capsys.readouterr().out


def assert_refused(tmp_path: Path, capsys, spec: dict, line_text: str, message: str, command: str = "validate") -> None:
    path = write(tmp_path, spec)
    args = [command, str(path)] + (["--storage", str(tmp_path / "runs")] if command == "run" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if line_text in text)
    assert f"{path}:{line}:" in err and message in err, err


def test_a_distribution_without_tune_is_refused_with_its_line(tmp_path, capsys) -> None:
    spec = tuned_spec()
    del spec["tune"]
    assert_refused(tmp_path, capsys, spec, "ewc_lambda:", "strategies.0.ewc_lambda: {loguniform: ...} is a search space")


def test_tuning_seeds_overlapping_the_final_seeds_are_refused(tmp_path, capsys) -> None:
    assert_refused(tmp_path, capsys, tuned_spec(seeds=[0, 100]), "seeds: [0, 100]", "tune.seeds.0: seed 0 is also in `seeds`")


def test_an_unknown_search_algorithm_is_refused(tmp_path, capsys) -> None:
    assert_refused(tmp_path, capsys, tuned_spec(search="hyperband"), "search: hyperband", "tune.search: Input should be")


def test_bounds_outside_a_fields_limits_are_refused(tmp_path, capsys) -> None:
    spec = tuned_spec([{"name": "si", "c": {"loguniform": [-1.0, 10.0]}}])
    assert_refused(tmp_path, capsys, spec, "[-1.0", "strategies.0.c.loguniform.0: Input should be greater than or equal to 0")


def test_a_range_on_a_field_of_another_type_is_refused(tmp_path, capsys) -> None:
    spec = tuned_spec([{"name": "replay", "buffer_size": {"uniform": [10, 100]}}])
    assert_refused(tmp_path, capsys, spec, "buffer_size:", "strategies.0.buffer_size: expected a value, a list (a grid axis) "
             "or a distribution: {randint: [...]}, {choice: [...]}")


def test_first_experiences_longer_than_the_stream_is_refused(tmp_path, capsys) -> None:
    spec = tuned_spec(protocol="first-experiences", experiences=3)
    assert_refused(tmp_path, capsys, spec, "experiences: 3", "tune.experiences: 3 experiences, but benchmarks.0")


def test_tuning_without_a_validation_split_is_refused(tmp_path, capsys) -> None:
    spec = tuned_spec()
    spec["benchmarks"][0]["validation"] = 0
    assert_refused(tmp_path, capsys, spec, "validation: 0", "benchmarks.0.validation: tuning scores on the validation split")


def test_distributions_under_grid_search_are_refused_before_ray_starts(tmp_path, capsys) -> None:
    import ray

    assert_refused(tmp_path, capsys, tuned_spec(search="grid"), "  lr:", "train.lr: {loguniform: ...}: search grid "
             "takes values and lists only", command="run")
    assert not ray.is_initialized()
    assert not (tmp_path / "runs" / "sweeps").exists()


# ---- sweeps --------------------------------------------------------------------------------------

def _runs(storage: Path) -> list:
    client = MlflowClient(sqlite_uri(storage))
    exp = client.get_experiment_by_name("tuned")
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if STRATEGY in r.data.tags]


def _check_tuned_sweep(storage: Path, n_points: int, n_tuning_seeds: int) -> None:
    """Every child run has its phase; each strategy's final configuration is its tuning runs' best mean
    val_acc over the tuning seeds; final runs name those runs and carry the tuning cost."""
    runs = _runs(storage)
    assert {r.data.tags[PHASE] for r in runs} == {"tune", "final"}
    by_strategy: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.data.tags[PHASE] == "tune":
            by_strategy[r.data.tags[STRATEGY]][r.data.tags["clgrid.config_key"]].append(r)
    finals = [r for r in runs if r.data.tags[PHASE] == "final"]
    assert {r.data.tags[STRATEGY] for r in finals} == set(by_strategy)
    for final in finals:
        configs = by_strategy[final.data.tags[STRATEGY]]
        assert len(configs) == n_points
        finished = {k: rs for k, rs in configs.items() if len(rs) == n_tuning_seeds
                    and all("val_acc" in r.data.metrics and r.info.status == "FINISHED" for r in rs)}
        score = {k: statistics.fmean(r.data.metrics["val_acc"] for r in rs) for k, rs in finished.items()}
        best = final.data.tags["clgrid.config_key"]  # the best, or one of equally good ones (ties happen)
        assert best in score and score[best] == max(score.values()), (best, score)
        assert set(final.data.tags[SELECTED_FROM].split(",")) == {r.info.run_id for r in configs[best]}
        tuning = [r for rs in configs.values() for r in rs]
        assert final.data.metrics[TUNING_TRAIN_FLOPS] == pytest.approx(sum(r.data.metrics["train_flops"] for r in tuning))
        assert final.data.metrics[TUNING_DEVICE_SECONDS] == pytest.approx(
            sum(r.data.metrics["device_seconds"] for r in tuning))
        assert final.info.status == "FINISHED" and "acc" in final.data.metrics


def _sweep(storage: Path) -> SweepDir:
    return SweepDir(next((storage / "sweeps").iterdir()))


def _tuner_saw_only_validation(sweep: SweepDir) -> None:
    """What Ray Tune was given (recorded from the results its searcher and scheduler received): the
    validation metrics and the progress, none of the test metrics or costs the trials measured."""
    state = json.loads(sweep.tune.read_text())
    measured = set()
    for trial in sweep.path.iterdir():
        if (trial / "result.json").exists() and (trial / "run.json").exists():  # a tuning trial
            measured |= set(json.loads((trial / "result.json").read_text())["metrics"])
    assert {"acc", "forgetting", "train_flops", "val_acc"} <= measured
    for pair in state["pairs"].values():
        for p in pair["points"]:
            assert "val_acc" in p["reported"]
            assert not set(p["reported"]) & {k for k in measured if not k.startswith("val_")}, p["reported"]


@pytest.mark.slow
def test_random_search_tunes_on_validation_then_runs_the_best_on_the_final_seeds(tmp_path) -> None:
    storage = tmp_path / "runs"
    done = run_clgrid("run", str(write(tmp_path, tuned_spec())), "--storage", str(storage), "--no-report")
    assert done.returncode == 0, done.stderr[-3000:]
    _check_tuned_sweep(storage, n_points=2, n_tuning_seeds=2)
    _tuner_saw_only_validation(_sweep(storage))
    final = [f for f in json.loads(_sweep(storage).tune.read_text())["final"]]
    for f in final:  # the tuning cost is in the final trials' result.json too
        result = json.loads((_sweep(storage).trial(f["trial"]["trial_key"]).result).read_text())
        assert result["metrics"][TUNING_TRAIN_FLOPS] == f["metrics"][TUNING_TRAIN_FLOPS] > 0


@pytest.mark.slow
def test_optuna_with_asha_on_the_first_experiences(tmp_path) -> None:
    spec = tuned_spec([{"name": "si", "c": {"loguniform": [0.01, 100.0]}}], stream=5, search="optuna",
                      scheduler="asha", num_samples=3, seeds=[100], protocol="first-experiences", experiences=2)
    storage = tmp_path / "runs"
    done = run_clgrid("run", str(write(tmp_path, spec)), "--storage", str(storage), "--no-report")
    assert done.returncode == 0, done.stderr[-3000:]
    _check_tuned_sweep(storage, n_points=3, n_tuning_seeds=1)
    sweep = _sweep(storage)
    _tuner_saw_only_validation(sweep)
    for trial in sweep.path.iterdir():
        if (trial / "run.json").exists() and (trial / "result.json").exists():  # tuning: the first 2 experiences
            assert len(json.loads((trial / "result.json").read_text())["R"]) == 2
    final = json.loads(sweep.tune.read_text())["final"][0]
    assert len(json.loads(sweep.trial(final["trial"]["trial_key"]).result.read_text())["R"]) == 5


@pytest.mark.slow
def test_an_interrupted_tuning_phase_resumes_without_rerunning_finished_trials(tmp_path) -> None:
    spec_dict = tuned_spec([{"name": "ewc", "ewc_lambda": {"loguniform": [1.0, 10000.0]}}], seeds=[100])
    spec_dict["resources"]["max_failures"] = 0
    path = write(tmp_path, spec_dict)
    spec = PipelineSpec.model_validate(spec_dict)
    points = tune_phase.planned(spec, 0, 0)
    keys = [t.trial_key for hp in points for t in tune_phase.tuning_trials(spec, 0, 0, hp)]
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / f"{keys[1]}.0").write_text("raise")
    storage = tmp_path / "runs"
    first = run_clgrid("run", str(path), "--storage", str(storage), "--no-report", env={"CLGRID_FAULT_ONCE": str(faults)})
    assert first.returncode == 2 and "tuning configuration(s) failed" in first.stderr, first.stderr[-3000:]
    sweep = _sweep(storage)
    assert sweep.trial(keys[0]).result.exists() and not sweep.trial(keys[1]).result.exists()
    assert json.loads(sweep.tune.read_text())["final"] is None
    again = run_clgrid("resume", str(path), "--storage", str(storage))
    assert again.returncode == 0, again.stderr[-3000:]
    # the tuning trials count as the sweep's trials (sweep.json lists none before the final phase),
    # for resume's count and for sync, which reads the same SweepDir.trial_runs
    assert "1/2 trials finished" in again.stdout, again.stdout[-3000:]
    attempts = {k: sweep.trial(k).attempts.read_text().count("pid=") for k in keys}
    assert attempts == {keys[0]: 1, keys[1]: 2}  # the finished trial was not rerun; the failed one resumed
    _check_tuned_sweep(storage, n_points=2, n_tuning_seeds=1)


def test_a_dict_valued_field_is_a_value_and_a_misspelled_distribution_is_refused(tmp_path, capsys) -> None:
    layers = {"name": "finetune_layers", "layers": {"backbone.0": "frozen", "head": "reinit"}}
    spec = PipelineSpec.model_validate(dict(tuned_spec([layers]), tune=None, train={"iterations": 6}))
    assert spec.strategies[0].layers == [{"backbone.0": "frozen", "head": "reinit"}]
    bad = write(tmp_path, tuned_spec([{"name": "ewc", "ewc_lambda": {"logunifrom": [1.0, 10.0]}}]))
    assert main(["validate", str(bad)]) == 2
    assert "strategies.0.ewc_lambda" in capsys.readouterr().err
