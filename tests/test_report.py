"""The cost-vs-forgetting report, built from a real MLflow SQLite store laid out like a sweep (conftest's
`store`, made by report_store.make_store)."""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from scipy import stats

from clgrid.report import ReportError, build_report
from conftest import run_chromium
from report_store import CONFIGS, EXPERIMENT, GFLOP, MB, T, cost_metrics, make_matrix

REPO = Path(__file__).resolve().parents[1]


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
