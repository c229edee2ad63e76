"""The GPU path, tested on CPU: mixed precision in the trainer's step, data placement, channels_last,
and where Ray puts fractional-GPU trials (a CPU-only Ray instance that declares two GPUs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from clgrid.errors import SpecError
from clgrid.spec import PipelineSpec, problems
from clgrid.strategies import REGISTRY
from clgrid.train import models
from clgrid.train.placement import DeviceData, fits_on_device
from clgrid.train.precision import DTYPES
from clgrid.train.trainer import Trainer, run_trial
from conftest import run_clgrid, tiny_spec, tiny_trial
from test_strategy_contract import MLP_ONLY, trains_and_resumes


def precise(strategy: str, precision: str, **overrides):
    scenario = REGISTRY[strategy].scenarios[0]
    return tiny_trial({"name": strategy}, scenario, train={"iterations": 6, "batch_size": 32, "lr": 0.01,
                                                           "precision": precision}, **overrides)


# ---- mixed precision ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_strategy_keeps_its_contract_under_bf16_autocast(name: str, tmp_path: Path) -> None:
    full, resumed = trains_and_resumes(precise(name, "bf16"), tmp_path)
    assert all(math.isfinite(a) for row in full.R for a in row)
    assert resumed.R == full.R and resumed.b == full.b


CASES = [(name, scenario) for name, cls in sorted(REGISTRY.items()) for scenario in cls.scenarios]


@pytest.mark.parametrize("name,scenario", CASES)
def test_every_strategy_and_scenario_trains_under_fp16(name: str, scenario: str, tmp_path: Path) -> None:
    """fp16 cannot hold the task-IL mask's -1e9 nor is it what a replay store keeps: scores leave
    the model in fp32 (DER's stored logits, er_ace's and the trainer's masks)."""
    trial = tiny_trial({"name": name}, scenario, train={"iterations": 4, "batch_size": 32, "lr": 0.01,
                                                        "precision": "fp16"})
    result = run_trial(trial, tmp_path)
    assert len(result.R) == 2 and all(math.isfinite(a) and 0 <= a <= 1 for row in result.R for a in row)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_multi_head_task_il_scores_are_fp32_under_autocast(precision: str, tmp_path: Path) -> None:
    trial = tiny_trial({"name": "lwf"}, "task-il", model={"name": "mlp", "hidden": [32], "heads": "multi"},
                       train={"iterations": 4, "batch_size": 32, "lr": 0.01, "precision": precision})
    trainer = Trainer(trial, tmp_path, instrument=False)
    scores, features = set(), set()
    trainer.ctx.model.register_forward_hook(lambda m, args, out: scores.add(out.dtype))
    trainer.ctx.model.backbone.register_forward_hook(lambda m, args, out: features.add(out.dtype))
    result = trainer.run()
    assert scores == {torch.float32} and features == {DTYPES[precision]}
    assert all(math.isfinite(a) for row in result.R for a in row)


def _dtypes_seen(trial, tmp_path: Path) -> dict[bool, set[torch.dtype]]:
    """The dtypes of the backbone's features while training (True) and while evaluating (False)."""
    trainer = Trainer(trial, tmp_path, instrument=False)
    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
    trainer.ctx.model.backbone.register_forward_hook(lambda m, args, out: seen[m.training].add(out.dtype))
    trainer.run()
    return seen


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_the_step_and_evaluation_run_in_the_spec_precision(precision: str, dtype: torch.dtype, tmp_path: Path) -> None:
    seen = _dtypes_seen(precise("naive", precision), tmp_path)
    assert seen == {True: {dtype}, False: {dtype}}


def test_fp32_is_the_default_and_keeps_the_trial_keys_it_had(tmp_path: Path) -> None:
    default, explicit = tiny_trial({"name": "naive"}), precise("naive", "fp32")
    assert "precision" not in default.model_dump(mode="json")["train"]  # the dump hashed into config_key
    assert explicit.trial_key == tiny_trial({"name": "naive"}, train={"iterations": 6, "batch_size": 32,
                                                                      "lr": 0.01}).trial_key
    assert precise("naive", "bf16").trial_key != explicit.trial_key


def test_a_wrong_precision_is_refused_with_its_line() -> None:
    import yaml

    text = yaml.safe_dump(tiny_spec([{"name": "naive"}], train={"iterations": 2, "precision": "fp8"}),
                          sort_keys=False)
    with pytest.raises(SpecError) as err:
        problems.parse_spec(text, "s.yaml")
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "fp8" in l)
    (problem,) = err.value.problems
    assert problem.startswith(f"s.yaml:{line}: train.precision:") and "'bf16'" in problem


def _gradient_norms(trial, tmp_path: Path) -> tuple[Trainer, list[float]]:
    """The gradient norm every ``after_backward`` sees."""
    trainer = Trainer(trial, tmp_path, instrument=False)
    norms, after_backward = [], trainer.strategy.after_backward

    def seeing(batch, ctx) -> None:
        grads = [p.grad for p in ctx.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        after_backward(batch, ctx)

    trainer.strategy.after_backward = seeing
    return trainer, norms


def test_fp16_hooks_see_unscaled_gradients(tmp_path: Path) -> None:
    trainer, fp16 = _gradient_norms(precise("naive", "fp16"), tmp_path / "fp16")
    trainer.run()
    assert trainer.amp.scaler.get_scale() >= 2.0 ** 10  # the loss was scaled up by that much
    reference, fp32 = _gradient_norms(precise("naive", "fp32"), tmp_path / "fp32")
    reference.run()
    assert len(fp16) == len(fp32) == 12
    # fp16 products round to 3 decimal digits; a scaled gradient would be 2**16 times larger
    assert fp16 == pytest.approx(fp32, rel=0.02)


def test_an_overflowed_fp16_step_is_skipped_whole_and_the_scale_shrinks(tmp_path: Path) -> None:
    trainer, seen = _gradient_norms(precise("naive", "fp16"), tmp_path)
    trainer.amp.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # any fp16 gradient overflows
    before = {n: p.clone() for n, p in trainer.ctx.model.named_parameters()}
    trainer.run()
    assert seen == []  # no after_backward saw an inf gradient
    assert all(torch.equal(before[n], p) for n, p in trainer.ctx.model.named_parameters())
    assert trainer.amp.scaler.get_scale() == 2.0 ** 60 * 0.5 ** 12 and trainer.samples_seen == 12 * 32


@pytest.mark.parametrize("name", ["naive", "gem", "ewc"])
def test_fp16_resumes_exactly_with_its_scale(name: str, tmp_path: Path) -> None:
    full, resumed = trains_and_resumes(precise(name, "fp16"), tmp_path)
    assert resumed.R == full.R and resumed.b == full.b
    assert "amp" in torch.load(tmp_path / "full" / "checkpoints" / "exp-000.pt", weights_only=True)


# ---- data placement -------------------------------------------------------------------------

GiB = 2 ** 30


def test_data_goes_to_the_device_when_it_fits_in_the_share_of_the_trials_memory() -> None:
    assert fits_on_device(4 * GiB, free_bytes=16 * GiB, total_bytes=16 * GiB, gpu_fraction=1.0, share=0.5)
    assert not fits_on_device(9 * GiB, free_bytes=16 * GiB, total_bytes=16 * GiB, gpu_fraction=1.0, share=0.5)
    # a quarter GPU: its share is of 4 GiB, not of the whole device
    assert fits_on_device(2 * GiB, 16 * GiB, 16 * GiB, gpu_fraction=0.25, share=0.5)
    assert not fits_on_device(2 * GiB + 1, 16 * GiB, 16 * GiB, gpu_fraction=0.25, share=0.5)
    # never more than is free now (other trials on the device)
    assert not fits_on_device(2 * GiB, free_bytes=3 * GiB, total_bytes=16 * GiB, gpu_fraction=1.0, share=0.5)
    assert not fits_on_device(1, 16 * GiB, 16 * GiB, gpu_fraction=1.0, share=0.0)  # share 0: always host batches


def test_on_cpu_data_stays_where_it_is_and_batches_are_the_same_rows(tmp_path: Path) -> None:
    trainer = Trainer(tiny_trial({"name": "naive"}), tmp_path, instrument=False)
    data, exp = trainer.data, trainer.stream.train[0]
    assert isinstance(data, DeviceData) and not data.resident
    x, y = data.stage(exp.x, exp.y)
    assert x is exp.x and y is exp.y
    idx = torch.tensor([3, 0, 7])
    assert torch.equal(data.rows(x, idx), exp.x[idx]) and torch.equal(data.span(y, 2, 5), exp.y[2:5])


def test_the_data_share_changes_nothing_on_cpu(tmp_path: Path) -> None:
    results = [run_trial(tiny_trial({"name": "replay", "buffer_size": 40},
                                    resources={"device_data_share": share}), tmp_path / str(share))
               for share in (0.0, 1.0)]
    assert results[0].R == results[1].R
    hashes = {PipelineSpec.model_validate(tiny_spec([{"name": "naive"}], resources={"device_data_share": share}))
              .spec_hash for share in (0.0, 1.0)}
    assert len(hashes) == 1  # where data lives is operational: the sweep stays the same sweep


# ---- channels_last --------------------------------------------------------------------------

def test_channels_last_on_cuda_for_convolutional_models_only() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert models.uses_channels_last(models.ModelSpec(name="cnn"), cuda)
    assert models.uses_channels_last(models.ModelSpec(name="resnet18"), cuda)
    assert not models.uses_channels_last(models.ModelSpec(name="mlp"), cuda)
    assert not models.uses_channels_last(models.ModelSpec(name="cnn"), cpu)  # CPU matrices stay as they were


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - MLP_ONLY))
def test_every_strategy_trains_a_channels_last_cnn(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What CUDA runs (NHWC weights), forced on CPU: no strategy's gradient code assumes NCHW strides."""
    monkeypatch.setattr(models, "uses_channels_last", lambda spec, device: spec.name in ("cnn", "resnet18"))
    trainer = Trainer(precise(name, "fp32", model={"name": "cnn", "channels": [4, 8]}), tmp_path, instrument=False)
    convs = [m for m in trainer.ctx.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    result = trainer.run()
    assert all(math.isfinite(a) for row in result.R for a in row)


# ---- fractional GPUs through Ray --------------------------------------------------------------

@pytest.fixture(scope="module")
def two_gpu_ray():
    """A local Ray instance that declares two GPUs on this GPU-less machine."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_places_four_quarter_gpu_trials_on_each_of_two_gpus(two_gpu_ray, tmp_path: Path) -> None:
    def placed(index: int) -> dict:
        """A trial's placement: what Ray gave it, held until all eight hold theirs."""
        import os
        import time

        import ray

        mine = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpu_ids": [str(i) for i in ray.get_gpu_ids()], "pid": os.getpid(), "ready": time.time()}
        (tmp_path / f"ready-{index}").touch()
        while len(list(tmp_path.glob("ready-*"))) < 8:
            time.sleep(0.05)
        return mine | {"released": time.time()}

    task = two_gpu_ray.remote(placed).options(num_gpus=0.25, num_cpus=0, max_retries=0)
    ran = two_gpu_ray.get([task.remote(i) for i in range(8)], timeout=300)
    assert sorted(c["cuda_visible_devices"] for c in ran) == ["0"] * 4 + ["1"] * 4
    assert all(c["gpu_ids"] == [c["cuda_visible_devices"]] for c in ran)
    assert len({c["pid"] for c in ran}) == 8
    assert max(c["ready"] for c in ran) < min(c["released"] for c in ran)  # all eight at once


def test_the_gpu_bench_runs_concurrent_fractional_trials_through_ray(two_gpu_ray) -> None:
    from clgrid.bench.gpu import concurrent_trials, throughput

    trial = tiny_trial({"name": "naive"}, train={"iterations": 2, "batch_size": 16},
                       resources={"gpus_per_trial": 0.5})
    ran = concurrent_trials(trial, copies=2, fraction=0.5)
    assert [c["cuda_visible_devices"] for c in ran] == ["0", "0"]  # two halves share the first GPU
    assert max(c["ready"] for c in ran) <= min(c["start"] for c in ran)  # both built before either trains
    assert all(c["samples"] == 2 * 2 * 16 and c["train_seconds"] > 0 for c in ran)
    assert throughput(ran) == pytest.approx(128 / (max(c["end"] for c in ran) - min(c["start"] for c in ran)))


def test_bench_device_cuda_without_cuda_is_one_line_and_exit_2() -> None:
    proc = run_clgrid("bench", "--device", "cuda", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr


def test_clgrid_list_prints_the_new_fields(capsys: pytest.CaptureFixture) -> None:
    from clgrid import cli

    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "precision: 'fp32' (one of fp32 | bf16 | fp16)" in out and "device_data_share: 0.5" in out
