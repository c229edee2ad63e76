"""Validation streams and per-seed class orders (issue 14): a seeded, class-balanced split held out
of the training data, disjoint from what trains and from test; evaluated beside the test set without
changing training; logged to result.json and MLflow; and `validation: 0` exactly as before."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from clgrid.benchmarks import BenchmarkSpec, load_stream
from clgrid.benchmarks.scenarios import class_order
from clgrid.benchmarks.sources import load_source
from clgrid.spec import PipelineSpec, expand
from clgrid.sweep.trial import benchmark_dataset
from clgrid.train import trainer
from clgrid.train.trainer import Trainer, run_trial
from conftest import run_clgrid, tiny_spec, tiny_trial

GOLDEN = Path(__file__).parent / "data" / "validation_off_golden.json"
SUMMARY = {"acc", "bwt", "fwt", "forgetting", "learning_acc"}


def stream(seed: int = 0, **fields):
    return load_stream(BenchmarkSpec(**fields), seed)


def identities(x: torch.Tensor, source_x: torch.Tensor) -> list[int]:
    """Each row of ``x`` as its index in ``source_x`` (the source's fixed array): a sample's identity."""
    index = {row.numpy().tobytes(): i for i, row in enumerate(source_x.flatten(1))}
    return [index[row.numpy().tobytes()] for row in x.flatten(1)]


# --- the split ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [dict(scenario="class-il", shuffle_classes=True), dict(scenario="task-il"),
                                    dict(scenario="domain-il", domain="split")])
def test_validation_test_and_training_samples_never_meet(fields):
    train_x, _, test_x, _ = load_source("mnist5k", "unused", False)
    assert len({r.numpy().tobytes() for r in train_x.flatten(1)}) == len(train_x)  # identities are unique images
    s = stream(4, source="mnist5k", **fields)
    for exp_train, exp_val, exp_test in zip(s.train, s.val, s.test):
        trained, held = identities(exp_train.x, train_x), identities(exp_val.x, train_x)
        assert len(held) > 0 and not set(trained) & set(held)
        # drawn from the training data only: no validation image is a test image
        assert not {r.numpy().tobytes() for r in exp_val.x.flatten(1)} & {r.numpy().tobytes() for r in test_x.flatten(1)}
    every = [i for e in s.train + s.val for i in identities(e.x, train_x)]
    assert sorted(every) == list(range(len(train_x)))  # together they are the training data, each sample once


def test_domain_streams_hold_the_same_samples_out_of_every_experience():
    """Permuted experiences share the source's samples: one held-out set, kept out of all of them
    (a permutation only moves pixels, so a sample is known by its sorted pixel values)."""
    def pixels(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sort(dim=1).values

    train_x, _, _, _ = load_source("mnist5k", "unused", False)
    source = pixels(train_x)
    assert len({r.numpy().tobytes() for r in source}) == len(source)
    s = stream(2, source="mnist5k", scenario="domain-il", domain="permuted", experiences=2)
    held = [set(identities(pixels(e.x), source)) for e in s.val]
    trained = [set(identities(pixels(e.x), source)) for e in s.train]
    assert held[0] == held[1] and trained[0] == trained[1]
    assert not held[0] & trained[0] and len(held[0]) + len(trained[0]) == len(train_x)
    assert not torch.equal(s.val[0].x, s.val[1].x)  # each experience's own permutation


def test_the_split_is_class_balanced_per_experience():
    _, train_y, _, _ = load_source("digits", "unused", False)
    s = stream(0, source="digits", scenario="class-il", validation=0.25)
    for exp_train, exp_val in zip(s.train, s.val):
        for c in exp_train.classes:
            total = int((train_y == c).sum())
            assert int((exp_val.y == c).sum()) == round(0.25 * total)
            assert int((exp_train.y == c).sum()) == total - round(0.25 * total)
        assert exp_val.classes == exp_train.classes and exp_val.index == exp_train.index


def test_the_split_is_seeded():
    fields = dict(source="digits", scenario="class-il")
    a, b, other = stream(5, **fields), stream(5, **fields), stream(6, **fields)
    assert all(torch.equal(x.x, y.x) and torch.equal(x.y, y.y) for x, y in zip(a.val + a.train, b.val + b.train))
    assert not all(torch.equal(x.x, y.x) for x, y in zip(a.val, other.val))
    # its own generator: the class order the seed draws is the one it draws without a split
    shuffled = dict(fields, shuffle_classes=True)
    assert stream(5, **shuffled).task_classes == stream(5, validation=0, **shuffled).task_classes


def test_validation_zero_cuts_the_stream_exactly_as_before():
    train_x, train_y, _, _ = load_source("digits", "unused", False)
    s = stream(3, source="digits", scenario="class-il", validation=0)
    assert s.val == []
    for exp in s.train:
        mask = torch.isin(train_y, torch.tensor(exp.classes))
        assert torch.equal(exp.x, train_x[mask]) and torch.equal(exp.y, train_y[mask])


@pytest.mark.parametrize(("fields", "message"), [
    (dict(validation=0.5), "less than 0.5"),
    (dict(validation=-0.1), "greater than or equal to 0"),
    (dict(class_order="random"), "per-seed"),
    (dict(class_order="per-seed", shuffle_classes=True), "not both"),
    (dict(scenario="domain-il", domain="permuted", class_order="per-seed"), "split streams"),
])
def test_bad_fields_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        BenchmarkSpec(**{"source": "digits", "scenario": "class-il", **fields})


def test_a_fraction_too_small_for_a_class_is_refused_when_the_stream_is_cut():
    with pytest.raises(ValueError, match="holds out no sample of class 0"):
        stream(0, source="digits", scenario="class-il", validation=0.001)


def test_a_spec_with_a_bad_validation_is_refused_with_its_line(tmp_path: Path):
    spec = tiny_spec([{"name": "naive"}])
    spec["benchmarks"][0]["validation"] = 0.7
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = run_clgrid("validate", str(tmp_path / "bad.yaml"))
    assert proc.returncode == 2
    line = yaml.safe_dump(spec, sort_keys=False).splitlines().index("  validation: 0.7") + 1
    assert f"bad.yaml:{line}" in proc.stderr and "validation" in proc.stderr, proc.stderr


# --- per-seed class orders ------------------------------------------------------------------------


def test_per_seed_class_orders_differ_between_seeds_and_repeat_within_one():
    spec = BenchmarkSpec(source="digits", scenario="class-il", class_order="per-seed")
    orders = {seed: class_order(spec, seed) for seed in range(4)}
    assert len({json.dumps(o) for o in orders.values()}) > 1
    assert class_order(spec, 2) == orders[2] and sorted(c for g in orders[2] for c in g) == list(range(10))
    assert load_stream(spec, 2).task_classes == [tuple(g) for g in orders[2]]
    same = BenchmarkSpec(source="digits", scenario="class-il", shuffle_classes=True)  # one code path, one order
    assert class_order(same, 2) == orders[2]
    assert class_order(BenchmarkSpec(source="digits", scenario="domain-il"), 2) is None  # every class, every time


# --- keys, trainer, golden matrices ---------------------------------------------------------------


def test_validation_zero_keeps_the_keys_and_the_default_makes_new_ones():
    def keys(**bench):
        spec = tiny_spec([{"name": "naive"}])
        spec["benchmarks"][0].update(bench)
        pipeline = PipelineSpec.model_validate(spec)
        return pipeline.spec_hash, expand(pipeline)[0].trial_key

    golden = json.loads(GOLDEN.read_text())["naive-class-il"]
    off = keys(validation=0)
    assert off[1] != keys()[1] and keys(validation=0.1) == keys()
    plain = tiny_trial({"name": "naive"}, seeds=[3], benchmarks=[{"source": "digits", "scenario": "class-il",
                                                                   "experiences": 2, "validation": 0}])
    assert plain.trial_key == golden["trial_key"]
    # a dump that is not a key keeps validation: 0 (it would load back as the default)
    assert BenchmarkSpec.model_validate_json(plain.benchmark.model_dump_json()).validation == 0


@pytest.mark.parametrize("case", json.loads(GOLDEN.read_text()))
def test_validation_zero_reproduces_mains_matrices_keys_and_dataset(case: str, tmp_path: Path):
    """The golden file was written by main's code before validation splits existed (same cases)."""
    golden = json.loads(GOLDEN.read_text())[case]
    overrides = json.loads(json.dumps(golden["overrides"]))
    if "benchmarks" not in overrides:
        spec = tiny_spec([golden["strategy"]], golden["scenario"])
        overrides["benchmarks"] = spec["benchmarks"]
    for bench in overrides["benchmarks"]:
        bench["validation"] = 0
    trial = tiny_trial(golden["strategy"], golden["scenario"], seeds=[3], **overrides)
    result = run_trial(trial, tmp_path)
    assert (result.R, result.b) == (golden["R"], golden["b"])
    assert (result.R_val, result.b_val) == ([], [])
    assert not [k for k in result.metrics if k.startswith("val_")]
    assert trial.trial_key == golden["trial_key"]
    assert benchmark_dataset(trial).digest == golden["dataset_digest"]


def test_the_trainer_evaluates_validation_beside_test(tmp_path: Path):
    trial = tiny_trial({"name": "replay", "buffer_size": 40})
    reports: list[trainer.ExperienceReport] = []
    result = run_trial(trial, tmp_path, on_experience=reports.append)
    assert len(result.R_val) == 2 and all(len(row) == 2 for row in result.R_val) and len(result.b_val) == 2
    assert result.R_val[0][0] > 0.5  # learned: the held-out samples of the first classes are recognised
    for name in SUMMARY:
        assert f"val_{name}" in result.metrics and name in result.metrics
    assert result.metrics["val_acc"] == pytest.approx(sum(result.R_val[-1]) / 2)
    assert [r.val_row for r in reports] == result.R_val
    assert reports[0].metrics["val_acc"] == result.R_val[0][0]  # the partial summary over what was seen


def test_evaluating_validation_changes_nothing_that_trains(tmp_path: Path):
    """The same stream with its validation experiences dropped (not evaluated) trains to the same R."""
    trial = tiny_trial({"name": "replay", "buffer_size": 40})
    measured = run_trial(trial, tmp_path / "a")
    unmeasured = Trainer(trial, tmp_path / "b")
    assert unmeasured.stream.val
    unmeasured.stream = dataclasses.replace(unmeasured.stream, val=[])
    plain = unmeasured.run()
    assert (plain.R, plain.b, plain.costs["train_flops"]) == (measured.R, measured.b, measured.costs["train_flops"])
    assert plain.R_val == [] and {k: v for k, v in measured.metrics.items() if not k.startswith("val_")} == plain.metrics


def test_a_resumed_trial_ends_with_the_same_validation_matrix(tmp_path: Path):
    trial = tiny_trial({"name": "naive"})
    full = run_trial(trial, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "exp-001.pt").unlink()
    resumed = run_trial(trial, tmp_path / "resumed")
    assert (resumed.R_val, resumed.b_val, resumed.metrics) == (full.R_val, full.b_val, full.metrics)


def test_an_experience_logs_its_validation_accuracies_also_from_history_json():
    """The metrics of one experience as the logger and `clgrid sync` (from history.json) log them."""
    from clgrid import tracking

    report = {"experience": 0, "row": [0.9, 0.0], "metrics": {"acc": 0.9, "val_acc": 0.8}, "costs": {"train_flops": 1.0},
              "val_row": [0.8, 0.1]}
    logged = tracking.experience_metrics(**report)
    assert logged == {"acc": 0.9, "val_acc": 0.8, "train_flops": 1.0, "acc_on_exp_0": 0.9, "val_acc_on_exp_0": 0.8}
    del report["val_row"]  # history.json of a trial without a validation split
    assert tracking.experience_metrics(**report) == {"acc": 0.9, "val_acc": 0.8, "train_flops": 1.0, "acc_on_exp_0": 0.9}


# --- a sweep: result.json, MLflow, Ray Tune -------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    spec = tiny_spec([{"name": "naive"}], seeds=[0, 1], name="val")
    spec["benchmarks"][0]["class_order"] = "per-seed"
    (root / "val.yaml").write_text(yaml.safe_dump(spec))
    proc = run_clgrid("run", "val.yaml", "--storage", str(root / "runs"), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.mark.slow
def test_a_sweep_logs_validation_and_the_class_order(sweep: Path):
    client = MlflowClient(f"sqlite:///{sweep / 'runs'}/mlflow.db")
    exp = client.get_experiment_by_name("val")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("clgrid.role") == "trial"]
    results = {p.parent.name: json.loads(p.read_text()) for p in (sweep / "runs" / "sweeps").glob("*/*/result.json")}
    assert len(runs) == len(results) == 2
    orders = set()
    for run in runs:
        result = results[run.data.tags["clgrid.trial_key"]]
        seed = int(run.data.tags["clgrid.seed"])
        bench = BenchmarkSpec(source="digits", scenario="class-il", experiences=2, class_order="per-seed")
        assert result["class_order"] == class_order(bench, seed) == json.loads(run.data.tags["clgrid.class_order"])
        orders.add(json.dumps(result["class_order"]))
        assert len(result["R_val"]) == 2 and len(result["b_val"]) == 2
        assert result["metrics"]["val_acc"] == pytest.approx(sum(result["R_val"][-1]) / 2)
        run_id = run.info.run_id
        for name in ("val_acc", "val_forgetting", "val_acc_on_exp_0"):
            assert [m.step for m in client.get_metric_history(run_id, name)] == [0, 1], name
        assert [m.step for m in client.get_metric_history(run_id, "val_acc_on_exp_1")] == [1]
        local = client.download_artifacts(run_id, "val_accuracy_matrix.json", str(sweep))
        assert json.loads(Path(local).read_text())["R"] == result["R_val"]
        assert {"val_accuracy_matrix.json", "val_accuracy_matrix.png"} <= {a.path for a in client.list_artifacts(run_id)}
        profile = json.loads(client.get_run(run_id).inputs.dataset_inputs[0].dataset.profile)
        assert all(e["val"] > 0 and e["classes"] in result["class_order"] for e in profile["experiences"])
    assert len(orders) == 2  # the seeds ran different class orders
