"""Representation probes inside trials (issue 16): from the spec, without changing what is trained,
through checkpoints, on architectural strategies' own features, and to the tracking files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clgrid.spec import PipelineSpec, expand
from clgrid.sweep.layout import TrialDir
from clgrid.sweep.trial_logger import TrialLogger
from clgrid.train.probes import ProbesSpec
from clgrid.train.trainer import run_trial
from conftest import tiny_spec, tiny_trial

ALL = {"linear": True, "cka": True, "weight_drift": True, "prototype_drift": True}
TASK_IL = {"model": {"name": "mlp", "hidden": [16, 16], "heads": "multi"},
           "benchmarks": [{"source": "digits", "scenario": "task-il", "experiences": 5}],
           "train": {"iterations": 12, "batch_size": 32, "lr": 0.01}}


def test_probes_are_off_by_default_and_leave_the_keys_alone() -> None:
    assert not ProbesSpec().enabled and ProbesSpec(cka=True).enabled
    plain = PipelineSpec.model_validate(tiny_spec([{"name": "naive"}]))
    off = PipelineSpec.model_validate(tiny_spec([{"name": "naive"}], probes={}))
    on = PipelineSpec.model_validate(tiny_spec([{"name": "naive"}], probes=ALL))
    assert off.spec_hash == plain.spec_hash  # specs written before probes existed keep their sweep
    assert on.spec_hash != plain.spec_hash  # a sweep with probes is another sweep ...
    keys = [(t.config_key, t.trial_key) for t in expand(plain)]
    assert [(t.config_key, t.trial_key) for t in expand(on)] == keys  # ... of the same trained trials
    assert expand(on)[0].probes == ProbesSpec(**ALL)


@pytest.mark.parametrize("strategy", [{"name": "naive"}, {"name": "replay", "buffer_size": 50}])
def test_probes_do_not_change_the_accuracy_matrix(strategy: dict, tmp_path: Path) -> None:
    plain = run_trial(tiny_trial(strategy), tmp_path / "plain")
    probed = run_trial(tiny_trial(strategy, probes=ALL), tmp_path / "probed")
    assert probed.R == plain.R and probed.b == plain.b
    assert {k: v for k, v in probed.metrics.items() if k in plain.metrics} == plain.metrics
    assert "probe_seconds" not in plain.costs and not plain.probes  # off: nothing measured or stored
    assert probed.costs["probe_seconds"] > 0
    assert probed.costs["train_flops"] == plain.costs["train_flops"]
    P = probed.probes["probe_matrix"]["P"]
    assert len(P) == 2 and P[0][1] is None and all(0 <= p <= 1 for p in P[1])
    assert len(probed.probes["probe_matrix"]["all_seen"]) == 2
    assert {"probe_acc", "probe_forgetting", "cka_hidden.0", "weight_drift_hidden.0", "weight_drift_head",
            "prototype_drift"} <= set(probed.metrics)


def test_frozen_features_keep_cka_one_and_zero_drift_while_fine_tuning_moves(tmp_path: Path) -> None:
    frozen = run_trial(tiny_trial({"name": "feature_extraction"}, "task-il", probes=ALL, **TASK_IL), tmp_path / "fe")
    naive = run_trial(tiny_trial({"name": "naive"}, "task-il", probes=ALL, **TASK_IL), tmp_path / "naive")
    for layer in ("hidden.0", "hidden.1"):
        C = frozen.probes["cka"]["C"][frozen.probes["cka"]["layers"].index(layer)]
        assert all(C[i][j] == pytest.approx(1.0) for i in range(1, 5) for j in range(i))
        drift = frozen.probes["weight_drift"]
        assert drift["drift"][drift["layers"].index(layer)] == [0.0] * 4
        assert all(set(h["edges"]) and sum(h["counts"]) == 16 for h in drift["unit_histograms"][layer])
        moved = naive.probes["cka"]["C"][naive.probes["cka"]["layers"].index(layer)]
        assert moved[4][0] < 1.0 - 1e-6
        assert all(d > 0 for d in naive.probes["weight_drift"]["drift"][drift["layers"].index(layer)])
    assert frozen.metrics["prototype_drift"] == pytest.approx(0.0, abs=1e-6)
    assert naive.metrics["prototype_drift"] > 0


@pytest.mark.parametrize("name", ["progressive", "packnet", "hat", "den"])
def test_architectural_strategies_are_probed_on_their_own_features(name: str, tmp_path: Path) -> None:
    result = run_trial(tiny_trial({"name": name}, "task-il", probes=ALL, **TASK_IL), tmp_path)
    P, C = result.probes["probe_matrix"]["P"], result.probes["cka"]["C"]
    assert len(P) == 5 and all(0 <= p <= 1 for p in P[-1])
    assert len(C) == 2 and all(0 <= c <= 1 + 1e-9 for layer in C for row in layer for c in row if c is not None)
    if name in ("progressive", "packnet"):  # an old experience's column / mask never changes
        assert all(C[l][i][j] == pytest.approx(1.0) for l in range(2) for i in range(5) for j in range(i + 1))
        assert result.probes["weight_drift"]["drift"] == [[0.0] * 4] * 3  # hidden.0, hidden.1, head


def test_a_resumed_trial_ends_with_the_same_probes(tmp_path: Path) -> None:
    trial = tiny_trial({"name": "naive"}, "task-il", probes=ALL, **TASK_IL)
    full = run_trial(trial, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "exp-004.pt").unlink()
    resumed = run_trial(trial, tmp_path / "resumed")
    assert resumed.R == full.R
    assert resumed.probes == full.probes
    assert {k: v for k, v in resumed.metrics.items()} == full.metrics


def test_probe_artifacts_land_in_the_run(tmp_path: Path) -> None:
    from clgrid import tracking

    result = run_trial(tiny_trial({"name": "naive"}, probes=ALL), tmp_path / "trial")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    exp_id = client.create_experiment("probes", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp_id).info.run_id
    folder = TrialDir(tmp_path / "trial")
    TrialLogger(uri, run_id, folder, 5.0).probes(result.probes)
    assert sorted(p.name for p in folder.artifacts.iterdir()) == sorted(tracking.schema.PROBE_FILES)
    assert sorted(a.path for a in client.list_artifacts(run_id)) == sorted(tracking.schema.PROBE_FILES)
    assert json.loads((folder.artifacts / "cka.json").read_text())["layers"] == ["hidden.0"]
