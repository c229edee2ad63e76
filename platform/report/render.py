"""The report as Markdown (PNGs beside it) and as one self-contained HTML page (PNGs embedded)."""

from __future__ import annotations

import base64
import html as _html
import math
from collections.abc import Callable
from datetime import datetime, timezone

from clgrid.report.aggregate import VALIDATED, Budget, Cell, Column, Config, Group, Issue
from clgrid.report.collect import Sweep
from clgrid.report.plots import Image
from clgrid.report.setting import class_orders, setting
from clgrid.report.stats import ALPHA, MIN_SEEDS, summarize
from clgrid.report.tuning import compare
from clgrid.tracking.schema import TUNE

Section = tuple[Group, list[Image]]

MARK_TEXT = {"best": "★", "tie": "≈", "n/a": "n/a", "": ""}
LEGEND = ("Mean ± 95% CI over seeds (Student t). ★ best in the column; ≈ not significantly different "
          "from the best (paired t-test over matching seeds, Holm-corrected over the column's rows, p ≥ 0.05); "
          "n/a: fewer than 2 paired seeds, no test. Where the runs have a validation split, ★ and ≈ of ACC, "
          "forgetting, BWT, FWT and LA compare the validation values (val_acc, ...) and the cells show the "
          "test values. Higher is better for ACC, BWT, FWT, LA, min-ACC, WC-ACC, A_AUC; lower for forgetting, "
          "intransigence, stability gap and costs. Intransigence is against the group's joint strategy. "
          "Total GFLOP: the strategy's tuning runs plus one final run. ⚠: seeds missing, see Missing or failed runs.")
BY_TEST = ("★ and the budget's pick compare test accuracy: these runs had no validation split, so the "
           "choices have seen the test set.")
BY_VALIDATION = "★ and the budget's pick compare validation metrics; every number shown is on the test set."
TUNING_TITLE = "What tuning on test would have said"
TUNING_NOTE = ("Per strategy, among its configurations that finished on every tuning seed: the configuration the "
               "validation metric picked (the final runs' configuration) and the one the best mean test accuracy "
               "would have picked, each with its mean test ACC over the tuning seeds; optimism = the difference. "
               "Rankings: this sweep's (final runs' test ACC) against the one a test-tuned report would print (the "
               "test pick's ACC).")
TUNING_HEADER = ["strategy", "configurations compared", "validation's pick", "its test ACC", "final runs' test ACC",
                 "test's pick", "its test ACC", "optimism"]

ISSUE_HEADER = ["group", "configuration", "seed", "run id", "problem"]
NO_ISSUES = "None: every configuration finished on every seed."
CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td.label { text-align: left; }
td.best { background: #b9e4b9; font-weight: bold; }
td.tie { background: #e3f4e3; }
img { max-width: 100%; border: 1px solid #eee; }
.warn { color: #a33; }
"""


def intro(sweep: Sweep) -> str:
    source = (f"sweep {sweep.sweep_id} (parent run {sweep.parent_run_id})" if sweep.parent_run_id
              else "all trial runs (no sweep parent run)")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tuning = sum(t.phase == TUNE for t in sweep.trials)
    tuned = (f" {tuning} of the {len(sweep.trials)} are tuning runs: no rows of the tables, they make the "
             f"tuning costs and \"{TUNING_TITLE}\".") if tuning else ""
    return (f"Experiment {sweep.experiment}, {source}: {sweep.n_finished} of {len(sweep.trials)} trial runs "
            f"finished.{tuned} Generated {when}.")


def heading(group: Group) -> str:
    """The group's title, with its setting when it is not the offline, announced-boundary one."""
    named = setting(group)
    return f"{group.title} — {named}" if named else group.title


def notes(group: Group) -> list[str]:
    """What the reader needs before the table: what the marks compare, whether the seeds can
    separate rows, the class orders that ran."""
    out = [BY_VALIDATION if group.by_validation else BY_TEST]
    if len(group.seeds) < MIN_SEEDS:
        out.append(f"Only {len(group.seeds)} seed(s): too few to separate rows. A paired t-test on fewer than "
                   f"{MIN_SEEDS} seeds has at most 1 degree of freedom (|t| > 12.7 for p < {ALPHA}, more after "
                   "Holm), so ≈ and its absence say little; run more seeds to rank these rows.")
    orders = class_orders(group)
    if orders:
        listed = "; ".join(f"[{order}] (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)})"
                           for order, seeds in orders)
        out.append(f"Class orders: {len(orders)} distinct over {len(group.seeds)} seed(s): {listed}.")
    return out


def tuning_section(group: Group) -> tuple[list[list[str]], str] | None:
    """The rows of the tuning-on-test table and the rankings' sentence; None without a tune phase."""
    comparison = compare(group)
    if comparison is None:
        return None

    def acc(x: float) -> str:
        return f"{x:.3f}" if math.isfinite(x) else "—"

    rows = []
    for p in comparison.strategies:
        final = "—" if not math.isfinite(p.final_acc[0]) else acc(p.final_acc[0]) + (
            f" ± {p.final_acc[1]:.3f}" if math.isfinite(p.final_acc[1]) else "")
        val = p.by_validation
        optimism = f"{p.optimism:+.3f}" if math.isfinite(p.optimism) else "—"
        rows.append([p.strategy, f"{p.n_configs} ({p.n_finished} of {p.n_runs} runs finished)",
                     val.label if val else "— (no val_acc)", acc(val.tuning_acc) if val else "—", final,
                     p.by_test.label, acc(p.by_test.tuning_acc), optimism])
    tau = (f"Kendall's τ = {comparison.tau:.2f} (p = {comparison.p:.2g}, {len(comparison.by_validation)} strategies)"
           if math.isfinite(comparison.tau) else "Kendall's τ: needs two strategies with a ranking")
    text = (f"Ranking as this sweep reports it: {' > '.join(comparison.by_validation) or '—'}. "
            f"As tuning on test would have reported it: {' > '.join(comparison.by_test) or '—'}. {tau}.")
    return rows, text


def _cell_text(col: Column, cell: Cell) -> str:
    text = col.mean_ci(cell.mean, cell.hw)
    mark = MARK_TEXT[cell.mark]
    return f"{text} {mark}" if mark else text


def _seeds_text(group: Group, c: Config) -> str:
    n = len(c.by_seed)
    return f"{n}/{len(group.seeds)}" + (" ⚠" if n < len(group.seeds) else "")


def _budget_text(budget: Budget, bold: Callable[[str], str], escape: Callable[[str], str]) -> str:
    if budget.best is None:
        return escape(budget.text)
    return escape(budget.text) + bold(escape(budget.best.label)) + escape(budget.detail)


DRIFT_TITLE = "Representation drift: head forgetting (R) beside representation forgetting (P)"
DRIFT_NOTE = ("P: linear probes fitted on frozen penultimate features after each experience (Davari et al. 2022); "
              "CKA: the layer's representation of each old experience's probe set at the end vs when it was "
              "learned, mean over old experiences (1 = unchanged); weight drift: ||Δθ|| / ||θ|| of the layer "
              "during the last experience; prototype drift: how far old classes' feature means moved, over the "
              "mean feature norm. Progressive, PackNet, HAT and DEN are probed on each experience's own "
              "column or mask. Mean ± 95% CI over seeds.")
DRIFT_FIRST = ["forgetting", "probe_forgetting", "acc", "probe_acc", "probe_acc_all_seen"]


def drift_table(group: Group) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the group's drift table; no rows when no configuration ran probes."""
    probed = [c for c in group.configs if any("probe_seconds" in t.metrics for t in c.by_seed.values())]
    keys = sorted({k for c in probed for t in c.by_seed.values() for k in t.metrics
                   if k.startswith(("cka_", "weight_drift_")) or k == "prototype_drift"})
    keys = [k for k in DRIFT_FIRST if any(k in t.metrics for c in probed for t in c.by_seed.values())] + keys
    rows = []
    for c in probed:
        cells = []
        for k in keys:
            values = [t.metrics[k] for t in c.by_seed.values() if k in t.metrics]
            mean, hw = summarize(values)
            cells.append(f"{mean:.3f} ± {hw:.3f}" if values else "")
        rows.append([c.label, *cells])
    return ["configuration", *keys], rows


def _issue_rows(issues: list[Issue]) -> list[list[str]]:
    return [[i.group, i.label, i.seed, i.run_id, i.problem] for i in issues]


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_table(group: Group) -> list[str]:
    header = ["configuration", "seeds"] + [c.header for c in group.columns]
    lines = [_md_row(header), "|" + "---|" * len(header)]
    for c in group.configs:
        cells = [_cell_text(col, group.cells[(c.key, col.key)]) for col in group.columns]
        lines.append(_md_row([_md_escape(c.label), _seeds_text(group, c)] + cells))
    return lines


def markdown(experiment: str, intro_text: str, sections: list[Section], issues: list[Issue]) -> str:
    out = [f"# Cost-vs-forgetting report: {experiment}", "", intro_text, "", LEGEND, ""]
    for g, images in sections:
        out += [f"## {heading(g)}", "", *(line for note in notes(g) for line in (note, "")), *_md_table(g), "",
                "### Best under a budget", "", _budget_text(g.budget, lambda s: f"**{s}**", _md_escape), ""]
        tuning = tuning_section(g)
        if tuning:
            rows, text = tuning
            out += [f"### {TUNING_TITLE}", "", TUNING_NOTE, "", _md_row(TUNING_HEADER),
                    "|" + "---|" * len(TUNING_HEADER), *(_md_row([_md_escape(x) for x in row]) for row in rows),
                    "", text, ""]
        head, rows = drift_table(g)
        if rows:
            out += [f"### {DRIFT_TITLE}", "", DRIFT_NOTE, "", _md_row(head), "|" + "---|" * len(head),
                    *(_md_row([_md_escape(x) for x in row]) for row in rows), ""]
        out += [line for img in images for line in (f"### {img.title}", "", f"![{img.title}]({img.path.name})", "")]
    out += ["## Missing or failed runs", ""]
    if issues:
        out += [_md_row(ISSUE_HEADER), "|" + "---|" * len(ISSUE_HEADER)]
        out += [_md_row([_md_escape(x) for x in row]) for row in _issue_rows(issues)]
    else:
        out.append(NO_ISSUES)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# HTML


def _html_table(head: list[str], rows: list[str]) -> str:
    cols = "".join(f"<th>{_html.escape(h)}</th>" for h in head)
    return f"<div class='scroll'><table><thead><tr>{cols}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


def _html_results(group: Group) -> str:
    rows = []
    for c in group.configs:
        tds = [f"<td class='label'>{_html.escape(c.label)}</td>", f"<td>{_seeds_text(group, c)}</td>"]
        for col in group.columns:
            cell = group.cells[(c.key, col.key)]
            on = " on the validation values" if group.by_validation and col.key in VALIDATED else ""
            tip = f" title='paired t-test vs best{on}, Holm-adjusted: p = {cell.p:.3g}'" if cell.p is not None else ""
            css = {"best": "best", "tie": "tie"}.get(cell.mark, "")
            tds.append(f"<td class='{css}'{tip}>{_html.escape(_cell_text(col, cell))}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return _html_table(["configuration", "seeds"] + [c.header for c in group.columns], rows)


def html(experiment: str, intro_text: str, sections: list[Section], issues: list[Issue]) -> str:
    e = _html.escape
    body = [f"<h1>Cost-vs-forgetting report: {e(experiment)}</h1>", f"<p>{e(intro_text)}</p>"]
    if issues:
        body.append(f"<p class='warn'>{len(issues)} missing or failed run(s): "
                    "see <a href='#missing'>Missing or failed runs</a>.</p>")
    body.append(f"<p><small>{e(LEGEND)}</small></p>")
    for g, images in sections:
        body += [f"<h2>{e(heading(g))}</h2>", *(f"<p>{e(note)}</p>" for note in notes(g)), _html_results(g),
                 "<h3>Best under a budget</h3>",
                 f"<p>{_budget_text(g.budget, lambda s: f'<strong>{s}</strong>', e)}</p>"]
        tuning = tuning_section(g)
        if tuning:
            rows, text = tuning
            cells = ["<tr>" + "".join(f"<td class='label'>{e(x)}</td>" for x in row) + "</tr>" for row in rows]
            body += [f"<h3>{e(TUNING_TITLE)}</h3>", f"<p><small>{e(TUNING_NOTE)}</small></p>",
                     _html_table(TUNING_HEADER, cells), f"<p>{e(text)}</p>"]
        head, rows = drift_table(g)
        if rows:
            body += [f"<h3>{e(DRIFT_TITLE)}</h3>", f"<p><small>{e(DRIFT_NOTE)}</small></p>", _html_table(head, [
                "<tr>" + "".join(f"<td class='label'>{e(x)}</td>" if i == 0 else f"<td>{e(x)}</td>"
                                 for i, x in enumerate(row)) + "</tr>" for row in rows])]
        for img in images:
            data = base64.b64encode(img.png).decode("ascii")
            body += [f"<h3>{e(img.title)}</h3>", f"<img alt='{e(img.title)}' src='data:image/png;base64,{data}'>"]
    body.append("<h2 id='missing'>Missing or failed runs</h2>")
    if issues:
        rows = ["<tr>" + "".join(f"<td class='label'>{e(x)}</td>" for x in row) + "</tr>"
                for row in _issue_rows(issues)]
        body.append(_html_table(ISSUE_HEADER, rows))
    else:
        body.append(f"<p>{NO_ISSUES}</p>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>clgrid report: {e(experiment)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
