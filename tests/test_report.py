"""Tables and plots from run folders (written by hand here, so no training is needed)."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from samfit.errors import SamfitError
from samfit.report import collect_runs, comparison_grid, summarise
from samfit.report.paper import add_paper, load_reference
from samfit.report.plot import plot_summary

ROOT = Path(__file__).resolve().parents[1]


def fake_run(root: Path, method: str, dataset: str, seed: int, scores: dict, headline: str, lower=False,
             trainable=4_000_000, step=0.5, memory=9000.0, model="vit_h"):
    folder = root / f"{dataset}_{method}_{model}_1024_s{seed}"
    folder.mkdir(parents=True)
    first = next(iter(scores))
    (folder / "metrics.json").write_text(json.dumps({
        "method": method, "dataset": dataset, "model": model, "image_size": 1024, "seed": seed, "device": "cuda",
        "headline": {"metric": headline, "lower_is_better": lower, "value": scores[first][headline], "split": first},
        "scores": scores, "params": {"trainable": trainable, "encoder_trainable": trainable - 3_505_536,
                                     "percent_of_sam": 100 * trainable / 641_090_608},
        "throughput": {"train_img_per_s": 4.0, "step_time_s": step, "eval_img_per_s": 10.0},
        "peak_memory_mb": memory}))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, (lora, conv) in enumerate([(0.910, 0.921), (0.914, 0.919), (0.912, 0.920)]):
        fake_run(root, "lora", "polyp", seed, {"kvasir": {"s_measure": lora, "mae": 0.0312},
                                               "cvc-clinicdb": {"s_measure": lora - 0.01, "mae": 0.02}},
                 "s_measure", trainable=3_997_056, step=0.40)
        fake_run(root, "conv-lora", "polyp", seed, {"kvasir": {"s_measure": conv, "mae": 0.0301},
                                                    "cvc-clinicdb": {"s_measure": conv - 0.01, "mae": 0.02}},
                 "s_measure", trainable=4_020_096, step=0.55)
        fake_run(root, "lora", "sbu", seed, {"test": {"ber": 2.70 + 0.1 * seed}}, "ber", lower=True,
                 trainable=3_997_056, step=0.40)
    fake_run(root, "decoder-only", "polyp", 0, {"kvasir": {"s_measure": 0.85, "mae": 0.05},
                                                "cvc-clinicdb": {"s_measure": 0.84, "mae": 0.05}},
             "s_measure", trainable=3_505_536, step=0.2)
    return root


def cli(*args):
    return subprocess.run([sys.executable, "-m", "samfit", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def test_grid_cells_mean_std_n_best_and_units(runs):
    grid = comparison_grid(summarise(collect_runs(runs))).set_index("method")
    assert list(grid.index) == ["decoder-only", "lora", "conv-lora"]  # the paper's order
    assert grid.loc["conv-lora", "polyp/kvasir s_measure"] == "92.00 ± 0.10 (n=3) *"
    assert grid.loc["lora", "polyp/kvasir s_measure"] == "91.20 ± 0.20 (n=3)"
    assert grid.loc["lora", "sbu ber"] == "2.80 ± 0.10 (n=3) *"  # BER is not scaled again; lower is better
    assert grid.loc["decoder-only", "sbu ber"] == "—" and grid.loc["decoder-only", "polyp/kvasir s_measure"].endswith("(n=1)")
    assert "±" not in grid.loc["decoder-only", "polyp/kvasir s_measure"]  # one seed: no spread to show
    assert grid.loc["lora", "trainable"] == 3_997_056 and grid.loc["lora", "% of SAM"] == pytest.approx(0.623, abs=1e-3)
    assert list(grid.columns)[-2:] == ["step s", "peak MB"]
    mae = comparison_grid(summarise(collect_runs(runs), "mae")).set_index("method")
    assert mae.loc["lora", "polyp/kvasir mae"] == "0.031 ± 0.000 (n=3)"  # MAE stays in [0, 1]


def test_paper_columns_hold_the_published_value_and_the_difference(runs):
    summary = summarise(collect_runs(runs))
    grid, notes = add_paper(comparison_grid(summary), summary, load_reference())
    grid = grid.set_index("method")
    assert grid.loc["lora", "polyp/kvasir s_measure paper"] == "91.2"
    assert grid.loc["lora", "polyp/kvasir s_measure Δ"] == "+0.00"
    assert grid.loc["conv-lora", "polyp/cvc-clinicdb s_measure paper"] == "91.3"
    assert grid.loc["conv-lora", "polyp/cvc-clinicdb s_measure Δ"] == "-0.30"
    assert grid.loc["lora", "sbu ber Δ"] == "+0.06"
    assert grid.loc["decoder-only", "polyp/kvasir s_measure paper"] == "—"
    assert "arXiv:2401.17868" in grid.loc["lora", "paper source"] and grid.loc["decoder-only", "paper source"] == "—"
    cols = list(grid.columns)
    assert cols.index("polyp/kvasir s_measure paper") == cols.index("polyp/kvasir s_measure") + 1
    assert any("isic2017 iou_per_image" in n for n in notes)


@pytest.mark.slow
def test_table_formats(runs):
    from samfit.report import render

    summary = summarise(collect_runs(runs))
    grid, _ = add_paper(comparison_grid(summary), summary, load_reference())
    assert "| conv-lora" in render(grid, "markdown") and "kvasir s_measure paper" in render(grid, "markdown")
    assert "\\toprule" in render(grid, "latex") and "s\\_measure paper" in render(grid, "latex")
    latex = render(grid, "latex")
    assert latex.isascii() and r"$\pm$" in latex and r"$\Delta$" in latex  # compiles without a Unicode set-up
    assert "<table>" in render(grid, "html")
    proc = cli("table", runs, "--format", "csv", "--paper")
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(io.StringIO(proc.stdout), dtype=str)
    assert list(frame["method"]) == ["decoder-only", "lora", "conv-lora"] and "paper source" in frame
    assert list(frame["polyp/kvasir s_measure paper"]) == ["—", "91.2", "92.0"]
    assert "published numbers without a column here: isic2017" in proc.stderr


@pytest.mark.slow
def test_bad_format_and_bad_reference_are_user_errors(runs, tmp_path):
    proc = cli("table", runs, "--format", "docx")
    assert proc.returncode == 2 and "choose one of" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "ref.csv"
    bad.write_text("dataset,metric,value\npolyp,s_measure,1\n")
    with pytest.raises(SamfitError, match="lacks the column"):
        load_reference(bad)
    bad.write_text("dataset,test_set,metric,method,value,source\npolyp,kvasir,s_measure,lora,high,x\n")
    with pytest.raises(SamfitError, match="line 2: value 'high' is not a number"):
        load_reference(bad)


def test_plots_per_dataset(runs, tmp_path):
    paths = plot_summary(summarise(collect_runs(runs)), tmp_path / "plots")
    assert sorted(p.name for p in paths) == sorted(
        f"{c}_vs_{x}.png" for c in ("polyp_kvasir_s_measure", "polyp_cvc-clinicdb_s_measure", "sbu_ber")
        for x in ("params", "step_time"))
    assert all(p.stat().st_size > 5000 for p in paths)
