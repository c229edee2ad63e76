"""The bundled pipelines: each validates and expands, and each keeps the protocol it claims.

``paper-split-mnist`` (Hsu et al. 2018 on full MNIST) cannot run here (no network): its protocol
values are checked, and a few of its trials train end to end on a tiny MNIST written in the IDX
layout by a stand-in for torchvision's download, so the pipeline is known to run where MNIST can be
downloaded.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from clgrid import spec as specs
from clgrid.benchmarks import sources

BUNDLED = specs.bundled_pipelines()
MEMORY_STRATEGIES = {"replay", "gem", "agem", "der", "icarl", "gdumb"}


def trials_of(name: str) -> list[specs.TrialSpec]:
    return specs.expand(specs.load_spec(name))


def pairs(trials: list[specs.TrialSpec]) -> set[tuple[str, str]]:
    return {(t.strategy.name, t.benchmark.scenario) for t in trials}


def test_the_bundled_pipelines_are_the_expected_ones() -> None:
    assert {"quickstart", "baselines-split-mnist5k", "architectures-split-mnist5k", "paper-split-mnist",
            "first-experiment", "first-experiment-mnist5k"} <= set(BUNDLED)


# Digits 0-4 per source in the training split: mnist5k's counted here, full MNIST's from its
# published class counts (5923 + 6742 + 5958 + 6131 + 5842; it cannot be downloaded here).
FIRST_TASK_TRAIN = {"mnist5k": None, "mnist": 30_596}


@pytest.mark.parametrize("name,source", [("first-experiment-mnist5k", "mnist5k"), ("first-experiment", "mnist")])
def test_first_experiment_keeps_its_protocol(name: str, source: str) -> None:
    """Digits 0-4 then 5-9, one linear layer, SGD lr 0.01, batch 64, one epoch each, 10 seeds;
    naive against replay of 10% of the first experience's training samples."""
    spec = specs.load_spec(name)
    (bench,) = spec.benchmarks
    assert (bench.source, bench.scenario, bench.experiences, bench.class_order) == (source, "class-il", 2, list(range(10)))
    assert bench.download is (source == "mnist")
    assert (spec.model.name, spec.model.hidden) == ("mlp", [])
    assert (spec.train.epochs, spec.train.batch_size, spec.train.optimizer, spec.train.lr) == (1, 64, "sgd", 0.01)
    assert spec.train.momentum == 0 and spec.train.weight_decay == 0
    assert spec.seeds == list(range(10))
    first_task = FIRST_TASK_TRAIN[source]
    if first_task is None:
        first_task = int((sources.load_source(source, "", False)[1] < 5).sum())
    trials = trials_of(name)
    assert {t.strategy.name for t in trials} == {"naive", "replay"}
    assert {t.strategy.buffer_size for t in trials if t.strategy.name == "replay"} == {round(first_task / 10)}


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_pipeline_validates_expands_and_says_how_to_run_it(name: str) -> None:
    spec = specs.load_spec(name)
    assert spec.name == name
    trials = specs.expand(spec)
    if spec.tune is None:
        assert trials and len({t.trial_key for t in trials}) == len(trials)
    else:  # a tuned pipeline names its trials as tuning chooses them: none before it runs
        assert not trials and specs.trial_count(spec) > 0
    text = specs.resolve_spec_path(name).read_text()
    assert f"clgrid run {name}" in text  # the header comment gives the command


def test_baselines_pipeline_covers_every_scenario_with_memories_of_200() -> None:
    spec = specs.load_spec("baselines-split-mnist5k")
    trials = trials_of("baselines-split-mnist5k")
    scenarios = {(b.source, b.scenario, b.domain if b.scenario == "domain-il" else None) for b in spec.benchmarks}
    assert scenarios == {("mnist5k", "class-il", None), ("mnist5k", "task-il", None), ("mnist5k", "domain-il", "permuted")}
    assert spec.model.hidden == [400, 400] and spec.train.batch_size == 128
    assert spec.train.optimizer == "adam" and spec.train.lr == 1e-3 and spec.seeds == [0, 1, 2]
    names = {t.strategy.name for t in trials}
    assert names == {"naive", "joint", "l2", "ewc", "si", "mas", "lwf", "replay", "der", "icarl", "gdumb", "agem", "gem"}
    assert {t.strategy.buffer_size for t in trials if t.strategy.name in MEMORY_STRATEGIES} == {200}
    assert ("icarl", "task-il") not in pairs(trials) and ("icarl", "class-il") in pairs(trials)
    assert {t.strategy.beta for t in trials if t.strategy.name == "der"} == {0.0, 0.5}  # DER and DER++


def test_architectures_pipeline_pairs_each_strategy_with_its_scenario() -> None:
    spec = specs.load_spec("architectures-split-mnist5k")
    trials = trials_of("architectures-split-mnist5k")
    assert spec.model.heads == "multi" and spec.seeds == [0, 1, 2]
    got = pairs(trials)
    for name in ("naive", "feature_extraction", "finetune_layers", "progressive", "packnet", "hat", "den"):
        assert (name, "task-il") in got, name
    for name in ("naive", "generative_replay", "ssl_pretrain"):
        assert (name, "class-il") in got, name
    assert ("progressive", "class-il") not in got and ("den", "class-il") not in got


# --- Hsu et al. 2018 on full MNIST -----------------------------------------------------------------

HSU_TABLE_2 = {"naive", "joint", "l2", "ewc", "si", "mas", "lwf", "replay", "gem", "generative_replay"}


def test_paper_pipeline_keeps_hsu_et_al_protocol() -> None:
    spec = specs.load_spec("paper-split-mnist")
    trials = trials_of("paper-split-mnist")
    for bench in spec.benchmarks:
        assert bench.source == "mnist" and bench.experiences == 5 and bench.download is True
        assert bench.data_root and bench.class_order is None and not bench.shuffle_classes
    assert {(b.scenario, b.domain if b.scenario == "domain-il" else None) for b in spec.benchmarks} == {
        ("task-il", None), ("domain-il", "split"), ("class-il", None)}
    assert spec.model.name == "mlp" and spec.model.hidden == [400, 400] and spec.model.heads == "multi"
    assert (spec.train.epochs, spec.train.iterations, spec.train.batch_size) == (4, None, 128)
    assert (spec.train.optimizer, spec.train.lr) == ("adam", 1e-3)
    assert len(spec.seeds) == 10  # the paper's 10 repeats
    names = {t.strategy.name for t in trials}
    assert HSU_TABLE_2 <= names
    assert {t.strategy.mode for t in trials if t.strategy.name == "ewc"} == {"separate", "online"}
    assert {t.strategy.mode for t in trials if t.strategy.name == "joint"} == {"offline"}
    for name in MEMORY_STRATEGIES & names:  # memory is a grid axis: 1,100 and 4,400 samples
        for scenario in {s for n, s in pairs(trials) if n == name}:
            sizes = sorted(t.strategy.buffer_size for t in trials
                           if t.strategy.name == name and t.benchmark.scenario == scenario and t.seed == 0)
            assert sizes == [1100, 4400], (name, scenario)
    for scenario in ("task-il", "domain-il", "class-il"):
        assert all((n, scenario) in pairs(trials) for n in HSU_TABLE_2), scenario


def write_tiny_mnist(root: Path, per_class: int = 12, test_per_class: int = 4) -> None:
    """A small MNIST in torchvision's gzipped IDX layout: what a real download leaves under root."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), n).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28)).astype(np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (raw / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(header + array.tobytes()))


def test_paper_pipeline_downloads_into_data_root_and_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clgrid.train.trainer import run_trial

    downloads: list[tuple[str, Path]] = []

    def fake_download(name: str, root: Path) -> None:  # torchvision's download, without the network
        downloads.append((name, root))
        write_tiny_mnist(root)

    monkeypatch.setattr(sources, "_download", fake_download)
    root = tmp_path / "data"
    chosen = [t for t in trials_of("paper-split-mnist") if t.seed == 0 and (
        (t.strategy.name == "replay" and t.strategy.buffer_size == 1100) or t.strategy.name == "naive")]
    assert len(chosen) == 6  # naive and replay-1100 in each of the three scenarios
    for trial in chosen:
        trial = trial.model_copy(update={"benchmark": trial.benchmark.model_copy(update={"data_root": str(root)})})
        result = run_trial(trial, tmp_path / trial.trial_key, instrument=False)
        assert len(result.R) == 5 and all(len(row) == 5 for row in result.R)
        assert 0.0 <= result.metrics["acc"] <= 1.0
    assert downloads == [("mnist", root)]  # once: later trials read the files in data_root
