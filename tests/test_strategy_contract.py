"""The contract every registered strategy keeps (run for each entry of the registry)."""

from __future__ import annotations

import ast
import shutil
import typing
from pathlib import Path

import pytest
from annotated_types import Ge, Gt
from pydantic import ValidationError

from clgrid.strategies import REGISTRY
from clgrid.train.trainer import run_trial
from conftest import REPO, tiny_trial

CASES = [(name, scenario) for name, cls in sorted(REGISTRY.items()) for scenario in cls.scenarios]


@pytest.mark.parametrize("name,scenario", CASES)
def test_trains_two_experiences_and_resumes_exactly(name: str, scenario: str, tmp_path: Path) -> None:
    trial = tiny_trial({"name": name}, scenario)
    full = run_trial(trial, tmp_path / "full")
    assert len(full.R) == 2 and all(len(row) == 2 for row in full.R)
    assert all(0.0 <= a <= 1.0 for row in full.R for a in row)
    assert full.costs["train_flops"] > 0 and full.costs["model_bytes"] > 0

    # A fresh trainer (a fresh strategy instance) that finds the trial folder as a crash during
    # experience 1 leaves it (the last checkpoint is after experience 0, the replay store may hold
    # newer manifests) must continue to the same matrix as the uninterrupted run.
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "exp-001.pt").unlink()
    resumed = run_trial(trial, tmp_path / "resumed")
    assert resumed.R == full.R
    assert resumed.b == full.b


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_config_rejects_unknown_keys_and_out_of_range_values(name: str) -> None:
    config_cls = REGISTRY[name].Config
    with pytest.raises(ValidationError, match="Extra inputs"):
        config_cls(no_such_setting=1)
    checked = 0
    for field, info in config_cls.model_fields.items():
        bound = next((m for m in info.metadata if isinstance(m, (Ge, Gt))), None)
        if bound is not None:
            low = bound.ge if isinstance(bound, Ge) else bound.gt
            bad = low - 1 if isinstance(bound, Ge) else low
            with pytest.raises(ValidationError, match=field):
                config_cls(**{field: bad})
            checked += 1
        elif typing.get_origin(info.annotation) is typing.Literal and field != "name":
            with pytest.raises(ValidationError, match=field):
                config_cls(**{field: "not-an-option"})
            checked += 1
    assert checked >= 1, f"{name}: no hyperparameter with a range or a set of options to check"


@pytest.mark.parametrize("path", sorted((REPO / "strategies").glob("*.py")), ids=lambda p: p.name)
def test_strategy_modules_import_neither_ray_mlflow_nor_pyarrow(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"ray", "mlflow", "pyarrow"}, f"{path.name} imports {imported & {'ray', 'mlflow', 'pyarrow'}}"
