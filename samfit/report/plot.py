"""Accuracy against cost, as a paper would print it: for every dataset (test set), the metric (mean over seeds,
error bars = std over seeds) against the *encoder-side* trainable parameters on a log axis (every method trains
the same decoder, which would otherwise put every point at ~3.5M) and against the training step time; the Pareto
front (no other method is both cheaper and better) drawn as a step line; method labels pushed apart so they do
not overlap. Methods with no encoder-side parameters (decoder-only) sit at a symbolic position left of the log
axis, on a tick labelled 0 and behind a break mark. `samfit plot DIR`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from samfit.report.efficiency import area, split_fraction
from samfit.report.table import column_label, display_scale

# (summary column, axis label, scale, file suffix, log axis)
AXES = (("encoder_trainable", "encoder-side trainable parameters", 1.0, "params", True),
        ("step_time_s", "training step time (s, median)", 1.0, "step_time", False))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def pareto_front(cost, score, lower_is_better: bool = False) -> list[int]:
    """Indices of the points no other point dominates (cost <= and score at least as good, one of them strictly),
    in order of increasing cost. NaN points are never on the front."""
    cost, score = np.asarray(cost, float), np.asarray(score, float)
    good = -score if lower_is_better else score  # higher is better from here on
    front = []
    for i in range(len(cost)):
        if math.isnan(cost[i]) or math.isnan(good[i]):
            continue
        dominated = any(j != i and not math.isnan(cost[j]) and not math.isnan(good[j]) and cost[j] <= cost[i]
                        and good[j] >= good[i] and (cost[j] < cost[i] or good[j] > good[i])
                        for j in range(len(cost)))
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (cost[i], -good[i]))


def symbolic_zero(x: np.ndarray) -> float | None:
    """Where a zero count goes on the log axis: a decade below the smallest positive count (None: no zero)."""
    positive = x[x > 0]
    if not (x <= 0).any():
        return None
    return 10 ** (math.floor(math.log10(positive.min())) - 1) if len(positive) else 1.0


def repel_labels(ax, texts, iterations: int = 300, pad: float = 2.0, points=()) -> int:
    """Push overlapping annotations apart (along the line between their centres, mostly vertically) and keep
    them inside the axes, until no two boxes overlap or the iterations run out; returns how many overlapping
    pairs are left. `points` (data coordinates) are obstacles labels are pushed off too, without counting.
    Offsets are in points, boxes in display pixels."""
    from matplotlib.text import Text

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_points = 72 / fig.dpi
    marks = [tuple(ax.transData.transform(p)) for p in points]
    left = 0
    for _ in range(iterations):
        boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the text alone, not its leader line
        shifts = np.zeros((len(texts), 2))
        left = 0
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                a, b = boxes[i], boxes[j]
                if a.x1 + pad < b.x0 or b.x1 + pad < a.x0 or a.y1 + pad < b.y0 or b.y1 + pad < a.y0:
                    continue
                left += 1
                dx = (a.x0 + a.x1 - b.x0 - b.x1) / 2
                dy = (a.y0 + a.y1 - b.y0 - b.y1) / 2 or (1.0 if i < j else -1.0)
                norm = math.hypot(dx * 0.3, dy) or 1.0
                step = np.array([dx * 0.3, dy]) / norm * 3.0
                shifts[i] += step
                shifts[j] -= step
        for k, box in enumerate(boxes):  # off the markers
            for m, (px, py) in enumerate(marks):
                if m != k and box.x0 - 5 < px < box.x1 + 5 and box.y0 - 5 < py < box.y1 + 5:
                    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
                    shifts[k, 1] += 2.0 if cy >= py else -2.0
                    shifts[k, 0] += 1.0 if cx >= px else -1.0
        for k, t in enumerate(texts):  # inside the axes
            box = boxes[k]
            if box.x0 + shifts[k, 0] < frame.x0:
                shifts[k, 0] = frame.x0 - box.x0
            if box.x1 + shifts[k, 0] > frame.x1:
                shifts[k, 0] = frame.x1 - box.x1
            if box.y0 + shifts[k, 1] < frame.y0:
                shifts[k, 1] = frame.y0 - box.y0
            if box.y1 + shifts[k, 1] > frame.y1:
                shifts[k, 1] = frame.y1 - box.y1
            if shifts[k].any():
                x, y = t.xyann
                t.xyann = (x + shifts[k, 0] * to_points, y + shifts[k, 1] * to_points)
        if not left:
            return 0
    return left


def fraction_curves(summary: pd.DataFrame) -> pd.DataFrame:
    """Data efficiency: per (dataset, test set, metric, method, model) run at two or more train fractions, the
    fractions, the means and stds over seeds, and the area under the metric-vs-fraction curve (trapezoid on a
    linear fraction axis, divided by the fraction range: the curve's mean value; `efficiency.area`)."""
    frame = summary.copy()
    split = [split_fraction(d) for d in frame["dataset"]]
    frame["base"], frame["fraction"] = [d for d, _ in split], [f for _, f in split]
    rows = []
    for key, group in frame.groupby(["base", "test_set", "metric", "method", "model"], sort=False):
        if group["fraction"].nunique() < 2:
            continue
        group = group.sort_values("fraction")
        f, y = group["fraction"].to_numpy(), group["mean"].to_numpy()
        auc = area(f, y)
        rows.append({**dict(zip(["dataset", "test_set", "metric", "method", "model"], key)),
                     "lower_is_better": bool(group["lower_is_better"].iloc[0]), "fractions": f.tolist(),
                     "means": y.tolist(), "stds": group["std"].to_numpy().tolist(), "auc": auc})
    return pd.DataFrame(rows)


def plot_fractions(summary: pd.DataFrame, out_dir: Path, plt) -> list[Path]:
    """One PNG per (dataset, test set, metric) with runs at several train fractions: a curve per method (log
    fraction axis, error bars over seeds), the area under each curve in the legend."""
    curves = fraction_curves(summary)
    written = []
    if curves.empty:
        return written
    for (dataset, test_set, metric), group in curves.groupby(["dataset", "test_set", "metric"], sort=False):
        factor, digits = display_scale(metric)
        fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=110)
        for _, c in group.sort_values("auc", ascending=bool(group["lower_is_better"].iloc[0])).iterrows():
            name = c["method"] if group["model"].nunique() == 1 else f"{c['method']} ({c['model']})"
            ax.errorbar(c["fractions"], np.array(c["means"]) * factor, yerr=np.array(c["stds"]) * factor,
                        marker="o", capsize=3, label=f"{name}: area {c['auc'] * factor:.{digits}f}")
        ax.set_xscale("log")
        ticks = sorted({f for fs in group["fractions"] for f in fs})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
        label = column_label((dataset, test_set, metric))
        ax.set_xlabel("share of the training split (log)")
        ax.set_ylabel(f"{metric}{' ×100' if factor == 100 else ''}")
        ax.set_title(f"{label} vs training data (mean ± std over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="area under the curve (linear fraction axis, ÷ its range)", title_fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{slug(label)}_vs_fraction.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def plot_summary(summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write two PNGs per (dataset, test set, metric), and a data-efficiency PNG per one run at several train
    fractions; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    markers = "osD^vP*Xh"
    for (dataset, test_set, metric), group in summary.groupby(["dataset", "test_set", "metric"], sort=False):
        label = column_label((dataset, test_set, metric))
        factor, _ = display_scale(metric)
        lower = bool(group["lower_is_better"].iloc[0])
        models = list(dict.fromkeys(group["model"]))
        for column, xlabel, xscale, name, log in AXES:
            if column not in group:
                continue
            fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=110)
            texts = []
            for i, model in enumerate(models):
                part = group[group["model"] == model]
                x = part[column].astype(float).to_numpy() * xscale
                y = part["mean"].to_numpy() * factor
                zero = symbolic_zero(x) if log else None
                shown = np.where(x <= 0, zero, x) if zero is not None else x
                ax.errorbar(shown, y, yerr=part["std"].to_numpy() * factor, fmt=markers[i % len(markers)],
                            capsize=3, label=model if len(models) > 1 else None)
                front = pareto_front(x, y, lower)
                ax.scatter(shown[front], y[front], s=160, facecolors="none", edgecolors="black", lw=1.0,
                           label="on the Pareto front" if i == 0 else None)
                if len(front) > 1:
                    ax.step(shown[front], y[front], where="post", color="0.4", lw=1, ls="--", zorder=0,
                            label="Pareto front" if i == 0 else None)
                for k, (xi, yi, method) in enumerate(zip(shown, y, part["method"])):
                    texts.append(ax.annotate(method, (xi, yi),
                                             textcoords="offset points", xytext=(5, 3), fontsize=8,
                                             arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5)))
            if log:
                ax.set_xscale("log")
                xs = group[column].astype(float).to_numpy() * xscale
                zero = symbolic_zero(xs)
                if zero is not None:  # one decade below the smallest count, behind a dotted break
                    hi = max(xs.max() * 2, zero * 100)
                    ax.set_xlim(zero / 2.5, hi)
                    ax.axvline(zero * 3, color="0.6", lw=0.8, ls=":")
                    first = int(round(math.log10(zero))) + 1
                    decades = [10.0 ** e for e in range(first, int(math.floor(math.log10(hi))) + 1)]
                    ax.set_xticks([zero, *decades])
                    ax.set_xticklabels(["0", *[f"$10^{{{int(round(math.log10(d)))}}}$" for d in decades]])
                    ax.minorticks_off()
                ax.set_xlabel(xlabel + " (log; 0 = decoder only, left of the dotted break)"
                              if zero is not None else xlabel + " (log)")
            else:
                ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{metric}{' ×100' if factor == 100 else ''}{' (lower is better)' if lower else ''}")
            ax.set_title(f"{label} vs {xlabel.split(' (')[0]}\n(mean ± std over seeds; circled: on the Pareto front)",
                         fontsize=10)
            ax.grid(alpha=0.3)
            ax.margins(y=0.15)
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=8, loc="best")
            fig.tight_layout()
            repel_labels(ax, texts, points=[t.xy for t in texts])
            path = out_dir / f"{slug(label)}_vs_{name}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written + plot_fractions(summary, out_dir, plt)
