"""Report figures, drawn on matplotlib's Agg canvas without pyplot (no global state, no display)."""

from __future__ import annotations

import io
import math
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clgrid import fsio
from clgrid.report.aggregate import Config, Group, short, value_order
from clgrid.report.collect import Continual
from clgrid.report.stats import pareto_front, summarize

# (mean, CI half-width) per configuration, in the order of the labels.
Series = tuple[Sequence[float], Sequence[float]]


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _new_figure(nrows: int, ncols: int, cell: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cell[0] * ncols, cell[1] * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def _use_log_x(ax, xs: Sequence[float]) -> None:
    # Costs often span orders of magnitude (a replay buffer vs none); log keeps all points legible.
    pos = [x for x in xs if math.isfinite(x) and x > 0]
    if len(pos) == len([x for x in xs if math.isfinite(x)]) and pos and max(pos) / min(pos) > 50:
        ax.set_xscale("log")


def tradeoff_figure(
    labels: Sequence[str], xs: Mapping[str, Series], ys: Mapping[str, tuple[Series, bool]]
) -> Figure:
    """One panel per (y metric, x cost): points with CI error bars and the Pareto front.

    `ys` maps a metric name to its series and whether higher is better.
    """
    fig, axes = _new_figure(len(ys), len(xs), (5.0, 3.8))
    colors = [f"C{i % 10}" for i in range(len(labels))]
    panels = [(yname, ydata, xname, xdata) for yname, ydata in ys.items() for xname, xdata in xs.items()]
    for ax, (yname, ((ym, yh), maximize), xname, (xm, xh)) in zip(axes, panels):
        for i, label in enumerate(labels):
            ax.errorbar(xm[i], ym[i], xerr=np.nan_to_num(xh[i]), yerr=np.nan_to_num(yh[i]),
                        fmt="o", color=colors[i], capsize=3, label=label)
        front = pareto_front(list(zip(xm, ym)), maximize_y=maximize)
        if front:
            ax.plot([xm[i] for i in front], [ym[i] for i in front], "k--", drawstyle="steps-post",
                    linewidth=1, label="Pareto front")
        _use_log_x(ax, xm)
        ax.set_xlabel(xname)
        ax.set_ylabel(f"{yname} ({'higher' if maximize else 'lower'} is better)")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(5, len(names)), fontsize=8)
    return fig


def _panel_grid(n: int, cell: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    ncols = min(n, 3)
    fig, axes = _new_figure(math.ceil(n / ncols), ncols, cell)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def heatmap_figure(mats: Sequence[tuple[str, np.ndarray, Sequence[str]]]) -> Figure:
    """Annotated accuracy-matrix heatmaps, one panel per (label, R, experience names)."""
    fig, axes = _panel_grid(len(mats), (3.6, 3.4))
    for ax, (label, r, names) in zip(axes, mats):
        im = ax.imshow(r, vmin=0.0, vmax=1.0, cmap="viridis")
        if r.shape[0] <= 20:  # beyond that the numbers are unreadable anyway
            for (i, j), v in np.ndenumerate(r):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
        ax.set_xticks(range(r.shape[1]), names[: r.shape[1]], fontsize=7)
        ax.set_yticks(range(r.shape[0]), names[: r.shape[0]], fontsize=7)
        ax.set_xlabel("evaluated on experience")
        ax.set_ylabel("after training experience")
        ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.6, label="accuracy")
    return fig


def stream_figure(mats: Sequence[tuple[str, np.ndarray, Sequence[str]]]) -> Figure:
    """Accuracy on each experience from the moment it is learned to the end of the stream."""
    fig, axes = _panel_grid(len(mats), (3.8, 3.0))
    for ax, (label, r, names) in zip(axes, mats):
        steps = np.arange(r.shape[0])
        for j in range(min(r.shape)):
            ax.plot(steps[j:], r[j:, j], marker=".", label=f"exp {names[j]}")
        seen = [r[i, : i + 1].mean() for i in steps]
        ax.plot(steps, seen, "k-", linewidth=2, label="mean of seen")
        ax.set_xticks(steps, [str(n) for n in names[: r.shape[0]]], fontsize=7)
        _accuracy_axes(ax, "after training experience", label)
    return fig


def _mark_boundaries(ax, boundaries: Sequence[float]) -> None:
    for i, b in enumerate(boundaries[1:]):  # the first experience starts at step 0
        ax.axvline(b, color="grey", linestyle=":", linewidth=1, label="experience boundary" if i == 0 else None)


def continual_figure(curves: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                     boundaries: Sequence[float]) -> Figure:
    """Mean accuracy over the experiences seen so far against the training step, one line per
    (label, steps, mean, CI half-width) with its 95% CI band over seeds; experience boundaries dotted."""
    fig, (ax,) = _new_figure(1, 1, (9.0, 4.0))
    for i, (label, steps, mean, hw) in enumerate(curves):
        ax.plot(steps, mean, color=f"C{i % 10}", linewidth=1.2, label=label)
        ax.fill_between(steps, mean - np.nan_to_num(hw), mean + np.nan_to_num(hw), color=f"C{i % 10}", alpha=0.2)
    _mark_boundaries(ax, boundaries)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy on the experiences seen")
    ax.grid(alpha=0.3)
    if len(curves) > 6:  # beside the plot: inside it would hide the curves
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    else:
        ax.legend(fontsize=7)
    return fig


def continual_experiences_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray, Sequence[float]]]) -> Figure:
    """Per configuration (label, steps, [step, experience] mean accuracy, boundaries): each experience's
    accuracy from when it starts, where the stability gap shows as a dip right after a boundary."""
    fig, axes = _panel_grid(len(panels), (4.2, 3.0))
    for ax, (label, steps, acc, boundaries) in zip(axes, panels):
        for j in range(acc.shape[1]):
            ax.plot(steps, acc[:, j], linewidth=1, label=f"exp {j}")
        _mark_boundaries(ax, boundaries)
        _accuracy_axes(ax, "training step", label)
    return fig


def sensitivity_figure(strategy: str, param: str, values: Sequence[str], acc: Series) -> Figure:
    """Mean accuracy (with CI) against the one hyperparameter the grid varies for a strategy."""
    fig, (ax,) = _new_figure(1, 1, (5.0, 3.5))
    try:
        xs = [float(v) for v in values]
    except ValueError:  # categorical hyperparameter: evenly spaced, labelled ticks
        xs = list(range(len(values)))
        ax.set_xticks(xs, list(values))
    ax.errorbar(xs, acc[0], yerr=np.nan_to_num(np.asarray(acc[1], dtype=float)), fmt="o-", capsize=3)
    _use_log_x(ax, xs)
    ax.set_xlabel(param)
    ax.set_ylabel("ACC")
    ax.set_title(f"{strategy}: sensitivity to {param}", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------
# The figures of one group


@dataclass(frozen=True)
class Image:
    path: Path
    title: str
    png: bytes


def draw(group: Group, out_dir: Path) -> list[Image]:
    """Writes the group's figures as PNGs to `out_dir`: trade-offs, matrices, stream, sensitivities."""
    base = _slug(f"{group.benchmark}-{group.scenario}")
    images = []
    for name, title, figure, args in _figures(group.configs):
        image = Image(out_dir / f"{base}-{name}.png", title, png_bytes(figure(*args)))  # one figure alive at a time
        fsio.atomic_write(image.path, image.png)
        images.append(image)
    return images


def _figures(cfgs: list[Config]) -> list[tuple[str, str, Callable[..., Figure], tuple]]:
    """(file name, title, figure function, its arguments) of each figure of a group."""
    # A tune-then-test sweep: what a configuration cost is its tuning plus its final run.
    tuned = any(math.isfinite(v) for c in cfgs for v in c.values["tuning_train_flops"].values())
    compute = ("total GFLOP (tuning + final run)", "total_flops") if tuned else ("training GFLOP", "train_flops")
    figures = [("tradeoff", "Accuracy and forgetting vs training compute and storage (Pareto front dashed)",
                tradeoff_figure, (
                    [c.label for c in cfgs],
                    {compute[0]: _series(cfgs, compute[1], 1e-9),
                     "storage MB (replay + strategy state + model)": _series(cfgs, "storage_bytes", 1e-6)},
                    {"ACC": (_series(cfgs, "acc"), True), "forgetting": (_series(cfgs, "forgetting"), False)}))]
    mats = _mean_matrices(cfgs)
    if mats:
        figures += [("matrices", "Accuracy matrices (mean over seeds)", heatmap_figure, (mats,)),
                    ("stream", "Accuracy on each experience over the stream (mean over seeds)", stream_figure, (mats,))]
    figures += _drift_figures(cfgs)
    traces = mean_traces(cfgs)
    if traces:
        figures += [
            ("continual", "Accuracy over training steps (continual evaluation, mean ± 95% CI over seeds)",
             continual_figure, ([(t.label, t.steps, t.mean, t.hw) for t in traces], traces[0].boundaries)),
            ("continual-experiences", "Accuracy on each experience over training steps (mean over seeds)",
             continual_experiences_figure, ([(t.label, t.steps, t.per_experience, t.boundaries) for t in traces],))]
    by_strategy: dict[str, list[Config]] = defaultdict(list)
    for c in cfgs:
        by_strategy[c.strategy].append(c)
    for strategy, group_cfgs in by_strategy.items():
        if len(group_cfgs) > 1 and len(group_cfgs[0].varying) == 1:
            (param,) = group_cfgs[0].varying
            ordered = sorted(group_cfgs, key=lambda c: value_order(c.varying[param]))
            figures.append((f"sensitivity-{_slug(strategy)}", f"Sensitivity of {strategy} to {short(param)}",
                            sensitivity_figure, (strategy, short(param), [c.varying[param] for c in ordered],
                                                 _series(ordered, "acc"))))
    return figures


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _series(configs: list[Config], key: str, scale: float = 1.0) -> Series:
    sums = [c.summary(key) for c in configs]
    return [m * scale for m, _ in sums], [h * scale for _, h in sums]


def cka_figure(maps: Sequence[tuple[str, np.ndarray, Sequence[str]]]) -> Figure:
    """Per configuration, CKA of each layer (rows) between each old experience's probe set right after
    it was learned and at the end of the stream (columns): 1 = the representation did not change."""
    fig, axes = _panel_grid(len(maps), (3.6, 2.4))
    for ax, (label, c, layers) in zip(axes, maps):
        im = ax.imshow(c, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(c):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")
        ax.set_xticks(range(c.shape[1]), [str(j) for j in range(c.shape[1])], fontsize=7)
        ax.set_yticks(range(c.shape[0]), layers, fontsize=7)
        ax.set_xlabel("experience (probe set)")
        ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.6, label="CKA at the end vs when learned")
    return fig


def drift_figure(series: Sequence[tuple[str, dict[str, np.ndarray]]]) -> Figure:
    """Per configuration, each layer's relative weight drift after every experience."""
    fig, axes = _panel_grid(len(series), (3.8, 3.0))
    for ax, (label, by_layer) in zip(axes, series):
        for layer, d in by_layer.items():
            ax.plot(np.arange(1, len(d) + 1), d, marker=".", label=layer)
        ax.set_xlabel("after experience")
        ax.set_ylabel("||Δθ|| / ||θ||")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def _mean_probe(configs: list[Config], name: str, pick: Callable[[dict], np.ndarray]) -> list[tuple[Config, np.ndarray, dict]]:
    """(config, mean over its seeds of ``pick(artifact)``, one artifact) where the artifact exists."""
    out = []
    for c in configs:
        found = [t.probes[name] for t in c.by_seed.values() if name in t.probes]
        arrays = [np.asarray(pick(a), dtype=float) for a in found]
        if arrays and all(a.shape == arrays[0].shape for a in arrays) and arrays[0].size:
            out.append((c, np.mean(arrays, axis=0), found[0]))
    return out


def _drift_figures(cfgs: list[Config]) -> list[tuple[str, str, Callable[..., Figure], tuple]]:
    figures: list[tuple[str, str, Callable[..., Figure], tuple]] = []
    ckas = _mean_probe(cfgs, "cka.json", lambda a: [[np.nan if v is None else v for v in layer[-1][:-1]] for layer in a["C"]])
    if ckas:
        figures.append(("cka", "Representation similarity (linear CKA) of each layer at the end vs when each "
                        "experience was learned (mean over seeds)", cka_figure,
                        ([(c.label, m, a["layers"]) for c, m, a in ckas],)))
    drifts = _mean_probe(cfgs, "weight_drift.json", lambda a: a["drift"])
    if drifts:
        figures.append(("weight-drift", "Weight drift per layer over the stream (mean over seeds)", drift_figure,
                        ([(c.label, dict(zip(a["layers"], m))) for c, m, a in drifts],)))
    return figures


@dataclass(frozen=True)
class MeanTrace:
    """A configuration's continual-evaluation traces averaged over its seeds."""

    label: str
    steps: np.ndarray  # the steps every seed evaluated at
    mean: np.ndarray  # mean and 95% CI half-width over seeds of the accuracy on the experiences seen
    hw: np.ndarray
    per_experience: np.ndarray  # [step, experience] mean over seeds; NaN before an experience starts
    boundaries: list[float]  # the first seed's


def mean_traces(configs: list[Config]) -> list[MeanTrace]:
    """The mean trace of each configuration with continual-evaluation traces."""
    out = []
    for c in configs:
        runs: list[Continual] = [t.continual for t in c.by_seed.values() if t.continual is not None]
        if not runs:
            continue
        steps = np.array(sorted(set.intersection(*(set(r.steps.tolist()) for r in runs))))
        if not steps.size:
            continue
        at = [{s: i for i, s in enumerate(r.steps.tolist())} for r in runs]
        means = [[r.mean[a[s]] for r, a in zip(runs, at)] for s in steps]
        mean, hw = (np.array(x) for x in zip(*(summarize(m) for m in means)))
        width = max(len(a) for r in runs for a in r.acc)
        per_exp = np.full((len(runs), len(steps), width), np.nan)
        for k, (r, a) in enumerate(zip(runs, at)):
            for i, s in enumerate(steps):
                row = r.acc[a[s]]
                per_exp[k, i, : row.size] = row
        with warnings.catch_warnings():  # an experience not started yet at a step stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            seen = np.nanmean(per_exp, axis=0)
        out.append(MeanTrace(c.label, steps, mean, hw, seen, runs[0].boundaries))
    return out


def _mean_matrices(configs: list[Config]) -> list[tuple[str, np.ndarray, list[str]]]:
    mats = []
    for c in configs:
        ms = [t.matrix for t in c.by_seed.values() if t.matrix is not None]
        shapes = Counter(m.r.shape for m in ms)
        if shapes:  # seeds with another shape (a broken run) cannot be averaged in
            shape = shapes.most_common(1)[0][0]
            same = [m for m in ms if m.r.shape == shape]
            mats.append((c.label, np.mean([m.r for m in same], axis=0), same[0].names))
    return mats


def _accuracy_axes(ax, xlabel: str, title: str) -> None:
    """An accuracy-over-time panel's axes, legend and grid."""
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
