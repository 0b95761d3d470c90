"""`samfit report RESULTS --out report.html`: one self-contained HTML page a reader can open offline.

It holds the results grid (mean ± std over seeds, ▲ / ▼ against the baseline), the verdicts of `samfit compare`
(one row per comparison, areas under the fraction curve included), the average ranks with the Friedman test and
the critical-difference diagram, the Bayesian signed-rank test when a rope is given, every plot of `samfit
plot`, and each run's settings (config.yaml) in a collapsed block. Images are PNGs embedded as base64 data URIs;
the page has no script and loads nothing from anywhere.
"""
from __future__ import annotations

import base64
import datetime
import html
import tempfile
from pathlib import Path

import pandas as pd

from samfit.errors import SamfitError

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
tr.better td.verdict { color: #0a6e0a; font-weight: 600; } tr.worse td.verdict { color: #b00020; font-weight: 600; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; } figure img { max-width: 36em; border: 1px solid #ddd; }
details { margin: 0.2em 0; } pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; }
.note { color: #555; font-style: italic; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def table_html(frame: pd.DataFrame, row_class=None, row_data=None, cell_class=None) -> str:
    """An HTML table of `frame`, every cell escaped; optional per-row class and data-* attributes, and a class
    for the cells of some columns."""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = []
    for i, (_, row) in enumerate(frame.iterrows()):
        attrs = f' class="{esc(row_class[i])}"' if row_class else ""
        attrs += "".join(f' data-{k}="{esc(v)}"' for k, v in (row_data[i] if row_data else {}).items())
        cells = "".join(f'<td class="{esc((cell_class or {}).get(c, ""))}">{esc(v)}</td>' for c, v in row.items())
        rows.append(f"<tr{attrs}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def image_html(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def verdict_section(records: list[dict]) -> str:
    from samfit.report.table import display_frame

    frame = display_frame(records)
    data = [{"method": r["method"], "baseline": r["baseline"], "dataset": r["dataset"], "test-set": r["test_set"],
             "metric": r["metric"], "verdict": r["verdict"]} for r in records]
    classes = ["verdict " + r["verdict"].split()[0] for r in records]  # better / worse / no
    return table_html(frame, classes, data, {"verdict": "verdict"})


def ranks_section(runs: pd.DataFrame, metric: str | None, folder: Path) -> str:
    from samfit.report.ranks import cd_diagram, friedman_ranks

    result, why = friedman_ranks(runs, metric)
    if result is None:
        return f'<p class="note">{esc(why)}</p>'
    frame = pd.DataFrame({"method": result["methods"], "average rank": [f"{r:.2f}" for r in
                                                                        result["average_rank"]]})
    line = (f"Friedman test over {result['test_sets']} test sets and {len(frame)} methods: chi-square = "
            f"{result['statistic']:.3g}, p = {result['p_value']:.3g} (rank 1 = best).")
    png = cd_diagram(result, folder / "critical_difference.png")
    return (table_html(frame.sort_values("average rank")) + f"<p>{esc(line)}</p>"
            + image_html(png, "critical-difference diagram (Nemenyi)"))


def bayes_section(runs: pd.DataFrame, baseline: str, rope: float, metric: str | None, seed: int) -> str:
    from samfit.report.bayes import signed_rank

    records, notes = signed_rank(runs, baseline, rope, metric, seed)
    parts = [f'<p class="note">{esc(n)}</p>' for n in notes]
    if records:
        frame = pd.DataFrame([{"method": r["method"], "vs": r["baseline"], "test sets": r["test_sets"],
                               "mean difference": f"{r['mean_difference']:+.2f}", "P(better)": f"{r['p_better']:.3f}",
                               "P(equivalent)": f"{r['p_equivalent']:.3f}", "P(worse)": f"{r['p_worse']:.3f}"}
                              for r in records])
        parts.insert(0, table_html(frame))
    return "".join(parts)


def runs_section(runs: pd.DataFrame) -> str:
    """One collapsed block per run: its name, and its config.yaml (or metrics.json) as written."""
    blocks = []
    for _, run in runs.drop_duplicates(subset="path").sort_values("run").iterrows():
        folder = Path(run["path"])
        source = folder / "config.yaml" if (folder / "config.yaml").is_file() else folder / "metrics.json"
        try:
            text = source.read_text()
        except OSError as exc:
            text = f"({source.name} unreadable: {exc})"
        blocks.append(f'<details class="run"><summary>{esc(run["run"])}: {esc(run["method"])} on '
                      f'{esc(run["dataset"])}, seed {esc(run["seed"])}</summary><p>{esc(folder)}</p>'
                      f"<pre>{esc(text)}</pre></details>")
    return "".join(blocks)


def build_report(runs: pd.DataFrame, folders: list[Path], baseline: str, metric: str | None, settings,
                 rope: float | None = None, notes: list[str] | None = None) -> str:
    """The page's HTML. A comparison that cannot be made (one method, no baseline runs ...) is said in the
    page; tables, ranks, plots and settings are still shown."""
    from samfit.report.compare import compare_runs, verdict_marks
    from samfit.report.plot import plot_summary
    from samfit.report.table import comparison_grid, summarise

    notes = list(notes or [])
    try:
        records, more = compare_runs(runs, baseline, metric, settings)
        notes += more
    except SamfitError as exc:
        records, verdicts = [], f'<p class="note">No verdicts: {esc(exc)}</p>'
    else:
        verdicts = verdict_section(records) + (
            f"<p>difference = method − {esc(baseline)}, mean over common seeds; {settings.confidence:.0%} paired "
            f"bootstrap CI over test images; Holm over {len(records)} comparisons; verdict at Holm-adjusted p &lt; "
            f"{1 - settings.confidence:.3g}. <code>@area</code>: area under the metric-vs-training-fraction "
            f"curve.</p>")
    grid = comparison_grid(summarise(runs, metric), verdict_marks(records))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ranks = ranks_section(runs, metric, tmp)
        plots = "".join(image_html(p, p.stem.replace("_", " ")) for p in plot_summary(summarise(runs, metric),
                                                                                       tmp / "plots"))
    bayes = bayes_section(runs, baseline, rope, metric, settings.seed) if rope is not None and records else ""
    legend = f"▲ / ▼: significantly better / worse than {baseline} (see Verdicts); * best in its column."
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        f"<h1>samfit report</h1><p>{len(runs.drop_duplicates(subset='path'))} runs from "
        f"{esc(', '.join(map(str, folders)))}; methods: {esc(', '.join(sorted(set(runs['method']))))}; "
        f"datasets: {esc(', '.join(sorted(set(runs['dataset']))))}. Written {when}.</p>",
        f'<h2 id="results">Results</h2>{table_html(grid)}<p>{esc(legend)}</p>',
        f'<h2 id="verdicts">Verdicts against {esc(baseline)}</h2>{verdicts}',
        f'<h2 id="ranks">Ranks across test sets</h2>{ranks}',
        f'<h2 id="bayes">Bayesian signed-rank (rope ±{rope:g})</h2>{bayes}' if bayes else "",
        f'<h2 id="plots">Plots</h2>{plots or "<p class=note>No plots.</p>"}',
        f'<h2 id="runs">Runs and their settings</h2>{runs_section(runs)}',
        "".join(f'<pre class="note">note: {esc(n)}</pre>' for n in notes),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>samfit report</title>'
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
