"""The report of a tune-then-test sweep (issue 14): picks by validation, tuning and total costs, what
tuning on test would have said, Holm-corrected marks, class orders. Hand-made runs in a real MLflow
SQLite store, tagged and logged as the tuned pipeline logs them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from clgrid.report import build_report
from clgrid.report.aggregate import aggregate
from clgrid.report.collect import Trial
from clgrid.report.stats import holm
from report_store import new_sweep, BENCH, EXPERIMENT, SCENARIO, log_run, make_matrix, mean_of, table, trial_tags

TUNED = "tuned"
TUNE_SEEDS, FINAL_SEEDS = (100, 101), (1, 2, 3)
# strategy -> tuning configurations: (config key, varying params, retention (sets test ACC), val_acc)
TUNING = {
    "ewc": [("t-ewc1", {"strategy.ewc_lambda": "1"}, 0.3, 0.6),
            ("t-ewc10", {"strategy.ewc_lambda": "10.0000371"}, 0.5, 0.8),  # validation's pick (shown as 10)
            ("t-ewc100", {"strategy.ewc_lambda": "100"}, 0.8, 0.7)],  # test's pick
    "lwf": [("t-lwf-old", {"strategy.distill": "old"}, 0.6, 0.65),
            ("t-lwf-padded", {"strategy.distill": "padded"}, 0.65, 0.7)],  # both picks
    "naive": [("t-naive", {}, 0.25, 0.4)],
}
# strategy -> (final config key, the tuning config it came from, retention, val_acc, train_flops per run)
FINAL = {"ewc": ("f-ewc", "t-ewc10", 0.5, 0.9, 1e9), "lwf": ("f-lwf", "t-lwf-padded", 0.65, 0.7, 1.2e9),
         "naive": ("f-naive", "t-naive", 0.25, 0.4, 0.8e9)}
ORDERS = {1: "[0, 1, 2, 3, 4, 5]", 2: "[[3, 1], [5, 0], [2, 4]]", 3: "[0, 1, 2, 3, 4, 5]"}  # flat, or per experience


def acc_of(key: str, seed: int, retention: float) -> float:
    return float(np.mean(make_matrix(key, seed, retention)["R"][-1]))


def run_metrics(acc: float, val_acc: float, flops: float) -> dict[str, float]:
    return {"acc": acc, "val_acc": val_acc, "train_flops": flops, "device_seconds": 2.0, "train_seconds": 2.5,
            "model_bytes": 0.4e6, "replay_bytes": 0.0, "strategy_state_bytes": 0.0, "peak_memory_bytes": 5e7}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tuned")
    uri, client, exp_id, parent = new_sweep(tmp, TUNED, "s-tuned")
    tuning_ids: dict[str, list[str]] = {}
    tuning_flops = {s: FINAL[s][4] * len(configs) * len(TUNE_SEEDS) for s, configs in TUNING.items()}
    for strategy, configs in TUNING.items():
        for key, params, retention, val in configs:
            for seed in TUNE_SEEDS:
                tags = trial_tags(parent, strategy, key, seed) | {"clgrid.phase": "tune"}
                tuning_ids.setdefault(key, []).append(log_run(
                    client, exp_id, tags, {"strategy.name": strategy, "seed": str(seed), **params},
                    run_metrics(acc_of(key, seed, retention), val, FINAL[strategy][4]),
                    {"accuracy_matrix.json": make_matrix(key, seed, retention)}, tmp))
        # an ASHA-stopped or crashed tuning run: counted, never averaged
        log_run(client, exp_id, trial_tags(parent, strategy, f"t-{strategy}-x", 100) | {"clgrid.phase": "tune"},
                {"strategy.name": strategy, "seed": "100"}, {}, {}, tmp, status="FAILED")
    # ASHA stopped ewc (lambda=1000) after one tuning seed: the best test ACC there, but not comparable
    log_run(client, exp_id, trial_tags(parent, "ewc", "t-ewc1000", 100) | {"clgrid.phase": "tune"},
            {"strategy.name": "ewc", "seed": "100", "strategy.ewc_lambda": "1000"},
            run_metrics(acc_of("t-ewc1000", 100, 0.95), 0.5, 1e9), {}, tmp)
    for strategy, (key, source, retention, val, flops) in FINAL.items():
        for seed in FINAL_SEEDS:
            tags = trial_tags(parent, strategy, key, seed) | {
                "clgrid.phase": "final", "clgrid.selected_from": ",".join(tuning_ids[source]),
                "clgrid.class_order": ORDERS[seed]}
            metrics = run_metrics(acc_of(key, seed, retention), val + 0.01 * seed, flops) | {
                "tuning_train_flops": tuning_flops[strategy], "tuning_device_seconds": 30.0}
            log_run(client, exp_id, tags, {"strategy.name": strategy, "seed": str(seed)}, metrics,
                    {"accuracy_matrix.json": make_matrix(key, seed, retention)}, tmp)
    client.set_terminated(parent, "FINISHED")
    return {"uri": uri, "tmp": tmp, "tuning_flops": tuning_flops}


@pytest.fixture(scope="module")
def report_md(tuned) -> str:
    return build_report(TUNED, tuned["uri"], tuned["tmp"] / "out").markdown.read_text()


def final_acc(strategy: str) -> float:
    key, _, retention, _, _ = FINAL[strategy]
    return float(np.mean([acc_of(key, s, retention) for s in FINAL_SEEDS]))


def tuning_acc(key: str, retention: float) -> float:
    return float(np.mean([acc_of(key, s, retention) for s in TUNE_SEEDS]))


def test_tuning_runs_are_no_rows_and_their_cost_is_in_the_tuning_and_total_columns(report_md, tuned):
    header, rows = table(report_md, f"## {BENCH} / {SCENARIO}")
    assert set(rows) == {"ewc", "lwf", "naive"}
    for strategy, (_, _, _, _, flops) in FINAL.items():
        row = rows[strategy]
        assert row[header.index("seeds")] == "3/3"
        tuning = tuned["tuning_flops"][strategy]
        assert mean_of(row[header.index("tuning GFLOP")]) == pytest.approx(tuning / 1e9, rel=1e-2)
        assert mean_of(row[header.index("total GFLOP")]) == pytest.approx((tuning + flops) / 1e9, rel=1e-2)
        assert mean_of(row[header.index("train GFLOP")]) == pytest.approx(flops / 1e9, rel=1e-2)
        assert mean_of(row[header.index("ACC")]) == pytest.approx(final_acc(strategy), abs=6e-4)


def test_the_best_mark_and_the_budget_pick_by_validation_not_by_test(report_md):
    header, rows = table(report_md, f"## {BENCH} / {SCENARIO}")
    acc = header.index("ACC")
    # lwf has the highest test ACC, ewc the highest val_acc: the star follows the validation split.
    assert final_acc("lwf") > final_acc("ewc")
    assert rows["ewc"][acc].endswith("★") and not rows["lwf"][acc].endswith("★")
    assert rows["ewc"][header.index("val ACC")].endswith("★")
    assert "★ and the budget's pick compare validation metrics" in report_md
    budget = report_md.split("### Best under a budget")[1].split("###")[0]
    # Median of the totals (tuning + final): lwf's 6 GFLOP; ewc (7 in total, 1 without tuning) does not fit.
    assert "6 GFLOP (median of the configurations, tuning + final)" in budget
    assert "fits is **lwf**" in budget and "GFLOP in total" in budget
    assert "Picked by mean validation accuracy" in budget


def test_what_tuning_on_test_would_have_said(report_md):
    header, rows = table(report_md, "### What tuning on test would have said")
    assert set(rows) == {"ewc", "lwf", "naive"}
    ewc = rows["ewc"]
    assert ewc[header.index("configurations compared")] == "3 (7 of 8 runs finished)"  # not lambda=1000
    assert ewc[header.index("validation's pick")] == "ewc (ewc_lambda=10)"
    assert ewc[header.index("test's pick")] == "ewc (ewc_lambda=100)"
    picks = [i for i, h in enumerate(header) if h == "its test ACC"]
    val_acc, test_acc = tuning_acc("t-ewc10", 0.5), tuning_acc("t-ewc100", 0.8)
    assert mean_of(ewc[picks[0]]) == pytest.approx(val_acc, abs=6e-4)
    assert mean_of(ewc[picks[1]]) == pytest.approx(test_acc, abs=6e-4)
    assert float(ewc[header.index("optimism")]) == pytest.approx(test_acc - val_acc, abs=1.1e-3)
    assert mean_of(ewc[header.index("final runs' test ACC")]) == pytest.approx(final_acc("ewc"), abs=6e-4)
    lwf = rows["lwf"]
    assert lwf[header.index("validation's pick")] == lwf[header.index("test's pick")] == "lwf (distill=padded)"
    assert rows["naive"][header.index("optimism")] == "+0.000"
    # Reported: lwf > ewc > naive; tuned on test: ewc > lwf > naive. One discordant pair of three.
    assert "this sweep reports it: lwf > ewc > naive." in report_md
    assert "tuning on test would have reported it: ewc > lwf > naive." in report_md
    tau = stats.kendalltau([final_acc(s) for s in ("ewc", "lwf", "naive")],
                           [tuning_acc("t-ewc100", 0.8), tuning_acc("t-lwf-padded", 0.65), tuning_acc("t-naive", 0.25)])
    assert tau.statistic == pytest.approx(1 / 3)
    assert "Kendall's τ = 0.33" in report_md


def test_the_class_orders_that_ran_are_listed(report_md):
    assert ("Class orders: 2 distinct over 3 seed(s): [0 1 2 3 4 5] (seeds 1, 3); [3 1 / 5 0 / 2 4] (seed 2)."
            in report_md)
    assert "too few to separate rows" not in report_md  # 3 seeds


def test_without_a_validation_split_the_report_says_it_picks_on_test(store, tmp_path):
    md = build_report(EXPERIMENT, store["uri"], tmp_path).markdown.read_text()
    assert "★ and the budget's pick compare test accuracy: these runs had no validation split" in md
    assert "Picked by test accuracy: no validation split ran" in md
    assert "Only 2 seed(s): too few to separate rows" in md
    assert "What tuning on test would have said" not in md and "tuning GFLOP" not in md and "val ACC" not in md
    assert "Class orders" not in md  # runs from before the tag


def test_holm_adjusted_p_values() -> None:
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"a": 0.5}) == {"a": 0.5}
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}  # capped at 1
    assert holm({}) == {}


def hand_trial(key: str, seed: int, acc: float) -> Trial:
    return Trial(f"{key}-{seed}", "FINISHED", seed, BENCH, SCENARIO, key, str(seed), key, {"seed": str(seed)},
                 {"acc": acc}, None, None)


def test_the_marks_are_holm_corrected_over_the_column():
    best = [0.90, 0.92, 0.91, 0.93]
    worse = {"b": [0.88, 0.911, 0.88, 0.917], "c": [0.88, 0.912, 0.88, 0.918]}
    trials = [hand_trial("a", s, v) for s, v in enumerate(best)]
    trials += [hand_trial(k, s, v) for k, vs in worse.items() for s, v in enumerate(vs)]
    (group,), _ = aggregate(trials, {})
    raw = {k: stats.ttest_rel(vs, best).pvalue for k, vs in worse.items()}
    assert max(raw.values()) < 0.05  # each significantly worse on its own ...
    adjusted = holm(raw)
    assert min(adjusted.values()) >= 0.05  # ... but not both, at a family-wise 5%
    for key in worse:
        assert group.cells[(key, "acc")].p == pytest.approx(adjusted[key])
        assert group.cells[(key, "acc")].mark == "tie"
    assert group.cells[("a", "acc")].mark == "best"
    assert math.isclose(group.cells[("a", "acc")].mean, np.mean(best))


def test_labels_show_sampled_numbers_at_four_significant_digits_and_grid_values_as_given():
    from clgrid.report.aggregate import label_configs

    def runs(lam: str) -> list[dict[str, str]]:
        return [{"strategy.ewc_lambda": lam, "seed": "0"}]

    labels = label_configs({"a": ("ewc", runs("833.6105173474732")), "b": ("ewc", runs("10000.0")),
                            "c": ("ewc", runs("833.6105999"))})
    assert labels["b"].text == "ewc (ewc_lambda=10000.0)"
    # two samples equal at 4 digits keep distinct labels (their keys' prefixes)
    assert {labels["a"].text, labels["c"].text} == {"ewc (ewc_lambda=833.6) [a]", "ewc (ewc_lambda=833.6) [c]"}
    assert list(labels) == ["a", "c", "b"]  # ordered by the full value


def test_a_strategy_tuned_in_two_entries_gets_a_row_per_entry():
    """LwF's two distillations are two entries of one strategy: each entry's picks, seeds and final
    runs stay its own (clgrid.tune_entry), named by what differs between the entries."""
    from clgrid.report.tuning import compare

    def run(rid: str, phase: str, entry: str, key: str, distill: str, lr: str, seed: int, acc: float, val: float,
            selected: str = "") -> Trial:
        tags = {"clgrid.phase": phase, "clgrid.tune_entry": entry} | ({"clgrid.selected_from": selected} if selected else {})
        return Trial(run_id=rid, status="FINISHED", end_time=0, benchmark=BENCH, scenario=SCENARIO, strategy="lwf",
                     seed=str(seed), config_key=key, params={"strategy.name": "lwf", "strategy.distill": distill,
                                                             "train.lr": lr, "seed": str(seed)},
                     metrics={"acc": acc, "val_acc": val}, matrix=None, matrix_problem=None, tags=tags)

    trials = [run("o1", "tune", "5", "o-a", "old", "0.01", 100, 0.30, 0.50),
              run("o2", "tune", "5", "o-b", "old", "0.001", 100, 0.40, 0.45),  # test's pick for old
              run("p1", "tune", "6", "p-a", "padded", "0.01", 100, 0.20, 0.30),
              run("p2", "tune", "6", "p-b", "padded", "0.001", 100, 0.10, 0.35),
              run("fo", "final", "5", "f-old", "old", "0.01", 1, 0.31, 0.5, selected="o1"),
              run("fp", "final", "6", "f-padded", "padded", "0.001", 1, 0.12, 0.3, selected="p2")]
    (group,), _ = aggregate(trials, {})
    picks = {p.strategy: p for p in compare(group).strategies}
    assert set(picks) == {"lwf (distill=old)", "lwf (distill=padded)"}
    old, padded = picks["lwf (distill=old)"], picks["lwf (distill=padded)"]
    assert (old.by_validation.tuning_acc, old.by_test.tuning_acc, old.final_acc[0]) == (0.30, 0.40, 0.31)
    assert (padded.by_validation.tuning_acc, padded.by_test.tuning_acc, padded.final_acc[0]) == (0.10, 0.20, 0.12)
