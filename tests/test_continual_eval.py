"""Issue 15: continual evaluation (``evaluate:``) and the metrics of its trace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from clgrid import spec as specs
from clgrid.benchmarks import load_stream
from clgrid.train.continual import ContinualEval, EvaluateSpec
from clgrid.train.metrics import continual_summary
from clgrid.train.trainer import run_trial
from conftest import tiny_trial

ONLINE = {"online": True, "batch_size": 10, "lr": 0.01}

# Two experiences, boundaries at steps 0 and 4, points every 2 steps plus each experience's end.
TRACE = {
    "steps": [2, 4, 6, 8],
    "acc": [[0.5], [0.8], [0.3, 0.4], [0.6, 0.9]],
    "boundaries": [0, 4],
}


def test_min_acc_is_the_lowest_accuracy_on_each_earlier_experience_after_it_was_learned() -> None:
    three = {"steps": [1, 2, 3, 4, 5, 6], "boundaries": [0, 2, 4],
             "acc": [[0.4], [0.9], [0.2, 0.5], [0.7, 0.8], [0.6, 0.1, 0.3], [0.5, 0.7, 0.9]]}
    # experience 0: min over steps >= 2 of 0.9, 0.2, 0.7, 0.6, 0.5 = 0.2 (step 1's 0.4 is before it ended);
    # experience 1: min over steps >= 4 of 0.8, 0.1, 0.7 = 0.1
    assert continual_summary(three)["min_acc"] == pytest.approx((0.2 + 0.1) / 2)
    assert continual_summary(TRACE)["min_acc"] == pytest.approx(0.3)


def test_wc_acc_weighs_the_last_experience_by_one_over_k() -> None:
    assert continual_summary(TRACE)["wc_acc"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.3)


def test_a_auc_is_the_mean_over_points_of_the_mean_over_seen_experiences() -> None:
    assert continual_summary(TRACE)["a_auc"] == pytest.approx((0.5 + 0.8 + 0.35 + 0.75) / 4)


def test_stability_gap_is_the_largest_drop_below_the_boundary_value_within_the_next_experience() -> None:
    assert continual_summary(TRACE)["stability_gap"] == pytest.approx(0.8 - 0.3)
    recovered_above = {**TRACE, "acc": [[0.5], [0.8], [0.85, 0.4], [0.9, 0.9]]}
    assert continual_summary(recovered_above)["stability_gap"] == 0.0  # no drop: no gap
    three = {"steps": [2, 4, 6, 8, 10, 12], "boundaries": [0, 4, 8],
             "acc": [[0.5], [0.8], [0.3, 0.4], [0.6, 0.9], [0.1, 0.5, 0.2], [0.6, 0.7, 0.8]]}
    # boundary 1: 0.8 -> min 0.3; boundary 2: mean(0.6, 0.9) = 0.75 -> min over (0.1+0.5)/2, (0.6+0.7)/2 = 0.3
    assert continual_summary(three)["stability_gap"] == pytest.approx((0.5 + 0.45) / 2)


def test_one_experience_has_no_earlier_one_to_measure() -> None:
    one = {"steps": [1, 2], "acc": [[0.4], [0.6]], "boundaries": [0]}
    assert continual_summary(one) == {"min_acc": 0.0, "wc_acc": 0.6, "a_auc": pytest.approx(0.5), "stability_gap": 0.0}
    with pytest.raises(ValueError, match="no point at the start of experience 1"):
        continual_summary({**TRACE, "steps": [2, 3, 6, 8]})


def test_the_subsets_are_fixed_seeded_and_capped() -> None:
    test = load_stream(tiny_trial({"name": "naive"}).benchmark, 0).test
    a, b = (ContinualEval(EvaluateSpec(every=5, subset=40), test, 3) for _ in range(2))
    assert all(torch.equal(x.x, y.x) and len(x.y) == 40 for x, y in zip(a.test, b.test))
    other = ContinualEval(EvaluateSpec(every=5, subset=40), test, 4)
    assert any(not torch.equal(x.y, y.y) for x, y in zip(a.test, other.test))
    assert [len(e.y) for e in ContinualEval(EvaluateSpec(every=5, subset=10**6), test, 3).test] == [len(e.y) for e in test]


@pytest.mark.parametrize("name,boundaries", [("naive", "given"), ("der", "hidden"), ("gdumb", "hidden"),
                                             ("mir", "hidden"), ("ewc", "given"), ("lwf", "given")])
def test_the_same_spec_with_and_without_evaluate_gives_the_same_matrix(name: str, boundaries: str,
                                                                       tmp_path: Path) -> None:
    config = {"name": name, "buffer_size": 30} if name in ("der", "gdumb", "mir") else {"name": name}
    bench = [{"source": "digits", "scenario": "class-il", "experiences": 2, "boundaries": boundaries}]
    plain = run_trial(tiny_trial(config, benchmarks=bench, train=ONLINE), tmp_path / "plain")
    watched = run_trial(tiny_trial(config, benchmarks=bench, train=ONLINE, evaluate={"every": 3, "subset": 50}),
                        tmp_path / "watched")
    assert watched.R == plain.R and watched.b == plain.b
    for cost in ("train_flops", "samples_seen"):
        assert watched.costs[cost] == plain.costs[cost]
    assert plain.continual is None and "eval_seconds" not in plain.costs and "a_auc" not in plain.metrics
    assert watched.costs["eval_seconds"] > 0
    assert {"min_acc", "wc_acc", "a_auc", "stability_gap"} <= watched.metrics.keys()


def test_the_trace_has_a_point_every_few_steps_and_at_each_end_and_survives_resume(tmp_path: Path) -> None:
    trial = tiny_trial({"name": "replay", "buffer_size": 30}, train=ONLINE, evaluate={"every": 4, "subset": 20})
    full = run_trial(trial, tmp_path / "full")
    trace = full.continual
    sizes = [len(e.y) for e in load_stream(trial.benchmark, trial.seed).train]
    ends = [-(-sizes[0] // 10), -(-sizes[0] // 10) + -(-sizes[1] // 10)]
    assert trace["boundaries"] == [0, ends[0]]
    assert trace["steps"] == sorted({*range(4, ends[1] + 1, 4), *ends})
    assert [len(row) for row in trace["acc"]] == [1 if s <= ends[0] else 2 for s in trace["steps"]]
    assert all(a * 20 == round(a * 20) for row in trace["acc"] for a in row)  # 20 samples each
    assert full.metrics == full.metrics | continual_summary(trace)

    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "exp-001.pt").unlink()
    resumed = run_trial(trial, tmp_path / "resumed")
    assert resumed.continual == trace and resumed.R == full.R


def test_evaluate_stays_out_of_the_trial_keys_and_is_refused_with_its_line() -> None:
    assert tiny_trial({"name": "naive"}, evaluate={"every": 3}).trial_key == tiny_trial({"name": "naive"}).trial_key
    with pytest.raises(specs.SpecError) as err:
        specs.parse_spec("name: x\nbenchmarks: [{source: digits, scenario: class-il}]\nstrategies: [{name: naive}]\n"
                         "evaluate:\n  every: 0\n", "s.yaml")
    (problem,) = err.value.problems
    assert problem.startswith("s.yaml:5: evaluate.every:") and "greater than or equal to 1" in problem


def test_the_trace_lands_in_the_run_as_metrics_by_step_and_as_continual_json(tmp_path: Path) -> None:
    import json

    from clgrid import tracking
    from clgrid.sweep.layout import TrialDir
    from clgrid.sweep.trial_logger import TrialLogger
    from clgrid.tracking import schema

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id = client.create_run(client.create_experiment("cont", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    folder = TrialDir(tmp_path / "trial")
    TrialLogger(uri, run_id, folder, 5.0).continual(TRACE)
    assert json.loads((folder.artifacts / schema.CONTINUAL_JSON).read_text()) == TRACE
    assert [a.path for a in client.list_artifacts(run_id)] == [schema.CONTINUAL_JSON]
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
               for k in ("cont_acc", "cont_acc_exp_1", "cont_boundary")}
    assert history["cont_acc"] == {2: 0.5, 4: 0.8, 6: pytest.approx(0.35), 8: pytest.approx(0.75)}
    assert history["cont_acc_exp_1"] == {6: 0.4, 8: 0.9}
    assert history["cont_boundary"] == {0: 0.0, 4: 1.0}
    logged = client.get_run(run_id).data.metrics  # the summary the report's columns read
    assert {k: logged[k] for k in ("min_acc", "wc_acc", "a_auc", "stability_gap")} == pytest.approx(continual_summary(TRACE))


def test_sync_uploads_the_trace_a_lost_server_missed_once(tmp_path: Path) -> None:
    """The trial's server is away when the trace is logged: `clgrid sync` uploads continual.json
    and its metrics (the summary included), and a second sync adds no point twice."""
    from clgrid import tracking
    from clgrid.spec import PipelineSpec
    from clgrid.sweep import driver, sync
    from clgrid.sweep.layout import SweepDir
    from clgrid.sweep.trial_logger import TrialLogger
    from clgrid.tracking import schema
    from conftest import free_port, tiny_spec

    spec = PipelineSpec.model_validate(tiny_spec([{"name": "naive"}], storage={"root": str(tmp_path / "runs")}))
    sweep = SweepDir(driver.prepare(spec))
    meta = sweep.meta()
    (trial,) = meta.trials
    log = TrialLogger(f"http://127.0.0.1:{free_port()}", trial.run_id, sweep.trial(trial.trial_key), seconds=0)
    log.start(first=False)  # a retried attempt: finds the server away at once
    log.matrix([[0.5, 0.1], [0.3, 0.9]], [0.1, 0.1])  # a trial logs its matrix before the trace
    log.continual(TRACE)
    log.end("FINISHED")
    for _ in range(2):
        sync.sync_sweep(sweep.path, meta.tracking_uri)
    client = tracking.client(meta.tracking_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(trial.run_id, "cont_acc_exp_0")] == [
        (2, 0.5), (4, 0.8), (6, 0.3), (8, 0.6)]
    logged = client.get_run(trial.run_id).data.metrics
    assert logged["min_acc"] == pytest.approx(continual_summary(TRACE)["min_acc"])
    assert schema.CONTINUAL_JSON in {a.path for a in client.list_artifacts(trial.run_id)}
    assert client.get_run(trial.run_id).info.status == "FINISHED"
