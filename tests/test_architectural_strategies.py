"""Strategies that change the network: what they freeze stays bitwise fixed, what they grow grows as
designed, and a trial resumes although the model's shape changed (tiny task-IL trials on digits)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from clgrid.train.trainer import Trainer, run_trial
from conftest import tiny_trial


def run_with_snapshots(strategy: dict, trial_dir: Path, scenario: str = "task-il", experiences: int = 5, **train):
    """Runs a trial; returns the result, the model's state after every experience (with the scores
    it gives the first test experience under ``"scores"``), the trainer and the trial."""
    trial = tiny_trial(strategy, scenario, model={"name": "mlp", "hidden": [16, 16], "heads": "multi"},
                       train={"iterations": 20, "batch_size": 32, "lr": 0.01, **train},
                       benchmarks=[{"source": "digits", "scenario": scenario, "experiences": experiences, "validation": 0}])
    snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(report) -> None:
        ctx, first = trainer.ctx, trainer.stream.test[0]
        ctx.model.eval()  # as the trainer evaluates; its next experience sets train mode again
        with torch.no_grad():
            scores = trainer.strategy.predict(first.x, torch.zeros_like(first.y), ctx)
        snapshots.append({"scores": scores, **{k: v.clone() for k, v in ctx.model.state_dict().items()}})

    trainer = Trainer(trial, trial_dir, on_experience=snapshot)
    return trainer.run(), snapshots, trainer, trial


def assert_nothing_forgotten(R: list[list[float]], snapshots: list[dict[str, torch.Tensor]]) -> None:
    for j in range(len(R)):
        assert [row[j] for row in R[j:]] == [R[j][j]] * (len(R) - j), f"accuracy on experience {j} moved: {R}"
    assert all(torch.equal(s["scores"], snapshots[0]["scores"]) for s in snapshots), "scores on experience 0 moved"


def assert_resumes_after(experience: int, trial, full, tmp_path: Path) -> None:
    folder = tmp_path / "resumed" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / f"exp-{experience:03d}.pt", folder)
    assert run_trial(trial, tmp_path / "resumed").R == full.R


def test_progressive_grows_a_column_per_experience_and_never_touches_earlier_ones(tmp_path: Path) -> None:
    result, snapshots, trainer, trial = run_with_snapshots({"name": "progressive"}, tmp_path / "full")
    # digits: 64 inputs, hidden [16, 16], 2 classes a task. Column k: its own layers, plus laterals
    # from each of the k earlier columns into its second layer and its head.
    column, lateral = 64 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2, 16 * 16 + 16 * 2
    params = [(k + 1) * column + k * (k + 1) // 2 * lateral for k in range(5)]
    assert [h.costs["model_bytes"] for h in result.history] == [4 * p for p in params]
    assert [h.costs["strategy_state_bytes"] for h in result.history] == [0] * 5
    for k, before in enumerate(snapshots[:-1]):
        column_k = {n: v for n, v in before.items() if n.startswith(f"columns.{k}.")}
        assert column_k
        assert all(torch.equal(v, snapshots[-1][n]) for n, v in column_k.items())
    assert_nothing_forgotten(result.R, snapshots)
    assert_resumes_after(3, trial, result, tmp_path)  # four columns to rebuild before the weights load


def test_packnet_each_task_keeps_half_the_free_weights_and_they_never_move_again(tmp_path: Path) -> None:
    result, snapshots, trainer, trial = run_with_snapshots({"name": "packnet", "prune_ratio": 0.5}, tmp_path / "full")
    owner = trainer.strategy.owner
    for name, o in owner.items():
        shares = [float((o == task).float().mean()) for task in range(5)]
        assert shares == [0.5, 0.25, 0.125, 0.0625, 0.03125], (name, shares)  # each task keeps half of what was free
        weight = snapshots[-1][name]
        assert torch.all(weight[o == -1] == 0), "released weights must be zero"
        for task, after_task in enumerate(snapshots):
            assert torch.equal(after_task[name][o == task], weight[o == task]), f"{name}: task {task}'s weights moved"
    assert trainer.costs().strategy_state_bytes == sum(o.numel() for o in owner.values())  # one byte a weight
    assert_nothing_forgotten(result.R, snapshots)
    assert_resumes_after(3, trial, result, tmp_path)


def test_feature_extraction_freezes_the_backbone_after_the_first_experience(tmp_path: Path) -> None:
    result, snapshots, _, _ = run_with_snapshots({"name": "feature_extraction"}, tmp_path / "full")
    for name, value in snapshots[0].items():
        same = torch.equal(value, snapshots[-1][name])
        if name.startswith("backbone."):
            assert same, f"{name} changed after experience 0"
        elif name.startswith("head.heads.4."):
            assert not same, f"{name}: the last task's head did not train"
    assert_nothing_forgotten(result.R, snapshots)


def test_finetune_layers_freezes_scales_and_reinitialises_per_group(tmp_path: Path) -> None:
    # A tiny learning rate: fine-tuned weights barely move, a re-initialised group jumps.
    strategy = {"name": "finetune_layers", "layers": {"backbone.0": "frozen", "head": "reinit"}, "lr_scale": 0.5}
    _, snapshots, trainer, _ = run_with_snapshots(strategy, tmp_path / "full", scenario="class-il",
                                                  experiences=2, lr=1e-6, iterations=2)
    before, after = snapshots  # backbone.layers.1 and .3: the Linear layers backbone.0 and backbone.1
    moved = {n: float((after[n] - before[n]).abs().max()) for n in before}
    assert moved["backbone.layers.1.weight"] == 0 and moved["backbone.layers.1.bias"] == 0
    assert 0 < moved["backbone.layers.3.weight"] < 1e-4
    assert moved["head.weight"] > 1e-2
    assert sorted(g["lr"] for g in trainer.optimizer.param_groups) == [0.5e-6, 1e-6]


def test_hat_holds_the_weights_between_units_the_first_task_opened(tmp_path: Path) -> None:
    result, snapshots, _, trial = run_with_snapshots({"name": "hat"}, tmp_path / "full")
    first, last = snapshots[0], snapshots[-1]
    # after experience 0, task 0's gates at s_max: open where its embedding is positive
    opened = [first[f"embeddings.{l}.weight"][0] > 0 for l in range(2)]
    assert all(o.any() and not o.all() for o in opened)
    held = [opened[0].unsqueeze(1), opened[1].unsqueeze(1) & opened[0].unsqueeze(0)]
    for l in range(2):
        weight, bias = f"layers.{l}.weight", f"layers.{l}.bias"
        assert torch.equal(first[weight][held[l].expand_as(first[weight])], last[weight][held[l].expand_as(last[weight])])
        assert torch.equal(first[bias][opened[l]], last[bias][opened[l]])
        assert not torch.equal(first[weight], last[weight]), "later tasks must still train the free weights"
    assert torch.equal(first["embeddings.0.weight"][0], last["embeddings.0.weight"][0])
    assert_nothing_forgotten(result.R, snapshots)
    assert_resumes_after(3, trial, result, tmp_path)
