"""The report of an online sweep with continual evaluation (issue 15): the setting in the header, the
min-ACC / WC-ACC / A_AUC / stability-gap columns, accuracy over training steps (mean ± CI over seeds,
boundaries marked). Hand-made runs and continual.json traces in a real MLflow SQLite store."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib import image as mpimg

from clgrid.report import build_report
from clgrid.report.aggregate import aggregate
from clgrid.report.collect import collect
from clgrid.report.plots import continual_figure, mean_traces, png_bytes
from clgrid.report.stats import summarize
from report_store import new_sweep, SCENARIO, log_run, make_matrix, mean_of, table, trial_tags

ONLINE = "online"
BOUNDARIES = [0, 100, 200]
STEPS = [50, 100, 150, 200, 250, 300]


def trace(drop: float, seed: int) -> dict:
    """Accuracy on each seen experience at each evaluation step: learned at 0.9, dipping by ``drop``
    right after each boundary (the stability gap) and recovering half of it."""
    acc = []
    for step in STEPS:
        seen = sum(b <= step for b in BOUNDARIES)
        since = step - BOUNDARIES[seen - 1]
        row = [0.9 - (drop if since == 0 else drop / 2) * (j < seen - 1) - 0.01 * seed for j in range(seen)]
        acc.append(row)
    keep = [i for i, s in enumerate(STEPS) if not (seed == 2 and s == 250)]  # seed 2 skipped one evaluation
    return {"steps": [STEPS[i] for i in keep], "acc": [acc[i] for i in keep], "boundaries": BOUNDARIES}


# strategy -> (drop at a boundary, summary metrics per seed 1, 2)
RUNS = {
    "replay": (0.2, {"min_acc": (0.70, 0.68), "wc_acc": (0.76, 0.74), "a_auc": (0.80, 0.79),
                     "stability_gap": (0.2, 0.21)}),
    "naive": (0.6, {"min_acc": (0.30, 0.29), "wc_acc": (0.50, 0.48), "a_auc": (0.55, 0.53),
                    "stability_gap": (0.6, 0.62)}),
}
PARAMS = {"train.online": "True", "train.batch_size": "10", "benchmark.boundaries": "hidden",
          "benchmark.blurry.disjoint": "0.5", "benchmark.blurry.blur": "0.1"}


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online")
    uri, client, exp_id, parent = new_sweep(tmp, ONLINE, "s-online")
    for strategy, (drop, summary) in RUNS.items():
        for i, seed in enumerate((1, 2)):
            metrics = {k: v[i] for k, v in summary.items()} | {
                "eval_seconds": 0.5 * seed, "train_seconds": 3.0, "train_flops": 1e9, "model_bytes": 4e5}
            artifacts = {"accuracy_matrix.json": make_matrix("cfg-naive", seed, 1 - drop),
                         "continual.json": trace(drop, seed)}
            log_run(client, exp_id, trial_tags(parent, strategy, f"cfg-{strategy}", seed, "blurry-digits"),
                    {"strategy.name": strategy, "seed": str(seed), **PARAMS}, metrics, artifacts, tmp,
                    histories={"cont_acc": [(s, float(np.mean(a))) for s, a in zip(STEPS, trace(drop, seed)["acc"])]})
    # a run whose trace is malformed: its summary metrics count, its curve is left out
    broken = {"a_auc": 0.5, "min_acc": 0.2, "wc_acc": 0.3, "stability_gap": 0.5, "eval_seconds": 1.0, "cont_acc": 0.5}
    log_run(client, exp_id, trial_tags(parent, "der", "cfg-der", 1, "blurry-digits"),
            {"strategy.name": "der", "seed": "1", **PARAMS}, broken,
            {"continual.json": {"steps": [50, 100], "acc": [[0.5]]}}, tmp)
    client.set_terminated(parent, "FINISHED")
    return {"uri": uri, "tmp": tmp}


@pytest.fixture(scope="module")
def report(online):
    return build_report(ONLINE, online["uri"], online["tmp"] / "out")


def test_the_header_names_the_online_setting(report):
    md = report.markdown.read_text()
    assert (f"## blurry-digits / {SCENARIO} — online (one pass, batch 10), boundaries hidden, "
            "blurry (disjoint 0.5, blur 0.1)") in md
    assert "online (one pass" in report.html.read_text()


def test_the_continual_evaluation_columns(report):
    header, rows = table(report.markdown.read_text(), f"## blurry-digits / {SCENARIO}")
    for strategy, (_, summary) in RUNS.items():
        for key, name in (("min_acc", "min-ACC"), ("wc_acc", "WC-ACC"), ("a_auc", "A_AUC"),
                          ("stability_gap", "stability gap")):
            assert mean_of(rows[strategy][header.index(name)]) == pytest.approx(np.mean(summary[key]), abs=6e-4)
        assert mean_of(rows[strategy][header.index("eval s")]) == pytest.approx(0.75)
    assert rows["replay"][header.index("stability gap")].endswith("★")  # lower is better
    assert rows["replay"][header.index("min-ACC")].endswith("★")
    assert mean_of(rows["der"][header.index("A_AUC")]) == 0.5


def test_the_accuracy_over_steps_figures(report):
    names = {p.name for p in report.images}
    stem = f"blurry-digits-{SCENARIO}"
    assert {f"{stem}-continual.png", f"{stem}-continual-experiences.png"} <= names
    md = report.markdown.read_text()
    assert "### Accuracy over training steps (continual evaluation, mean ± 95% CI over seeds)" in md
    for p in report.images:
        if "continual" in p.name:
            assert mpimg.imread(p).std() > 0.01


def test_the_curves_are_the_mean_and_ci_over_seeds_at_the_steps_all_seeds_evaluated(online):
    (group,), _ = aggregate(collect(online["uri"], ONLINE, None).trials, {})
    traces = {t.label: t for t in mean_traces(group.configs)}
    assert set(traces) == {"replay", "naive"}  # der's trace is malformed
    replay = traces["replay"]
    steps, mean, hw, per_exp = replay.steps, replay.mean, replay.hw, replay.per_experience
    assert steps.tolist() == [50, 100, 150, 200, 300]  # seed 2 has no 250

    def at(seed: int, step: int) -> list[float]:
        t = trace(0.2, seed)
        return t["acc"][t["steps"].index(step)]

    for i, step in enumerate(steps):
        assert (mean[i], hw[i]) == pytest.approx(summarize(np.mean(at(s, step)) for s in (1, 2)))
        assert per_exp[i, 0] == pytest.approx(np.mean([at(s, step)[0] for s in (1, 2)]))
    assert np.isnan(per_exp[0, 1]) and np.isnan(per_exp[2, 2])  # not started yet
    assert per_exp[1, 0] == pytest.approx(0.9 - 0.2 - 0.015)  # the dip right after boundary 100
    assert replay.boundaries == BOUNDARIES


def test_many_curves_get_their_legend_beside_the_plot() -> None:
    steps = np.arange(0, 300, 50)
    curves = [(f"strategy {i}", steps, np.full(len(steps), 0.1 * i), np.full(len(steps), 0.02)) for i in range(8)]
    fig = continual_figure(curves, BOUNDARIES)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()][:8] == [label for label, *_ in curves]
    assert mpimg.imread(io.BytesIO(png_bytes(fig)), format="png").std() > 0.01
