"""Accuracy against cost: for every dataset (test set), the headline metric (mean ± std over seeds) against
trainable parameters and against training step time, one point per method. `samfit plot DIR`."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from samfit.report.table import column_label, display_scale

AXES = (("trainable", "trainable parameters (millions)", 1e-6, "params"),
        ("step_time_s", "training step time (s, median)", 1.0, "step_time"))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plot_summary(summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write two PNGs per (dataset, test set, metric); returns their paths."""
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
        for column, xlabel, xscale, name in AXES:
            fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
            for i, model in enumerate(models):
                part = group[group["model"] == model]
                x = part[column].astype(float) * xscale
                ax.errorbar(x, part["mean"] * factor, yerr=part["std"] * factor, fmt=markers[i % len(markers)],
                            capsize=3, label=model if len(models) > 1 else None)
                for xi, yi, method in zip(x, part["mean"] * factor, part["method"]):
                    ax.annotate(method, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{metric}{' ×100' if factor == 100 else ''}{' (lower is better)' if lower else ''}")
            ax.set_title(f"{label} vs {xlabel.split(' (')[0]}")
            ax.grid(alpha=0.3)
            if len(models) > 1:
                ax.legend(title="model")
            fig.tight_layout()
            path = out_dir / f"{slug(label)}_vs_{name}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written
