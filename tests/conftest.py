"""Shared helpers: tiny real trials on scikit-learn's digits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_spec(strategies: list[dict], scenario: str = "class-il", **overrides) -> dict:
    """A pipeline spec (as a dict) on digits with 2 experiences and a few steps each."""
    bench = {"source": "digits", "scenario": scenario, "experiences": 2}
    if scenario == "domain-il":
        bench["domain"] = "permuted"
    spec = {
        "name": "tiny",
        "benchmarks": [bench],
        "strategies": strategies,
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"iterations": 6, "batch_size": 32, "lr": 0.01},
        "seeds": [0],
    }
    spec.update(overrides)
    return spec


def tiny_trial(strategy: dict, scenario: str = "class-il", **overrides):
    from clgrid.spec import PipelineSpec, expand

    return expand(PipelineSpec.model_validate(tiny_spec([strategy], scenario, **overrides)))[0]


def run_clgrid(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("clgrid")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def artifacts_dir() -> Path:
    path = REPO / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path
