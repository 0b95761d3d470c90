"""Tuned baselines: a grid axis *selected* rather than shown. `select_best(runs, ["lr"])` keeps, for every
(method, dataset, model, image size, seed and any other setting that differs), the run whose validation headline
metric (metrics.json's `selection.value`, the score that picked the best epoch; lower-is-better aware) is best
over the values of the selected axes. A test score never takes part. `samfit table/compare --select lr`, or a
grid file's `select: [lr]` (written to the grid's grid.json, read when FOLDER holds one).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from samfit.errors import SamfitError
from samfit.report.collect import run_setting

KEEP = ("method", "dataset", "model", "image_size", "seed")  # a run's identity besides its settings
NEVER = ("method", "dataset", "seed")  # what a comparison is over: selecting them would pick the winner on val


def axis_column(axis: str) -> str:
    return f"setting:{axis}"


def with_axes(runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """`runs` with one column per axis (`setting:lr`), read from each run's config.yaml (metrics.json for a run
    without one); a setting missing there is RunConfig's default."""
    runs = runs.copy()
    for axis in axes:
        runs[axis_column(axis)] = [run_setting(path, axis) for path in runs["path"]]
    return runs


def select_best(runs: pd.DataFrame, axes: list[str], others: tuple[str, ...] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows of the winning runs, one row per group naming the value that won and its validation score).

    Groups are KEEP plus `others` (further settings to keep apart, e.g. train_fraction); within a group the runs
    differ in the axes, and the one with the best `selection_value` wins (ties: the first in value order)."""
    axes = list(dict.fromkeys(axes))
    bad = [a for a in axes if a in NEVER]
    if bad:
        raise SamfitError(f"--select {', '.join(bad)}: a comparison is over methods, datasets and seeds; select a "
                          f"setting such as lr.")
    if not axes:
        return runs, pd.DataFrame()
    runs = with_axes(runs, axes)
    missing = runs[runs["selection_value"].map(lambda v: not isinstance(v, (int, float)) or math.isnan(v))]
    if not missing.empty:
        raise SamfitError(f"--select needs every run's validation score (metrics.json selection.value); "
                          f"{missing['path'].iloc[0]} has none. Re-run it, or leave it out of FOLDER.")
    columns = [axis_column(a) for a in axes]
    group_keys = [*KEEP, *others]
    per_run = runs.drop_duplicates(subset="path")
    winners, chosen = [], []
    for key, group in per_run.groupby(group_keys, sort=False, dropna=False):
        lower = bool(group["lower_is_better"].iloc[0])
        group = group.sort_values(columns, key=lambda c: c.map(_sortable))
        best = group.loc[group["selection_value"].idxmin() if lower else group["selection_value"].idxmax()]
        winners.append(best["path"])
        chosen.append({**dict(zip(group_keys, key)), **{a: best[axis_column(a)] for a in axes},
                       "validation": float(best["selection_value"]), "candidates": len(group),
                       "of": ", ".join(f"{_show(v)}" for v in group[columns[0]])})
    kept = runs[runs["path"].isin(winners)].drop(columns=columns)
    return kept.reset_index(drop=True), pd.DataFrame(chosen)


def _sortable(value):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def selection_table(chosen: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Which value won, per method, model and dataset: each seed's winner, e.g. 's0 0.0003, s1 0.001'."""
    rows = []
    for (method, model, dataset), group in chosen.groupby(["method", "model", "dataset"], sort=False):
        row = {"method": method, "model": model, "dataset": dataset}
        for axis in axes:
            row[f"{axis} selected"] = ", ".join(f"s{s} {_show(v)}" for s, v in zip(group["seed"], group[axis]))
        row["out of"] = group["of"].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def grid_select(folders: list[Path]) -> list[str]:
    """The axes a grid file selects (`select:`), from grid.json in any of these folders."""
    axes: list[str] = []
    for folder in folders:
        path = Path(folder) / "grid.json"
        if path.is_file():
            try:
                axes += json.loads(path.read_text()).get("select") or []
            except (json.JSONDecodeError, OSError, AttributeError):
                continue
    return list(dict.fromkeys(axes))


def apply_select(runs: pd.DataFrame, folders: list[Path], select: list[str] | None, echo) -> pd.DataFrame:
    """The command line's `--select` (else the grid's own `select:`): the winning runs, with `echo(text)` told
    which value won."""
    from samfit.report.table import render

    axes = list(select or []) or grid_select(folders)
    if not axes:
        return runs
    others = tuple(a for a in ("train_fraction",) if a not in axes)
    kept, chosen = select_best(runs, axes, others)
    source = "--select" if select else "the grid's `select:` (grid.json)"
    echo(f"selected {', '.join(axes)} per method, dataset and seed on the validation headline metric ({source}):\n"
         + render(selection_table(chosen, axes), "markdown"))
    return kept
