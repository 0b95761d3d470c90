"""`samfit compare` and `samfit report` (registered on samfit's Typer app by `register`), and the verdict marks
`samfit table --baseline` adds to its cells."""
from __future__ import annotations

import json
import os
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
    rope: Optional[float] = typer.Option(None, "--rope", help="Also the Bayesian signed-rank test across test "
                                         "sets (baycomp) with this region of practical equivalence, in the "
                                         "table's units (0.5 = half a point)."),
    cd_diagram: Optional[Path] = typer.Option(None, "--cd-diagram", help="Write the critical-difference "
                                              "diagram across test sets to this PNG."),
):
    """Paired comparison of every method with a baseline, per dataset and test set, over test images: the
    difference over common seeds, a bootstrap CI, a p-value (Wilcoxon, or permutation for pooled metrics),
    Holm-adjusted, and a verdict."""
    from samfit.report.compare import Settings, compare_runs
    from samfit.report.table import display_frame, render

    if fmt not in FORMATS:
        raise SamfitError(f"--format {fmt}: choose one of {', '.join(FORMATS)}.")
    if rope is not None:
        from samfit.report.bayes import check_rope

        check_rope(rope)
    from samfit.report.select import apply_select

    runs = apply_select(load_runs(results), results, select, lambda text: err.print(text, highlight=False))
    records, notes = compare_runs(runs, baseline, metric, Settings(confidence, resamples, seed))
    for note in notes:
        err.print(f"note: {note}", highlight=False)
    if cd_diagram is not None:
        write_cd_diagram(runs, metric, cd_diagram)
    if fmt == "json":
        sys.stdout.write(json.dumps(records, indent=2) + "\n")
        return
    if fmt == "csv":
        joined = {k: (lambda f, k=k: f[k].map(lambda s: ",".join(f"{v:g}" for v in s))) for k in ("seeds", "fractions")}
        sys.stdout.write(pd.DataFrame(records).assign(**joined).to_csv(index=False))
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
    if rope is not None:
        bayes_section(runs, baseline, rope, metric, seed, fmt)


def print_frame(frame: pd.DataFrame, title: str, caption: str, fmt: str) -> None:
    from samfit.report.table import render

    if fmt == "rich":
        t = Table(title=title, caption=caption)
        for col in frame.columns:
            t.add_column(col)
        for _, row in frame.iterrows():
            t.add_row(*(str(v) for v in row))
        console.print(t)
    else:
        sys.stdout.write("\n" + render(frame, fmt) + f"\n\n{caption}.\n")


def ranks_section(runs: pd.DataFrame, metric: str | None, fmt: str) -> None:
    """Average rank per method across test sets and the Friedman test (rich, markdown and latex output)."""
    from samfit.report.ranks import friedman_ranks

    result, why = friedman_ranks(runs, metric)
    if result is None:
        err.print(f"note: {why}", highlight=False)
        return
    frame = pd.DataFrame({"method": result["methods"], "average rank": [f"{r:.2f}" for r in result["average_rank"]]})
    line = (f"Friedman test over {result['test_sets']} test sets and {len(frame)} methods: chi-square = "
            f"{result['statistic']:.3g}, p = {result['p_value']:.3g} (rank 1 = best)")
    print_frame(frame.sort_values("average rank"), "average rank across test sets", line, fmt)


def write_cd_diagram(runs: pd.DataFrame, metric: str | None, path: Path) -> None:
    from samfit.report.ranks import cd_diagram, friedman_ranks

    result, why = friedman_ranks(runs, metric)
    if result is None:
        raise SamfitError(f"--cd-diagram {path}: no diagram, {why}")
    err.print(f"wrote {cd_diagram(result, path)}", highlight=False)


def bayes_section(runs: pd.DataFrame, baseline: str, rope: float, metric: str | None, seed: int, fmt: str) -> None:
    """--rope: the Bayesian signed-rank test across test sets, per method against the baseline."""
    from samfit.report.bayes import signed_rank

    records, notes = signed_rank(runs, baseline, rope, metric, seed)
    for note in notes:
        err.print(f"note: {note}", highlight=False)
    if not records:
        return
    frame = pd.DataFrame([{"method": r["method"], "test sets": r["test_sets"],
                           "mean difference": f"{r['mean_difference']:+.2f}", "P(better)": f"{r['p_better']:.3f}",
                           "P(equivalent)": f"{r['p_equivalent']:.3f}", "P(worse)": f"{r['p_worse']:.3f}"}
                          for r in records])
    print_frame(frame, f"Bayesian signed-rank against {baseline} across test sets",
                f"baycomp; difference = method − {baseline} in table units, rope ±{rope:g}", fmt)


def report(
    results: List[Path] = typer.Argument(..., help="Folders of run folders (any depth)."),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    baseline: str = typer.Option("lora", "--baseline", help="The method every other is compared with."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Metric (default: each dataset's headline)."),
    confidence: float = typer.Option(0.95, "--confidence", help="CI level; 1 − it is the test's level."),
    resamples: int = typer.Option(2000, "--resamples", help="Bootstrap (and permutation) resamples."),
    seed: int = typer.Option(0, "--seed", help="Seed of the resampling."),
    rope: Optional[float] = typer.Option(None, "--rope", help="Add the Bayesian signed-rank test with this rope."),
    select: Optional[List[str]] = typer.Option(None, "--select", help="Keep per method, dataset and seed the "
                                               "value of this setting (e.g. lr) best on validation."),
):
    """One self-contained HTML page (opens offline): the results grid, verdicts, ranks and the
    critical-difference diagram, the plots, and every run's settings."""
    from samfit.engine.rundir import write_text
    from samfit.report.compare import Settings
    from samfit.report.html import build_report

    if rope is not None:
        from samfit.report.bayes import check_rope

        check_rope(rope)
    notes: list[str] = []
    runs = apply_select_quiet(results, select, notes)
    write_text(out, build_report(runs, results, baseline, metric, Settings(confidence, resamples, seed), rope,
                                 notes))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # a page to share: the umask's mode, not the atomic write's private one
    console.print(f"wrote {out}", highlight=False)


def apply_select_quiet(results: List[Path], select, notes: list[str]) -> pd.DataFrame:
    from samfit.report.select import apply_select

    return apply_select(load_runs(results), results, select, notes.append)


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
    app.command()(report)
