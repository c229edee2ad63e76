"""Packs: short trials share a Ray Tune trial, sized from the times of the trials that finished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray.tune.search import Searcher

from clgrid.sweep import packs
from clgrid.sweep.packs import PACK_SECONDS, PackSearcher, pack_size
from conftest import tiny_spec


def test_a_pack_holds_one_trial_until_trials_have_finished() -> None:
    assert pack_size([], remaining=500, slots=2) == 1


def test_a_pack_fills_its_seconds_at_the_median_trial_time() -> None:
    assert pack_size([0.2, 0.25, 10.0], remaining=10_000, slots=2) == int(PACK_SECONDS / 0.25)


def test_trials_as_long_as_a_pack_run_one_per_pack() -> None:
    assert pack_size([PACK_SECONDS, 2 * PACK_SECONDS], remaining=10_000, slots=2) == 1


def test_packs_shrink_to_an_even_share_of_what_remains() -> None:
    """Near the end every slot still gets work: a pack takes at most remaining / (2 x slots)."""
    assert pack_size([0.01], remaining=40, slots=4) == 5
    assert pack_size([0.01], remaining=3, slots=4) == 1


def test_the_searcher_hands_out_every_key_once_in_order_then_finishes() -> None:
    keys = [f"k{i}" for i in range(30)]
    searcher = PackSearcher(keys, slots=1)
    handed = searcher.suggest("t0")["keys"]
    searcher.on_trial_result("t0", {packs.FINISHED: [[handed[0], 0.05, 0.5]]})
    while (pack := searcher.suggest("t")) != Searcher.FINISHED:
        assert 1 <= len(pack["keys"])
        handed += pack["keys"]
    assert handed == keys
    assert searcher.seconds == [0.05]


@pytest.mark.slow
def test_a_sweep_of_short_trials_runs_in_packs_and_each_trial_as_alone(tmp_path: Path) -> None:
    """16 short trials on 2 slots: Ray Tune runs fewer trials than clgrid has, every clgrid trial
    finishes once, in its own MLflow run, with the accuracy matrix it has when trained alone."""
    import ray
    from mlflow.tracking import MlflowClient

    from clgrid.spec import PipelineSpec
    from clgrid.sweep import driver
    from clgrid.sweep.layout import SweepDir
    from clgrid.train.trainer import run_trial

    spec = PipelineSpec.model_validate(tiny_spec([{"name": "naive"}, {"name": "replay", "buffer_size": 40}],
                                                 seeds=list(range(8)), storage={"root": str(tmp_path / "runs")}))
    try:
        outcome = driver.run(driver.prepare_and_connect(spec, None), progress=False)
    finally:
        ray.shutdown()
    folder = SweepDir(outcome.sweep_dir)
    ray_trials = [p for p in folder.ray.glob("*/*") if p.is_dir()]
    assert len(outcome.trials) == 16 and not outcome.failed
    assert any("+" in p.name for p in ray_trials) and len(ray_trials) < 16, [p.name for p in ray_trials]
    for t in outcome.trials:
        assert len(folder.trial(t.trial.trial_key).attempts.read_text().splitlines()) == 1
    client = MlflowClient(outcome.tracking_uri)
    assert {client.get_run(t.run_id).info.status for t in outcome.trials} == {"FINISHED"}
    for t in outcome.trials[:: 5]:  # some of them trained again alone, in this process
        alone = run_trial(t.trial, tmp_path / "alone" / t.trial.trial_key)
        assert json.loads(folder.trial(t.trial.trial_key).result.read_text())["R"] == alone.R
