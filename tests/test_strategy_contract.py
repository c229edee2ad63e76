"""The contract every registered strategy keeps (run for each entry of the registry)."""

from __future__ import annotations

import ast
import shutil
import typing
from pathlib import Path

import pytest
from annotated_types import Ge, Gt
from pydantic import ValidationError

from torch import nn

from clgrid.spec import TrialSpec
from clgrid.strategies import REGISTRY
from clgrid.train import trainer
from clgrid.train.models import CLModel, ModelSpec, MultiHead
from clgrid.train.trainer import run_trial
from conftest import REPO, tiny_trial

CASES = [(name, scenario) for name, cls in sorted(REGISTRY.items()) for scenario in cls.scenarios]


# Strategies that build their own task MLPs or mask weights per task refuse other backbones
# (they say so with a ValueError); every other strategy must train a BatchNorm model.
MLP_ONLY = {"den", "hat", "packnet", "progressive"}


def batchnorm_model(spec: ModelSpec, input_shape: tuple[int, int, int], num_classes: int,
                    task_classes: list[tuple[int, ...]], scenario: str) -> CLModel:
    """A two-block conv net with BatchNorm: the ResNet-18's layer kinds at a size a test affords."""
    blocks: list[nn.Module] = []
    channels = input_shape[0]
    for width, stride in ((8, 1), (16, 2)):
        blocks += [nn.Conv2d(channels, width, 3, stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    backbone = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.out_features = channels
    if scenario == "task-il" and spec.heads == "multi":
        return CLModel(backbone, MultiHead(channels, task_classes, num_classes))
    return CLModel(backbone, nn.Linear(channels, num_classes))


@pytest.mark.parametrize("name,scenario", CASES)
def test_trains_two_experiences_and_resumes_exactly(name: str, scenario: str, tmp_path: Path) -> None:
    full, resumed = trains_and_resumes(tiny_trial({"name": name}, scenario), tmp_path)
    assert resumed.R == full.R and resumed.b == full.b


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_trains_a_batchnorm_model_and_resumes_exactly(name: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "build_model", batchnorm_model)
    trial = tiny_trial({"name": name}, REGISTRY[name].scenarios[0])
    if name in MLP_ONLY:
        with pytest.raises(ValueError, match="MLP|batch-norm"):
            run_trial(trial, tmp_path / "full")
        return
    full, resumed = trains_and_resumes(trial, tmp_path)
    assert resumed.R == full.R and resumed.b == full.b


def trains_and_resumes(trial: TrialSpec, tmp_path: Path) -> tuple:
    """The trial run through, and run again from the folder a crash during experience 1 leaves."""
    full = run_trial(trial, tmp_path / "full")
    assert len(full.R) == 2 and all(len(row) == 2 for row in full.R)
    assert all(0.0 <= a <= 1.0 for row in full.R for a in row)
    assert full.costs["train_flops"] > 0 and full.costs["model_bytes"] > 0

    # A fresh trainer (a fresh strategy instance) that finds the trial folder as a crash during
    # experience 1 leaves it (the last checkpoint is after experience 0, the replay store may hold
    # newer manifests) must continue to the same matrix as the uninterrupted run.
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "exp-001.pt").unlink()
    return full, run_trial(trial, tmp_path / "resumed")


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
