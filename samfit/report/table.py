"""The comparison table: methods × datasets (test sets), headline metric as mean ± std over seeds."""
from __future__ import annotations

import pandas as pd
from tabulate import tabulate

from samfit.errors import SamfitError
from samfit.methods import ORDER
from samfit.report.collect import EVAL_MARK, model_of

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
        trainable=("trainable", "first"), encoder_trainable=("encoder_trainable", "first"),
        percent_of_sam=("percent_of_sam", "first"),
        step_time_s=("step_time_s", "median"), peak_memory_mb=("peak_memory_mb", "median")).reset_index()
    grouped["std"] = grouped["std"].fillna(0.0)
    rank = {m: i for i, m in enumerate(ORDER)}
    grouped["order"] = grouped["method"].map(lambda m: rank.get(m.partition("@")[0], len(rank)))  # lora@last:3 by lora
    return grouped.sort_values(["order", "method"]).drop(columns="order")


def comparison_grid(summary: pd.DataFrame, marks: dict | None = None) -> pd.DataFrame:
    """Wide table: one row per method (and model), one column per dataset/test set (mean ± sample std over
    seeds, no ± for a single seed), best per column marked
    with '*' (when more than one method ran). Scores are shown as the paper prints them (`display_scale`);
    a method without runs on a dataset shows '—'. `marks` ((method, model, dataset, test set, metric) -> '▲'
    or '▼', from `samfit.report.compare.verdict_marks`) are appended to their cells."""
    best = {}
    for col, group in summary.groupby(["dataset", "test_set", "metric"], sort=False):
        lower = bool(group["lower_is_better"].iloc[0])
        best[col] = group["mean"].min() if lower else group["mean"].max()
    table = []
    for (method, model), group in summary.groupby(["method", "model"], sort=False):
        row = {"method": method, "model": model, "trainable": int(group["trainable"].iloc[0]),
               "% of SAM": round(float(group["percent_of_sam"].iloc[0]), 3)}
        for _, r in group.iterrows():
            col = (r["dataset"], r["test_set"], r["metric"])
            factor, digits = display_scale(r["metric"])
            spread = f" ± {r['std'] * factor:.{digits}f}" if r["seeds"] > 1 else ""  # no spread from one seed
            text = f"{r['mean'] * factor:.{digits}f}{spread} (n={r['seeds']})"
            text += " *" if r["mean"] == best[col] and summary["method"].nunique() > 1 else ""
            mark = (marks or {}).get((method, model, *col))
            row[column_label(col)] = f"{text} {mark}" if mark else text
        row["step s"] = round(float(group["step_time_s"].median()), 4)
        row["peak MB"] = round(float(group["peak_memory_mb"].median()), 1)
        table.append(row)
    columns = sorted(best, key=lambda c: EVAL_MARK in c[0])  # `samfit evaluate`'s columns after the run's own
    order = ["method", "model", "trainable", "% of SAM", *(column_label(c) for c in columns), "step s", "peak MB"]
    table += not_applicable_rows(summary, order)
    return pd.DataFrame(table)[order].fillna("—")


def not_applicable_rows(summary: pd.DataFrame, order: list[str]) -> list[dict]:
    """A row of "n/a" for each method of the table on each model of the table it has no faithful form on
    (methods/base.py `requires`), e.g. FacT on SAM 2: absent by design, not a missing run."""
    from samfit.methods import REGISTRY
    from samfit.methods.base import missing_features

    rows = []
    for method in summary["method"].unique():
        cls = REGISTRY.get(method.partition("@")[0])
        for model in summary["model"].unique():
            if cls is not None and missing_features(cls, model_of(model)):  # 'vit_h (official)' is vit_h
                rows.append({**{k: "n/a" for k in order}, "method": method, "model": model})
    return rows


def display_frame(records: list[dict]) -> pd.DataFrame:
    """The records as printed: differences and CIs in the table's units (`display_scale`), p to 3 digits."""
    rows = []
    for r in records:
        factor, digits = display_scale(r["metric"])
        rows.append({"test set": column_label((r["dataset"], r["test_set"], r["metric"])), "model": r["model"],
                     "method": r["method"], "vs": r["baseline"],
                     "difference": f"{r['difference'] * factor:+.{digits}f}",
                     "CI": f"[{r['ci_low'] * factor:+.{digits}f}, {r['ci_high'] * factor:+.{digits}f}]",
                     "p": f"{r['p_value']:.3g}", "p (Holm)": f"{r['p_holm']:.3g}", "verdict": r["verdict"],
                     "images": r["n_images"], "seeds": ",".join(map(str, r["seeds"]))})
    return pd.DataFrame(rows)


def display_scale(metric: str) -> tuple[float, int]:
    """(factor, decimals) to print a metric like the paper: scores in [0, 1] ×100; BER is already ×100; MAE
    stays in [0, 1] with three decimals (ber_per_image is ×100 like ber). An area under the fraction curve
    ('iou_per_image@area') is in its metric's units."""
    return {"ber": (1, 2), "ber_per_image": (1, 2), "mae": (1, 3)}.get(metric.removesuffix("@area"), (100, 2))


def column_label(col) -> str:
    """(dataset, test set, metric) -> the table's column name, e.g. 'polyp/kvasir s_measure'."""
    dataset, test_set, metric = col
    where = dataset if test_set in ("test", dataset) else f"{dataset}/{test_set}"
    return f"{where} {metric}"


def render(frame: pd.DataFrame, fmt: str) -> str:
    if fmt == "markdown":
        return tabulate(frame, headers="keys", tablefmt="github", showindex=False)
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "latex":  # tabulate escapes LaTeX's specials; the non-ASCII symbols become math / dashes
        latex = tabulate(frame, headers="keys", tablefmt="latex_booktabs", showindex=False)
        return latex.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("—", "---").replace("→", r"$\to$")
    if fmt == "html":
        return tabulate(frame, headers="keys", tablefmt="html", showindex=False)
    raise SamfitError(f"--format {fmt}: choose one of {', '.join(FORMATS)}.")
