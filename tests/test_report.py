"""The cost-vs-forgetting report, built from a real MLflow SQLite store laid out like a sweep."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from clgrid.report import ReportError, build_report
from conftest import run_chromium

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "quickstart"
BENCH, SCENARIO = "split-digits", "class-incremental"
T = 3
MB, GFLOP = 1e6, 1e9

# (label in the report, strategy, config_key, varying params, seeds that finish, seeds that fail)
CONFIGS = [
    ("ewc (ewc_lambda=10)", "ewc", "cfg-ewc10", {"strategy.ewc_lambda": "10"}, [1, 2], []),
    ("ewc (ewc_lambda=100)", "ewc", "cfg-ewc100", {"strategy.ewc_lambda": "100"}, [1], [2]),
    ("joint", "joint", "cfg-joint", {}, [1, 2], []),
    ("naive", "naive", "cfg-naive", {}, [1, 2], []),
]
RETENTION = {"cfg-lwf": 0.5, "cfg-ewc10": 0.55, "cfg-ewc100": 0.75, "cfg-joint": 1.0, "cfg-naive": 0.25}
COSTS = {  # flops, replay bytes, strategy state bytes
    "cfg-ewc10": (1.5e9, 0, 0.8e6), "cfg-ewc100": (1.5e9, 0, 0.8e6),
    "cfg-joint": (3e9, 5e6, 0), "cfg-naive": (1e9, 0, 0), "cfg-lwf": (1.3e9, 0, 0.4e6),
}
MODEL_BYTES = 0.4e6


def make_matrix(config_key: str, seed: int) -> dict:
    """R for T class-incremental experiences: learned at ~0.95, then retained by a strategy factor."""
    rng = np.random.default_rng([seed, sum(map(ord, config_key))])
    r = np.zeros((T, T))
    for i in range(T):
        for j in range(i + 1):
            learned = 0.9 + 0.08 * rng.random()
            r[i, j] = learned if i == j else learned * RETENTION[config_key] ** (i - j)
        if i + 1 < T:
            r[i, i + 1] = 0.05 * rng.random()  # a little transfer before training
    return {"R": np.round(r, 4).tolist(), "b": np.round(0.1 * rng.random(T), 4).tolist(),
            "experiences": [f"{2 * k}-{2 * k + 1}" for k in range(T)]}


def cost_metrics(config_key: str, seed: int) -> dict[str, float]:
    flops, replay, state = COSTS[config_key]
    return {"train_flops": flops, "train_seconds": 2.0 + seed * 0.3 + flops / 1e9,
            "device_seconds": 1.5 + seed * 0.2, "samples_seen": 1000.0,
            "peak_memory_bytes": 50e6 + seed * 1e6, "replay_bytes": replay,
            "model_bytes": MODEL_BYTES, "strategy_state_bytes": state}


def log_trial(client, exp_id, parent_id, label, strategy, key, params, seed, status, tmp, matrix=True) -> str:
    tags = {"mlflow.parentRunId": parent_id, "clgrid.role": "trial", "clgrid.strategy": strategy,
            "clgrid.benchmark": BENCH, "clgrid.scenario": SCENARIO, "clgrid.seed": str(seed),
            "clgrid.trial_key": f"{key}-s{seed}", "clgrid.spec_hash": "spec1", "clgrid.config_key": key}
    run = client.create_run(exp_id, tags=tags, run_name=f"{label} seed {seed}")
    rid = run.info.run_id
    params = {"strategy.name": strategy, "benchmark.source": "digits", "seed": str(seed), "train.lr": "0.01", **params}
    metrics = {}
    if status == "FINISHED":
        m = make_matrix(key, seed)
        if matrix:
            path = tmp / rid / "accuracy_matrix.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(m))
            client.log_artifact(rid, str(path))
        metrics = cost_metrics(key, seed) | {"acc": float(np.mean(m["R"][-1]))}
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.set_terminated(rid, status)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two sweeps of `quickstart` (the newer is the default) and an experiment that only failed."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri())
    old = client.create_run(exp_id, start_time=1_000, tags={"clgrid.role": "sweep", "clgrid.sweep_id": "s-old"})
    log_trial(client, exp_id, old.info.run_id, "lwf", "lwf", "cfg-lwf", {}, 1, "FINISHED", tmp)
    log_trial(client, exp_id, old.info.run_id, "lwf", "lwf", "cfg-lwf", {}, 2, "FINISHED", tmp, matrix=False)
    client.set_terminated(old.info.run_id, "FINISHED")
    new = client.create_run(exp_id, start_time=2_000, tags={"clgrid.role": "sweep", "clgrid.sweep_id": "s-new"})
    runs = {}
    for label, strategy, key, params, ok, failed in CONFIGS:
        for seed in ok + failed:
            status = "FINISHED" if seed in ok else "FAILED"
            runs[(key, seed)] = log_trial(client, exp_id, new.info.run_id, label, strategy, key,
                                          params, seed, status, tmp)
    client.set_terminated(new.info.run_id, "FINISHED")

    bad_id = client.create_experiment("all-failed", artifact_location=(tmp / "bad").as_uri())
    bad = client.create_run(bad_id, tags={"clgrid.role": "sweep", "clgrid.sweep_id": "s-bad"})
    log_trial(client, bad_id, bad.info.run_id, "naive", "naive", "cfg-naive", {}, 1, "FAILED", tmp)
    return {"uri": uri, "client": client, "parent": new.info.run_id, "runs": runs, "tmp": tmp}


@pytest.fixture(scope="module")
def report(store):
    return build_report(EXPERIMENT, store["uri"], store["tmp"] / "out")


# ---------------------------------------------------------------------------------------------
# Expected values, recomputed here from the matrices with plain loops


def expected_metrics(r: list[list[float]], b: list[float], joint_diag: list[float]) -> dict[str, float]:
    """The report's accuracy columns, by header."""
    last = T - 1
    return {
        "ACC": sum(r[last]) / T,
        "forgetting": sum(max(r[l][j] for l in range(last)) - r[last][j] for j in range(last)) / last,
        "BWT": sum(r[last][j] - r[j][j] for j in range(last)) / last,
        "FWT": sum(r[j - 1][j] - b[j] for j in range(1, T)) / last,
        "LA": sum(r[j][j] for j in range(T)) / T,
        "intransigence": sum(joint_diag[j] - r[j][j] for j in range(T)) / T,
    }


def expected_rows() -> dict[str, dict[str, list[float]]]:
    """label -> column header -> per-seed values, for the finished runs of the newest sweep."""
    joint = [make_matrix("cfg-joint", s)["R"] for s in (1, 2)]
    joint_diag = [sum(m[j][j] for m in joint) / 2 for j in range(T)]
    rows = {}
    for label, _, key, _, ok, _ in CONFIGS:
        per_seed = []
        for seed in ok:
            m = make_matrix(key, seed)
            c = cost_metrics(key, seed)
            per_seed.append(expected_metrics(m["R"], m["b"], joint_diag) | {
                "train GFLOP": c["train_flops"] / GFLOP, "train s": c["train_seconds"],
                "device s": c["device_seconds"], "peak memory MB": c["peak_memory_bytes"] / MB,
                "replay MB": c["replay_bytes"] / MB, "model MB": c["model_bytes"] / MB,
                "strategy state MB": c["strategy_state_bytes"] / MB})
        rows[label] = {k: [v[k] for v in per_seed] for k in per_seed[0]}
    return rows


ACCURACY_HEADERS = ("ACC", "forgetting", "BWT", "FWT", "LA", "intransigence")


def md_table(md: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split(" | ")]
        if cells[0] == "group":  # the missing-runs table starts here
            break
        rows[cells[0]] = cells
    return header, rows


def parse_cell(cell: str) -> tuple[float, float | None]:
    nums = re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", cell)
    return float(nums[0]), (float(nums[1]) if "±" in cell else None)


# ---------------------------------------------------------------------------------------------


def test_table_numbers_match_the_accuracy_matrices(report):
    header, rows = md_table(report.markdown.read_text())
    expected = expected_rows()
    assert set(rows) == set(expected)
    for label, columns in expected.items():
        for name, values in columns.items():
            mean, hw = parse_cell(rows[label][header.index(name)])
            # Accuracies are printed with 3 decimals, costs with 3 significant digits.
            tol = 6e-4 if name in ACCURACY_HEADERS else 6e-3 * max(1.0, abs(np.mean(values)))
            assert mean == pytest.approx(np.mean(values), abs=tol), (label, name)
            if len(values) > 1:
                t_hw = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
                assert hw == pytest.approx(t_hw, abs=max(tol, 6e-3 * t_hw)), (label, name)
            else:
                assert hw is None, (label, name)


def test_best_and_significance_marks(report):
    header, rows = md_table(report.markdown.read_text())
    acc = header.index("ACC")
    assert rows["joint"][acc].endswith("★")
    assert rows["ewc (ewc_lambda=100)"][acc].endswith("n/a")  # one finished seed: no paired test
    assert rows["ewc (ewc_lambda=100)"][header.index("seeds")] == "1/2 ⚠"
    flops = header.index("train GFLOP")
    assert rows["naive"][flops].endswith("★")
    # Identical per-seed model sizes everywhere: every row is best.
    assert all(r[header.index("model MB")].endswith("★") for r in rows.values())


def test_failed_run_listed_and_not_averaged(report, store):
    md = report.markdown.read_text()
    missing = md.split("## Missing or failed runs")[1]
    failed = store["runs"][("cfg-ewc100", 2)]
    assert re.search(rf"ewc \(ewc_lambda=100\) \| 2 \| {failed} \| status FAILED", missing)
    assert "mean over 1 of 2 seeds" in missing
    assert report.n_runs == 8 and report.n_finished == 7 and report.n_configs == 4
    assert "lwf" not in md  # the older sweep is not mixed in


def test_every_plot_written_linked_and_embedded(report, store):
    names = {p.name for p in report.images}
    stem = "split-digits-class-incremental"
    assert names == {f"{stem}-{k}.png" for k in ("tradeoff", "matrices", "stream", "sensitivity-ewc")}
    md, page = report.markdown.read_text(), report.html.read_text()
    for p in report.images:
        assert p.parent == report.markdown.parent and f"]({p.name})" in md
        assert mpimg.imread(p).std() > 0.01  # not a blank canvas
    embedded = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(embedded) == len(report.images)
    for data in embedded:
        assert mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png").ndim == 3
    assert not re.search(r"(src|href)=['\"](?!data:|#)", page)  # nothing outside the file
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "report")}
    assert logged == {f"report/{n}" for n in names | {"report.html", "report.md"}}


def test_budget_section(store, tmp_path):
    compute_bound = {"compute_flops": 1.2e9, "storage_bytes": 1e9}  # only naive (1 GFLOP) fits
    md = build_report(EXPERIMENT, store["uri"], tmp_path / "a", budgets=compute_bound).markdown.read_text()
    budget = md.split("### Best under a budget")[1].split("###")[0]
    assert "1.2 GFLOP (given)" in budget and "1e+03 MB (given" in budget
    assert "fits is **naive**: ACC" in budget
    tiny = {"compute_flops": 1.0, "storage_bytes": 1.0}
    md = build_report(EXPERIMENT, store["uri"], tmp_path / "b", budgets=tiny, sweep_id="s-old").markdown.read_text()
    assert "no configuration fits both budgets" in md
    # A finished run without its matrix still counts, from its logged metrics, and is listed.
    header, rows = md_table(md)
    acc = np.mean([np.mean(make_matrix("cfg-lwf", s)["R"][-1]) for s in (1, 2)])
    assert rows["lwf"][1] == "2/2" and parse_cell(rows["lwf"][header.index("ACC")])[0] == pytest.approx(acc, abs=6e-4)
    assert "no usable accuracy_matrix.json (MlflowException): logged metrics used" in md
    with pytest.raises(ReportError, match="unknown budget keys.*compute_budget_flops"):
        build_report(EXPERIMENT, store["uri"], tmp_path / "c", budgets={"compute_budget_flops": 1e9})


def test_default_budget_is_the_median(report):
    budget = report.markdown.read_text().split("### Best under a budget")[1].split("###")[0]
    # Medians: 1.5 GFLOP and 1.2 MB; joint is over both, so the best fitting is ewc (lambda=100).
    assert "1.5 GFLOP (median of the configurations)" in budget
    assert "1.2 MB (median of the configurations" in budget
    assert "**ewc (ewc_lambda=100)**" in budget and "(only 1 of 2 seeds finished)" in budget


def test_no_finished_runs_raises(store, tmp_path):
    with pytest.raises(ReportError, match=r"no finished trial runs \(1 FAILED\)"):
        build_report("all-failed", store["uri"], tmp_path)
    with pytest.raises(ReportError, match="no MLflow experiment named 'nope'"):
        build_report("nope", store["uri"], tmp_path)
    with pytest.raises(ReportError, match="no sweep 'zzz'.*s-new, s-old"):
        build_report(EXPERIMENT, store["uri"], tmp_path, sweep_id="zzz")


# ---------------------------------------------------------------------------------------------
# The HTML in a real browser

# Chromium is found, or the test skipped, by conftest.chromium (run_chromium calls it).
# Reports every <img> as decoded or not into the DOM, for --dump-dom to read back.
IMAGE_PROBE = ("<script>addEventListener('load', () => document.body.setAttribute('data-images',"
               " [...document.images].map(i => i.complete && i.naturalWidth > 0).join(',')));</script>")


def console_errors(stderr: str) -> list[str]:
    # With --enable-logging=stderr every console message and uncaught exception is a CONSOLE line.
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]


def test_html_renders_in_headless_chromium(report, tmp_path):
    out = REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    shot = out / "report-screenshot.png"
    shot.unlink(missing_ok=True)
    proc = run_chromium(report.html, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    assert console_errors(proc.stderr) == []
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280) and pixels.reshape(-1, 3).std(axis=0).max() > 0.05

    probed = tmp_path / "probed.html"
    probed.write_text(report.html.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    dom = run_chromium(probed, tmp_path, "--dump-dom").stdout
    flags = re.search(r'data-images="([^"]*)"', dom).group(1).split(",")
    assert flags == ["true"] * len(report.images)


def test_console_error_detection_works(tmp_path):
    """The two browser probes catch what they are meant to catch."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><img src='missing.png'><script>throw new Error('boom');</script>"
                    + IMAGE_PROBE + "</body></html>")
    proc = run_chromium(page, tmp_path, "--dump-dom")
    assert any("Uncaught Error: boom" in ln for ln in console_errors(proc.stderr))
    assert 'data-images="false"' in proc.stdout
