"""What keeps short sweeps efficient: the longest expected trials start first, and a Ray worker
loading the trainable does not import torch before a trial needs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from clgrid.spec import PipelineSpec, expand, load_spec
from clgrid.spec.grid import expected_work
from clgrid.sweep.layout import SweepDir
from conftest import run_clgrid, tiny_spec


def test_expected_work_orders_the_quickstart_joint_ewc_replay_naive() -> None:
    work = {t.strategy.name: expected_work(t) for t in expand(load_spec("quickstart"))}
    assert work["joint"] > work["ewc"] > work["replay"] > work["naive"] > 0


def test_expected_work_grows_with_epochs_and_with_domain_il_experiences() -> None:
    def work(scenario: str, experiences: int, epochs: int) -> float:
        spec = tiny_spec([{"name": "naive"}], scenario, train={"epochs": epochs, "batch_size": 32})
        spec["benchmarks"][0]["experiences"] = experiences
        return expected_work(expand(PipelineSpec.model_validate(spec))[0])

    assert work("class-il", 2, 2) == 2 * work("class-il", 2, 1)
    assert work("class-il", 5, 1) == work("class-il", 2, 1)  # the same data, split finer
    assert work("domain-il", 4, 1) == 2 * work("domain-il", 2, 1)  # every experience holds all of it


def test_trials_start_longest_expected_first(tmp_path: Path) -> None:
    spec = tiny_spec([{"name": "naive"}, {"name": "replay", "buffer_size": 20}, {"name": "ewc"}, {"name": "joint"}],
                     resources={"cpus_per_trial": 1, "max_concurrent": 1}, train={"epochs": 1, "batch_size": 64})
    spec["benchmarks"][0]["experiences"] = 5  # joint's epochs over the union: 1 + 2 + ... + 5 experiences
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = run_clgrid("run", str(tmp_path / "spec.yaml"), "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = next((tmp_path / "runs" / "sweeps").iterdir())
    keys = {t["trial_key"]: t["trial"]["strategy"]["name"] for t in json.loads((sweep / "sweep.json").read_text())["trials"]}
    started = sorted(keys, key=lambda k: float(SweepDir(sweep).trial(k).attempts.read_text().split()[0]))
    assert [keys[k] for k in started] == ["joint", "ewc", "replay", "naive"]


def test_loading_the_trainable_does_not_import_torch() -> None:
    """A Ray worker unpickles the trainable by importing clgrid.sweep.trial: torch (and the trainer)
    load when the first trial runs, not while the worker waits."""
    code = "import sys, clgrid.sweep.trial; print(sorted(m for m in ('torch', 'clgrid.train.trainer') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
