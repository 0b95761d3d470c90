"""`samfit compare` (registered on samfit's Typer app by `register`), and the verdict marks `samfit table
--baseline` adds to its cells."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from samfit.errors import SamfitError

console = Console()
err = Console(stderr=True)
FORMATS = ("rich", "markdown", "csv", "latex", "json")
LEGEND = ("▲ / ▼: significantly better / worse than {baseline} (paired test over test images, Holm-adjusted "
          "p < {alpha:g}; `samfit compare` gives the numbers).")


def load_runs(folders: List[Path]) -> pd.DataFrame:
    """The runs under every folder, each run once."""
    from samfit.report.collect import collect_runs

    frames = [collect_runs(f) for f in folders]
    return pd.concat(frames, ignore_index=True).drop_duplicates(subset=["path", "test_set"])


def display_frame(records: list[dict]) -> pd.DataFrame:
    """The records as printed: differences and CIs in the table's units (`display_scale`), p to 3 digits."""
    from samfit.report.table import column_label, display_scale

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


def compare(
    results: List[Path] = typer.Argument(..., help="Folders of run folders (any depth)."),
    baseline: str = typer.Option("lora", "--baseline", help="The method every other is compared with."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Metric to compare (default: each dataset's "
                                                                "headline)."),
    fmt: str = typer.Option("rich", "--format", help=" | ".join(FORMATS)),
    confidence: float = typer.Option(0.95, "--confidence", help="CI level; 1 − it is the test's level."),
    resamples: int = typer.Option(2000, "--resamples", help="Bootstrap (and permutation) resamples."),
    seed: int = typer.Option(0, "--seed", help="Seed of the resampling."),
    select: Optional[List[str]] = typer.Option(None, "--select", help="Keep per method, dataset and seed the "
                                               "value of this setting (e.g. lr) best on validation."),
):
    """Paired comparison of every method with a baseline, per dataset and test set, over test images: the
    difference over common seeds, a bootstrap CI, a p-value (Wilcoxon, or permutation for pooled metrics),
    Holm-adjusted, and a verdict."""
    from samfit.report.compare import Settings, compare_runs
    from samfit.report.table import render

    if fmt not in FORMATS:
        raise SamfitError(f"--format {fmt}: choose one of {', '.join(FORMATS)}.")
    from samfit.report.select import apply_select

    runs = apply_select(load_runs(results), results, select, lambda text: err.print(text, highlight=False))
    records, notes = compare_runs(runs, baseline, metric, Settings(confidence, resamples, seed))
    for note in notes:
        err.print(f"note: {note}", highlight=False)
    if fmt == "json":
        sys.stdout.write(json.dumps(records, indent=2) + "\n")
        return
    if fmt == "csv":
        sys.stdout.write(pd.DataFrame(records).assign(seeds=lambda f: f["seeds"].map(
            lambda s: ",".join(map(str, s)))).to_csv(index=False))
        return
    frame = display_frame(records)
    if fmt == "rich":  # constant columns are said once, in the caption
        frame = frame.drop(columns=[c for c in ("model", "vs") if frame[c].nunique() == 1])
    caption = (f"difference = method − {baseline}, mean over common seeds; {confidence:.0%} paired bootstrap CI "
               f"over test images; Holm over {len(records)} comparisons")
    if fmt == "rich":
        t = Table(title="samfit compare", caption=caption)
        for col in frame.columns:
            t.add_column(col, justify="right" if col in ("difference", "p", "p (Holm)", "images") else "left",
                         overflow="fold")
        for _, row in frame.iterrows():
            t.add_row(*(str(v) for v in row))
        console.print(t)
    else:
        sys.stdout.write(render(frame, fmt) + f"\n\n{caption}.\n")
    ranks_section(runs, metric, fmt)


def ranks_section(runs: pd.DataFrame, metric: str | None, fmt: str) -> None:
    """Average rank per method across test sets and the Friedman test (rich, markdown and latex output)."""
    from samfit.report.compare import friedman_ranks
    from samfit.report.table import render

    result, why = friedman_ranks(runs, metric)
    if result is None:
        err.print(f"note: {why}", highlight=False)
        return
    frame = pd.DataFrame({"method": result["methods"], "average rank": [f"{r:.2f}" for r in result["average_rank"]]})
    line = (f"Friedman test over {result['test_sets']} test sets and {len(frame)} methods: chi-square = "
            f"{result['statistic']:.3g}, p = {result['p_value']:.3g} (rank 1 = best)")
    if fmt == "rich":
        t = Table(title="average rank across test sets", caption=line)
        for col in frame.columns:
            t.add_column(col)
        for _, row in frame.sort_values("average rank").iterrows():
            t.add_row(*row)
        console.print(t)
    else:
        sys.stdout.write("\n" + render(frame.sort_values("average rank"), fmt) + f"\n\n{line}.\n")


def marks_for(runs: pd.DataFrame, baseline: str, metric: str | None) -> tuple[dict, str]:
    """`samfit table --baseline`: the cells' marks and the legend."""
    from samfit.report.compare import Settings, compare_runs, verdict_marks

    settings = Settings()
    records, notes = compare_runs(runs, baseline, metric, settings)
    for note in notes:
        err.print(f"note: {note}", highlight=False)
    return verdict_marks(records), LEGEND.format(baseline=baseline, alpha=round(1 - settings.confidence, 6))


def register(app: typer.Typer) -> None:
    app.command()(compare)
