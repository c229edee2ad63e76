"""Spec validation: every problem at once with file:line, grids, stable keys, bundled pipelines."""

from pathlib import Path

import pytest

from clgrid import spec as specs
from conftest import run_clgrid, tiny_spec

FIVE_MISTAKES = """\
name: broken
benchmarks:
  - source: mnist5k
    scenario: class-il
    experiences: 0
strategies:
  - name: naive
  - name: replay
    buffer_size: -5
  - name: ewc
    ewc_lamda: 10
train:
  batch_size: 32
  lr: fast
seeds: [0]
resources:
  gpus_per_trial: -1
"""


def test_validate_reports_all_five_mistakes_with_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(FIVE_MISTAKES)
    proc = run_clgrid("validate", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    expected = {
        5: "benchmarks.0.experiences",
        9: "strategies.1.buffer_size.0",
        11: "strategies.2.ewc_lamda",
        14: "train.lr",
        17: "resources.gpus_per_trial",
    }
    assert len(lines) == 5, proc.stderr
    for line in lines:
        file, lineno, path_, _ = line.split(":", 3)
        assert file == str(path)
        assert expected[int(lineno)] == path_.strip(), line


def test_unknown_strategy_lists_the_valid_ones() -> None:
    with pytest.raises(specs.SpecError) as err:
        specs.parse_spec("name: x\nbenchmarks: [{source: digits, scenario: class-il}]\nstrategies:\n  - name: magic\n", "s.yaml")
    (problem,) = err.value.problems
    assert problem.startswith("s.yaml:4: strategies.0.name: unknown strategy 'magic'")
    assert "naive" in problem and "replay" in problem


def test_unknown_benchmark_source_lists_the_valid_ones() -> None:
    with pytest.raises(specs.SpecError) as err:
        specs.parse_spec("name: x\nbenchmarks: [{source: imagenet, scenario: class-il}]\nstrategies: [{name: naive}]\n")
    assert "'digits'" in err.value.problems[0] and "'mnist5k'" in err.value.problems[0]


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(specs.SpecError) as err:
        specs.parse_spec("name: x\nbenchmarks: [\n  - oops: : :\n", "bad.yaml")
    assert err.value.problems[0].startswith("bad.yaml:")


def test_lists_are_grid_axes_and_expand_in_order() -> None:
    spec = specs.PipelineSpec.model_validate(tiny_spec(
        [{"name": "ewc", "ewc_lambda": [1, 10], "mode": ["separate", "online"]}, {"name": "naive"}], seeds=[0, 1]))
    trials = specs.expand(spec)
    assert len(trials) == (4 + 1) * 2
    assert [(t.strategy.name, getattr(t.strategy, "ewc_lambda", None), t.seed) for t in trials[:4]] == [
        ("ewc", 1.0, 0), ("ewc", 1.0, 1), ("ewc", 1.0, 0), ("ewc", 1.0, 1)]
    assert len({t.trial_key for t in trials}) == len(trials)
    assert len({t.config_key for t in trials}) == 5


def test_trial_keys_are_stable_and_depend_on_the_config() -> None:
    a = specs.expand(specs.PipelineSpec.model_validate(tiny_spec([{"name": "naive"}])))[0]
    b = specs.expand(specs.PipelineSpec.model_validate(tiny_spec([{"name": "naive"}])))[0]
    c = specs.expand(specs.PipelineSpec.model_validate(tiny_spec([{"name": "naive", "lr_scale": 0.1}])))[0]
    assert a.trial_key == b.trial_key != c.trial_key
    assert specs.TrialSpec.model_validate_json(a.model_dump_json()) == a


def test_grid_larger_than_the_cap_is_refused_with_the_count() -> None:
    data = tiny_spec([{"name": "ewc", "ewc_lambda": list(range(1, 51))}], seeds=list(range(5)), max_trials=100)
    with pytest.raises(specs.SpecError) as err:
        specs.parse_spec(__import__("yaml").safe_dump(data))
    assert "the grid has 250 trials" in str(err.value) and "max_trials=100" in str(err.value)


def test_every_bundled_pipeline_validates() -> None:
    names = specs.bundled_pipelines()
    assert "quickstart" in names
    for name in names:
        spec = specs.load_spec(name)
        # a tuned pipeline names its trials as tuning chooses them: none before it runs
        assert specs.trial_count(spec) > 0 and (spec.tune is not None or specs.expand(spec)), name


def test_validate_prints_the_grid_of_a_bundled_pipeline() -> None:
    proc = run_clgrid("validate", "quickstart")
    assert proc.returncode == 0, proc.stderr
    assert "12 trials = 4 configurations x 3 seeds" in proc.stdout


def test_list_shows_strategies_with_their_parameters() -> None:
    proc = run_clgrid("list")
    assert proc.returncode == 0, proc.stderr
    assert "ewc_lambda" in proc.stdout and "mnist5k" in proc.stdout and "buffer_size" in proc.stdout


def test_the_linear_model_is_an_mlp_without_hidden_layers(tmp_path: Path) -> None:
    """`hidden: []` validates and builds Flatten + one Linear layer, which trains."""
    from torch import nn

    from clgrid.train.models import build_model
    from clgrid.train.trainer import run_trial

    spec = specs.parse_spec(__import__("yaml").safe_dump(tiny_spec([{"name": "naive"}], model={"name": "mlp", "hidden": []})))
    (trial,) = specs.expand(spec)
    model = build_model(trial.model, (1, 8, 8), 10, [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)], "class-il")
    assert [type(m) for m in model.modules() if not isinstance(m, (type(model), nn.Sequential))] == [
        type(model.backbone), nn.Flatten, nn.Linear]
    assert (model.head.in_features, model.head.out_features) == (64, 10)
    result = run_trial(trial, tmp_path / "linear")
    assert len(result.R) == 2 and result.R[0][0] > 0.5


def test_strategies_that_need_hidden_layers_are_refused_with_the_linear_model() -> None:
    data = tiny_spec([{"name": "naive"}, {"name": "progressive"}, {"name": "hat"}], scenario="task-il",
                     model={"name": "mlp", "hidden": []})
    text = __import__("yaml").safe_dump(data)
    line = {name: text.splitlines().index(f"- name: {name}") + 1 for name in ("progressive", "hat")}
    with pytest.raises(specs.SpecError) as err:
        specs.parse_spec(text, "lin.yaml")
    assert err.value.problems == [
        f"lin.yaml:{line['progressive']}: strategies.1.name: strategy 'progressive' builds columns of the MLP's "
        "hidden layers; model.hidden is [] (the linear model): give the MLP at least one hidden layer",
        f"lin.yaml:{line['hat']}: strategies.2.name: strategy 'hat' gates the MLP's hidden units; "
        "model.hidden is [] (the linear model): give the MLP at least one hidden layer"]


def test_unsupported_pairs_are_refused_or_skipped_when_asked() -> None:
    data = tiny_spec([{"name": "icarl"}, {"name": "naive"}])
    data["benchmarks"].append({"source": "digits", "scenario": "task-il", "experiences": 2})
    with pytest.raises(specs.SpecError, match="strategy 'icarl' supports class-il; benchmarks.1"):
        specs.parse_spec(__import__("yaml").safe_dump(data))
    spec = specs.parse_spec(__import__("yaml").safe_dump({**data, "unsupported": "skip"}))
    pairs = [(t.strategy.name, t.benchmark.scenario) for t in specs.expand(spec)]
    assert pairs == [("icarl", "class-il"), ("naive", "class-il"), ("naive", "task-il")]


def test_spec_hash_follows_what_is_computed_not_where_or_how_fast() -> None:
    base = specs.PipelineSpec.model_validate(tiny_spec([{"name": "naive"}]))
    operational = specs.PipelineSpec.model_validate(tiny_spec(
        [{"name": "naive"}], resources={"max_concurrent": 4, "max_failures": 5},
        storage={"root": "/elsewhere"}, tracking={"uri": "http://127.0.0.1:5000"}))
    assert operational.spec_hash == base.spec_hash  # resume/sync SPEC --max-concurrent N find the sweep
    for change in ({"seeds": [1]}, {"train": {"iterations": 7, "batch_size": 32, "lr": 0.01}},
                   {"resources": {"cpus_per_trial": 2}}):
        assert specs.PipelineSpec.model_validate(tiny_spec([{"name": "naive"}], **change)).spec_hash != base.spec_hash
