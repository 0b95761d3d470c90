"""The comparison table: methods × datasets (test sets), headline metric as mean ± std over seeds."""
from __future__ import annotations

import pandas as pd
from tabulate import tabulate

from samfit.errors import SamfitError
from samfit.methods import ORDER

FORMATS = ("rich", "markdown", "csv", "latex", "html")


def summarise(runs: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Group by method, dataset, test set and model: mean, std and count over seeds."""
    runs = runs.copy()
    runs["metric"] = metric or runs["headline"]
    if metric and metric not in runs.columns:
        raise SamfitError(f"Metric '{metric}' is not in these runs. Available: "
                          f"{', '.join(c for c in runs.columns if runs[c].dtype.kind == 'f' and c not in ('percent_of_sam',))}.")
    runs["value"] = [row[row["metric"]] for _, row in runs.iterrows()]
    keys = ["method", "dataset", "test_set", "model", "metric", "lower_is_better"]
    grouped = runs.groupby(keys, sort=False).agg(
        mean=("value", "mean"), std=("value", "std"), seeds=("seed", "nunique"),
        trainable=("trainable", "first"), percent_of_sam=("percent_of_sam", "first"),
        step_time_s=("step_time_s", "median"), peak_memory_mb=("peak_memory_mb", "median")).reset_index()
    grouped["std"] = grouped["std"].fillna(0.0)
    rank = {m: i for i, m in enumerate(ORDER)}
    grouped["order"] = grouped["method"].map(lambda m: rank.get(m, len(rank)))
    return grouped.sort_values(["order", "method"]).drop(columns="order")


def comparison_grid(summary: pd.DataFrame, scale: float | None = None) -> pd.DataFrame:
    """Wide table: one row per method (and model), one column per dataset/test set, best per column marked
    with '*'. Scores in [0, 1] are shown ×100 like the paper."""
    cells, best = {}, {}
    for col, group in summary.groupby(["dataset", "test_set", "metric"], sort=False):
        lower = bool(group["lower_is_better"].iloc[0])
        best[col] = group["mean"].min() if lower else group["mean"].max()
    table = []
    for (method, model), group in summary.groupby(["method", "model"], sort=False):
        row = {"method": method, "model": model, "trainable": int(group["trainable"].iloc[0]),
               "% of SAM": round(float(group["percent_of_sam"].iloc[0]), 3)}
        for _, r in group.iterrows():
            col = (r["dataset"], r["test_set"], r["metric"])
            factor = 100 if r["metric"] not in ("ber", "mae") or r["metric"] == "mae" else 1
            factor = 1 if r["metric"] == "ber" else (100 if r["metric"] != "mae" else 1)
            text = f"{r['mean'] * factor:.2f} ± {r['std'] * factor:.2f} (n={r['seeds']})"
            row[_label(col)] = text + (" *" if r["mean"] == best[col] and summary["method"].nunique() > 1 else "")
        row["step s"] = round(float(group["step_time_s"].median()), 4)
        row["peak MB"] = round(float(group["peak_memory_mb"].median()), 1)
        table.append(row)
    cells = pd.DataFrame(table)
    return cells


def _label(col) -> str:
    dataset, test_set, metric = col
    where = dataset if test_set in ("test", dataset) else f"{dataset}/{test_set}"
    return f"{where} {metric}"


def render(frame: pd.DataFrame, fmt: str) -> str:
    if fmt == "markdown":
        return tabulate(frame, headers="keys", tablefmt="github", showindex=False)
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "latex":
        return tabulate(frame, headers="keys", tablefmt="latex_booktabs", showindex=False)
    if fmt == "html":
        return tabulate(frame, headers="keys", tablefmt="html", showindex=False)
    raise SamfitError(f"--format {fmt}: choose one of {', '.join(FORMATS)}.")
