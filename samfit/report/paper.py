"""The paper's published numbers beside samfit's: `samfit table DIR --paper`.

benchmarks/paper_reference.csv holds one published value per row: dataset, test_set, metric (samfit's metric
key), method, value (as the paper prints it: ×100 except MAE), note, source, and optionally `computed_as`: the
samfit column computed the way the paper computed it, where that differs from `metric` (the official code's
conventions: `weighted_f_beta2_0.3` for F^w_β, `ber_per_image` for BER, `miou_trans2seg` for mIoU).
`add_paper` puts, after every column of the comparison grid that has published values, a `paper` column and a
`Δ` column (samfit's mean minus the paper's value, in the same units), and a `paper source` column per method.
Given the runs, Δ compares the paper with the `computed_as` column, and the Δ column's name says so
(`sbu ber Δ vs ber_per_image`); runs that lack that column are compared on `metric`, and a note says which.

The paper's numbers come from the official code's recipe, so Δ compares them with the runs of `--protocol
official` (reports key those rows by 'vit_h (official)', `collect.protocol_label`); rows of samfit's protocol in
the same table show the paper's value without a Δ. Only when no row is official is Δ taken from samfit's runs, and
a note says the recipes differ. A `protocol` column marks every row.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from samfit.errors import SamfitError
from samfit.report.collect import protocol_label
from samfit.report.table import column_label, display_scale

REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_reference.csv"
COLUMNS = ("dataset", "test_set", "metric", "method", "value", "source")
PAPER_PROTOCOL = "official"  # the recipe the published numbers were made with


def row_protocol(model: str) -> str:
    """The protocol of a report row from its model label ('vit_h (official)' → official, 'vit_h' → samfit)."""
    return PAPER_PROTOCOL if model.endswith(protocol_label("", PAPER_PROTOCOL)) else "samfit"


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    path = Path(path) if path else REFERENCE
    if not path.is_file():
        raise SamfitError(f"Reference numbers not found: {path}. Pass --reference FILE (a CSV with columns "
                          f"{', '.join(COLUMNS)}).")
    try:
        ref = pd.read_csv(path, dtype={"test_set": str, "value": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SamfitError(f"{path} is not a readable CSV: {exc}") from None
    missing = [c for c in COLUMNS if c not in ref.columns]
    if missing:
        raise SamfitError(f"{path} lacks the column(s) {', '.join(missing)}; it needs {', '.join(COLUMNS)}.")
    values = pd.to_numeric(ref["value"], errors="coerce")
    if values.isna().any():
        bad = ref.loc[values.isna()].index[0] + 2
        raise SamfitError(f"{path}, line {bad}: value {ref['value'].iloc[bad - 2]!r} is not a number.")
    ref["printed"] = ref["value"].str.strip()  # as the paper prints it (92.0, not 92)
    ref["value"] = values
    ref["source"] = ref["source"].fillna("")
    computed = ref["computed_as"] if "computed_as" in ref.columns else pd.Series([None] * len(ref))
    ref["computed_as"] = [c.strip() if isinstance(c, str) and c.strip() else m
                          for c, m in zip(computed, ref["metric"])]
    return ref


def add_paper(grid: pd.DataFrame, summary: pd.DataFrame, reference: pd.DataFrame,
              runs: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The grid with `<column> paper` and `<column> Δ` after each column that has published numbers, and a
    `paper source` column. Also returns notes on the published numbers that have no column in this grid, and
    on the column each Δ was computed from. `runs` (collect_runs' frame) gives the `computed_as` columns."""
    from samfit.report.table import summarise

    published: dict[tuple[str, str], tuple[float, str, str]] = {}
    by_label: dict[str, list[str]] = {}
    computed_as: dict[str, str] = {}  # grid column label -> the samfit metric computed the paper's way
    labels: dict[tuple[str, str, str], str] = {}  # (dataset, test set, computed_as) -> grid column label
    for r in reference.itertuples():
        label = column_label((r.dataset, r.test_set, r.metric))
        published[(r.method, label)] = (float(r.value), r.source, r.printed)
        by_label.setdefault(label, []).append(f"{r.method} {r.printed}")
        if r.computed_as != r.metric:
            computed_as[label] = r.computed_as
            labels[(r.dataset, r.test_set, r.computed_as)] = label
    ours: dict[tuple[str, str, str], float] = {}
    for r in summary.itertuples():
        factor, _ = display_scale(r.metric)
        ours[(r.method, r.model, column_label((r.dataset, r.test_set, r.metric)))] = r.mean * factor
    official: dict[tuple[str, str, str], float] = {}  # the same keys, from the computed_as columns
    for metric in sorted(set(computed_as.values())):
        if runs is None or metric not in runs.columns or not runs[metric].notna().any():
            continue
        for r in summarise(runs[runs[metric].notna()], metric).itertuples():
            label = labels.get((r.dataset, r.test_set, metric))
            if label is not None:
                official[(r.method, r.model, label)] = r.mean * display_scale(metric)[0]

    out = grid.copy()
    shown = [c for c in grid.columns if c in by_label]
    rows = list(grid.itertuples(index=False))
    protocols = [row_protocol(row[1]) for row in rows]
    like_paper = PAPER_PROTOCOL in protocols  # compare with the official runs only, when there are any
    compared = [p == PAPER_PROTOCOL or not like_paper for p in protocols]
    notes = protocol_notes(protocols) if shown else []
    for label in shown:
        paper, delta = [], []
        use_official = label in computed_as and any((row[0], row[1], label) in official
                                                    for row, c in zip(rows, compared) if c)
        source = official if use_official else ours
        for row, counted in zip(rows, compared):
            method, model = row[0], row[1]
            value = published.get((method, label))
            mine = source.get((method, model, label)) if counted else None
            paper.append("—" if value is None else value[2])
            delta.append("—" if value is None or mine is None else f"{mine - value[0]:+.2f}")
        at = list(out.columns).index(label) + 1
        out.insert(at, f"{label} paper", paper)
        out.insert(at + 1, f"{label} Δ vs {computed_as[label]}" if use_official else f"{label} Δ", delta)
        if label in computed_as:
            notes.append(f"{label}: the paper's value is computed as samfit's {computed_as[label]} (the official "
                         f"code's convention); Δ = "
                         + (f"{computed_as[label]} − paper" if use_official else
                            f"{label.split()[-1]} − paper, as these runs have no {computed_as[label]} column "
                            f"(re-evaluate them to compare like with like)"))
    if shown:
        out.insert(list(out.columns).index("model") + 1, "protocol", protocols)
        out["paper source"] = ["; ".join(sorted({published[(row[0], label)][1] for label in shown
                                                 if (row[0], label) in published})) or "—"
                               for row in grid.itertuples(index=False)]
    missing = [label for label in by_label if label not in shown]
    if not shown:
        notes.append(f"none of these runs' columns has published numbers (the reference has {', '.join(by_label)})")
    elif missing:
        notes.append(f"published numbers without a column here: {', '.join(missing)} (run those datasets, or "
                     f"pick the metric with --metric)")
    return out, notes


def protocol_notes(protocols: list[str]) -> list[str]:
    """What Δ compares the paper with, given the rows' protocols."""
    official, samfit = protocols.count(PAPER_PROTOCOL), protocols.count("samfit")
    if not official:
        return ["no row here ran --protocol official, the recipe the paper's numbers came from: Δ compares the "
                "paper with samfit's protocol, whose loss, batching, optimiser groups and scoring differ "
                "(docs/reference.md, Differences from the official code; benchmarks/paper.yaml runs the official one)"]
    note = (f"Δ compares the paper with the {official} row(s) of the official protocol (the recipe its numbers "
            f"came from), in the columns computed the paper's way where they differ")
    if samfit:
        note += f"; the {samfit} row(s) of samfit's protocol show the paper's value without Δ"
    return [note]
