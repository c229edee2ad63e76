"""The loop: determinism, resume, task-IL masking, and cost meters checked against hand counts."""

import shutil
from pathlib import Path

import torch

from clgrid.train.trainer import Trainer, run_trial
from conftest import tiny_trial


def test_same_spec_and_seed_give_the_same_accuracy_matrix(tmp_path: Path) -> None:
    trial = tiny_trial({"name": "replay", "buffer_size": 50}, train={"epochs": 1, "batch_size": 32, "lr": 0.01})
    first = run_trial(trial, tmp_path / "a")
    second = run_trial(trial, tmp_path / "b")
    assert first.R == second.R and first.b == second.b
    other_seed = run_trial(trial.model_copy(update={"seed": 1}), tmp_path / "c")
    assert other_seed.R != first.R


def test_a_finished_trial_folder_resumes_without_training(tmp_path: Path) -> None:
    trial = tiny_trial({"name": "naive"})
    first = run_trial(trial, tmp_path)
    again = run_trial(trial, tmp_path)
    assert again.R == first.R
    assert again.costs["samples_seen"] == first.costs["samples_seen"]  # restored, not re-counted


def test_flops_are_counted_by_torch_and_match_the_hand_count(tmp_path: Path) -> None:
    # MLP 64 -> 32 -> 10 on digits: per sample, forward 2*in*out per layer; backward 2*in*out for
    # each weight gradient, plus 2*in*out for the input gradient of every layer but the first.
    trial = tiny_trial({"name": "naive"})
    result = run_trial(trial, tmp_path)
    per_sample = 2 * 64 * 32 * 2 + 2 * 32 * 10 * 3
    assert result.costs["samples_seen"] == 2 * 6 * 32
    assert result.costs["train_flops"] == per_sample * result.costs["samples_seen"]


def test_task_il_masks_scores_outside_the_task(tmp_path: Path) -> None:
    trainer = Trainer(tiny_trial({"name": "naive"}, "task-il"), tmp_path)
    scores = trainer.masked(torch.zeros(2, 10), torch.tensor([0, 1]))
    task0, task1 = trainer.stream.task_classes
    assert (scores[0, list(task0)] == 0).all() and (scores[0, list(task1)] < -1e8).all()
    assert (scores[1, list(task1)] == 0).all() and (scores[1, list(task0)] < -1e8).all()


def test_multi_head_model_trains_and_resumes(tmp_path: Path) -> None:
    trial = tiny_trial({"name": "ewc"}, "task-il", model={"name": "mlp", "hidden": [32], "heads": "multi"},
                       train={"epochs": 3, "batch_size": 32, "lr": 0.01})
    full = run_trial(trial, tmp_path / "full")
    assert min(full.R[1]) > 0.8  # two 5-way tasks, task labels given at test time
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "exp-001.pt").unlink()
    assert run_trial(trial, tmp_path / "resumed").R == full.R


def test_without_instrumentation_nothing_is_written(tmp_path: Path) -> None:
    result = Trainer(tiny_trial({"name": "naive"}), tmp_path / "t", instrument=False).run()
    assert len(result.R) == 2
    assert result.costs["train_flops"] == 0
    assert not (tmp_path / "t").exists()


def test_joint_pays_for_the_data_it_keeps(tmp_path: Path) -> None:
    # joint trains on every experience seen: its storage cost grows by each experience's samples
    trainer = Trainer(tiny_trial({"name": "joint"}), tmp_path)
    result = trainer.run()
    kept = [e.x.nbytes + e.y.nbytes for e in trainer.stream.train]
    assert [h.costs["strategy_state_bytes"] for h in result.history] == [kept[0], kept[0] + kept[1]]
    assert run_trial(tiny_trial({"name": "naive"}), tmp_path / "naive").costs["strategy_state_bytes"] == 0


def test_peak_memory_is_the_trials_own_in_a_reused_process(tmp_path: Path) -> None:
    # Ray reuses a worker for several trials: an earlier, bigger peak must not be reported again
    from clgrid.train.costs import peak_memory_bytes

    big = bytearray(1 << 30)
    big[::4096] = b"\x01" * len(big[::4096])  # touch every page: 1 GiB resident
    del big
    earlier = peak_memory_bytes(torch.device("cpu"))
    result = run_trial(tiny_trial({"name": "naive"}), tmp_path)
    assert 0 < result.costs["peak_memory_bytes"] < earlier - (512 << 20)
