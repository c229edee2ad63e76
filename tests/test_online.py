"""Issue 15: online training, hidden (task-free) boundaries, i-Blurry streams, ER-ACE and MIR."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from clgrid import spec as specs
from clgrid.benchmarks import BenchmarkSpec, load_stream
from clgrid.strategies import REGISTRY, Batch, Strategy
from clgrid.strategies.er_ace import MASKED
from clgrid.strategies.mir import interference
from clgrid.strategies.replay import Replay
from clgrid.train.trainer import Trainer, run_trial
from conftest import run_clgrid, tiny_spec, tiny_trial

ONLINE = {"online": True, "batch_size": 10, "lr": 0.01}


def digits(**bench) -> list[dict]:
    return [{"source": "digits", "scenario": "class-il", "experiences": 2, **bench}]


# ---- online --------------------------------------------------------------------------------------

class Recorder(Replay):
    """Replay that records what reaches it: hooks fired, task ids and inputs of incoming batches,
    and the experience the context shows during training."""

    needs_boundaries = ""  # its boundary hooks only record that they fired

    def __init__(self, config):
        super().__init__(config)
        self.calls: list[str] = []
        self.task_ids: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.experiences: set = set()

    def before_experience(self, ctx):
        self.calls.append("before_experience")

    def after_experience(self, ctx):
        self.calls.append("after_experience")

    def train_batch(self, batch, ctx):
        self.task_ids.append(batch.t.clone())
        self.inputs.append(batch.x.clone())
        self.experiences.add((ctx.experience_index, len(ctx.seen)))
        return super().train_batch(batch, ctx)

    def loss(self, batch, output, ctx):
        self.task_ids.append(batch.t.clone())

    def after_step(self, batch, ctx):
        self.task_ids.append(batch.t.clone())
        super().after_step(batch, ctx)


def recorded_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, boundaries: str) -> tuple[Trainer, Recorder]:
    monkeypatch.setitem(REGISTRY, "replay", Recorder)
    trainer = Trainer(tiny_trial({"name": "replay", "buffer_size": 30}, benchmarks=digits(boundaries=boundaries),
                                 train=ONLINE), tmp_path)
    trainer.run()
    return trainer, trainer.strategy


def test_online_uses_every_training_sample_exactly_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trainer, recorder = recorded_run(monkeypatch, tmp_path, "given")
    seen = torch.cat(recorder.inputs).flatten(1)
    stream = torch.cat([e.x for e in trainer.stream.train]).flatten(1)
    assert len(seen) == len(stream)  # the incoming rows; replayed ones are appended after train_batch
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, stream.tolist()))
    assert trainer.stream_steps == sum(-(-len(e.y) // 10) for e in trainer.stream.train)


@pytest.mark.parametrize("given", ["epochs: 1", "iterations: 5"])
def test_online_with_an_epoch_or_iteration_budget_is_refused_with_its_line(given: str) -> None:
    text = ("name: x\nbenchmarks: [{source: digits, scenario: class-il}]\nstrategies: [{name: naive}]\n"
            f"train:\n  online: true\n  {given}\n")
    with pytest.raises(specs.SpecError) as err:
        specs.parse_spec(text, "s.yaml")
    (problem,) = err.value.problems
    assert problem.startswith(f"s.yaml:6: train.{given.split(':')[0]}: online: true trains one pass")


def test_new_fields_at_their_defaults_keep_the_trial_keys() -> None:
    plain = tiny_trial({"name": "naive"})
    said = tiny_trial({"name": "naive"}, benchmarks=[{**digits()[0], "boundaries": "given"}],
                      train={**tiny_spec([])["train"], "online": False})
    assert said.trial_key == plain.trial_key
    assert tiny_trial({"name": "naive"}, evaluate={"every": 3}).trial_key == plain.trial_key
    assert tiny_trial({"name": "naive"}, benchmarks=digits(boundaries="hidden")).trial_key != plain.trial_key


# ---- hidden boundaries ---------------------------------------------------------------------------

def test_hidden_boundaries_fire_no_boundary_hook_and_pass_no_task_id(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    trainer, recorder = recorded_run(monkeypatch, tmp_path / "hidden", "hidden")
    assert recorder.calls == []
    assert recorder.experiences == {(-1, 0)}  # ctx shows no experience while training
    assert all(bool((t == 0).all()) for t in recorder.task_ids) and len(recorder.task_ids) > 10
    assert set(trainer.ctx.replay.column("t").tolist()) == {0}
    # the same instrument under given boundaries sees the hooks and the task ids
    _, told = recorded_run(monkeypatch, tmp_path / "given", "given")
    assert told.calls == ["before_experience", "after_experience"] * 2
    assert 1 in torch.cat(told.task_ids).tolist()


def test_ewc_with_hidden_boundaries_is_refused_by_validate_naming_it(tmp_path: Path) -> None:
    spec = tiny_spec([{"name": "naive"}, {"name": "ewc"}], benchmarks=digits(boundaries="hidden"))
    path = tmp_path / "ewc.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_clgrid("validate", str(path))
    assert result.returncode == 2
    assert "strategy 'ewc' (EWC) needs experience boundaries" in result.stderr + result.stdout
    assert "boundaries: hidden" in result.stderr + result.stdout
    skipped = specs.expand(specs.PipelineSpec.model_validate({**spec, "unsupported": "skip"}))
    assert [t.strategy.name for t in skipped] == ["naive"]


@pytest.mark.parametrize("name", ["naive", "replay", "der", "agem", "gdumb", "er_ace", "mir"])
def test_boundary_free_strategies_run_hidden_and_resume_exactly(name: str, tmp_path: Path) -> None:
    assert REGISTRY[name].needs_boundaries == ""
    config = {"name": name} if name == "naive" else {"name": name, "buffer_size": 40}
    trial = tiny_trial(config, benchmarks=digits(boundaries="hidden"), train={**ONLINE, "optimizer": "adam"},
                       evaluate={"every": 7, "subset": 30})
    full = run_trial(trial, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "exp-001.pt").unlink()
    resumed = run_trial(trial, tmp_path / "resumed")
    assert resumed.R == full.R and resumed.continual == full.continual


def test_a_boundary_hook_is_declared_where_it_is_added() -> None:
    """Every boundary-free strategy's boundary hooks come from a class that declared itself
    boundary-free; ssl_pretrain, replay with a pretraining before_experience, is not."""
    assert REGISTRY["ssl_pretrain"].needs_boundaries
    for name, cls in REGISTRY.items():
        if not cls.needs_boundaries:
            for klass in cls.__mro__[: cls.__mro__.index(Strategy)]:
                if {"before_experience", "after_experience"} & vars(klass).keys():
                    assert vars(klass).get("needs_boundaries") == "", (name, klass)


def test_a_memory_fills_per_batch_with_hidden_boundaries(tmp_path: Path) -> None:
    trainer = Trainer(tiny_trial({"name": "agem", "buffer_size": 40}, benchmarks=digits(boundaries="hidden"),
                                 train=ONLINE), tmp_path)
    trainer.run()
    labels = set(trainer.ctx.replay.column("y").tolist())
    assert len(trainer.ctx.replay) == 40 and labels & set(trainer.stream.train[0].classes) \
        and labels & set(trainer.stream.train[1].classes)


def test_naive_lr_scale_holds_with_hidden_boundaries(tmp_path: Path) -> None:
    trainer = Trainer(tiny_trial({"name": "naive", "lr_scale": 0.1}, benchmarks=digits(boundaries="hidden"),
                                 train=ONLINE), tmp_path)
    trainer.run()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [pytest.approx(0.001)]


@pytest.mark.parametrize("bench,why", [({"scenario": "task-il", "boundaries": "hidden"}, "task-il needs"),
                                        ({"scenario": "task-il", "blurry": {"disjoint": 0.5, "blur": 0.1}},
                                         "blurry streams are class-il")])
def test_settings_a_scenario_cannot_have_are_refused(bench: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        BenchmarkSpec(source="digits", **{"scenario": "class-il", **bench})


# ---- blurry ----------------------------------------------------------------------------------------

def blurry(seed: int, disjoint: float = 0.5, blur: float = 0.1):
    spec = BenchmarkSpec(source="digits", scenario="class-il", experiences=5, shuffle_classes=True,
                         blurry={"disjoint": disjoint, "blur": blur})
    return load_stream(spec, seed)


def test_blurry_stream_keeps_disjoint_classes_home_and_leaks_the_blur_fraction() -> None:
    stream = blurry(3)
    home = {c: e.index for e in stream.test for c in e.classes}
    counts = {c: [int((e.y == c).sum()) for e in stream.train] for c in home}
    spread = {c for c, n in counts.items() if sum(1 for k in n if k) > 1}
    assert len(spread) == 5  # disjoint 0.5 of 10 classes: the other 5 are blurry and do leak
    for c, n in counts.items():
        total, away = sum(n), sum(n) - n[home[c]]
        assert away == (round(0.1 * total) if c in spread else 0), (c, n)
    for e in stream.train:
        assert e.classes == tuple(sorted(set(e.y.tolist())))
    assert sum(len(e.y) for e in stream.train) == sum(sum(n) for n in counts.values())


def test_blurry_stream_is_seeded() -> None:
    same = [blurry(3), blurry(3)]
    assert all(torch.equal(a.y, b.y) for a, b in zip(same[0].train, same[1].train))
    assert any(not torch.equal(a.y, b.y) for a, b in zip(same[0].train, blurry(4).train))
    assert [len(e.y) for e in blurry(3, disjoint=1.0).train] == [len(e.y) for e in blurry(3, blur=0.0).train]


# ---- ER-ACE and MIR ----------------------------------------------------------------------------------

def test_er_ace_masks_absent_classes_for_incoming_rows_and_unseen_ones_for_replayed_rows(tmp_path: Path) -> None:
    trainer = Trainer(tiny_trial({"name": "er_ace", "buffer_size": 10}), tmp_path)
    strategy, ctx = trainer.strategy, trainer.ctx
    ctx.replay.insert({"x": torch.zeros(4, 1, 8, 8), "y": torch.tensor([0, 0, 1, 1]), "t": torch.zeros(4, dtype=torch.long)})
    incoming = Batch(torch.ones(3, 1, 8, 8), torch.tensor([2, 3, 2]), torch.zeros(3, dtype=torch.long))
    batch = strategy.train_batch(incoming, ctx)
    assert len(batch) == 3 + 4 and strategy.seen.nonzero().squeeze(1).tolist() == [2, 3]  # memory labels aside
    strategy.seen[[0, 1]] = True  # as if the memory's classes had arrived earlier
    output = torch.randn(len(batch), 10, requires_grad=True)
    loss = strategy.task_loss(batch, output, ctx)
    new, old = output[:3], output[3:]
    expected = F.cross_entropy(new[:, [2, 3]], torch.tensor([0, 1, 0])) \
        + F.cross_entropy(old[:, [0, 1, 2, 3]], batch.y[3:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert (output.grad[:3, [0, 1, 4, 5, 6, 7, 8, 9]] == 0).all() and (output.grad[:3, [2, 3]] != 0).all()
    assert (output.grad[3:, 4:] == 0).all() and (output.grad[3:, :4] != 0).any()
    assert MASKED < -1e6


def test_mir_replays_the_samples_a_virtual_step_would_hurt_most(tmp_path: Path) -> None:
    """One linear layer on 2 features. The incoming batch (feature 0 -> class 1) pushes class 1 up
    along feature 0: the stored class-0 samples with a large feature 0 suffer most, in that order;
    a class-0 sample on feature 1 only is untouched and a class-1 sample gains."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    forward = lambda x, t: model(x)  # noqa: E731
    incoming = Batch(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), torch.zeros(1, dtype=torch.long))
    candidates = {"x": torch.tensor([[0.2, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.0], [2.0, 0.0]]),
                  "y": torch.tensor([0, 0, 0, 1, 0]), "t": torch.zeros(5, dtype=torch.long)}
    wrapped = type("M", (nn.Module,), {"forward": lambda self, x, t: self.inner(x)})()
    wrapped.inner = model
    scores = interference(wrapped, lambda s, t: s, incoming, candidates, lr=0.5)
    assert scores.argsort(descending=True)[:3].tolist() == [2, 4, 0]
    assert scores[1] == 0 and scores[3] < 0
    # the same by hand: after w -= lr * grad, each candidate's loss minus its loss now
    loss = F.cross_entropy(forward(incoming.x, None), incoming.y)
    (grad,) = torch.autograd.grad(loss, [model.weight])
    after = F.cross_entropy(candidates["x"] @ (model.weight - 0.5 * grad).T, candidates["y"], reduction="none")
    before = F.cross_entropy(model(candidates["x"]), candidates["y"], reduction="none")
    assert torch.allclose(scores, (after - before).detach())
    assert model.weight.abs().sum() == 0  # the virtual step left the model alone

    trainer = Trainer(tiny_trial({"name": "mir", "buffer_size": 10, "candidates": 5, "replay_batch_size": 2}), tmp_path)
    trainer.ctx.model = wrapped
    trainer.ctx.replay.insert(candidates)
    batch = trainer.strategy.train_batch(incoming, trainer.ctx)
    assert batch.x[1:].tolist() == candidates["x"][[2, 4]].tolist()
