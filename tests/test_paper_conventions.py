"""`table --paper` compares each published number with the samfit column computed the paper's way."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from samfit.report import collect_runs, comparison_grid, summarise
from samfit.report.paper import add_paper, load_reference


def fake_run(root: Path, method: str, dataset: str, seed: int, scores: dict, headline: str, lower=False):
    folder = root / f"{dataset}_{method}_vit_h_1024_s{seed}"
    folder.mkdir(parents=True)
    first = next(iter(scores))
    (folder / "metrics.json").write_text(json.dumps({
        "method": method, "dataset": dataset, "model": "vit_h", "image_size": 1024, "seed": seed, "device": "cuda",
        "headline": {"metric": headline, "lower_is_better": lower, "value": scores[first][headline], "split": first},
        "scores": scores, "params": {"trainable": 4_000_000, "encoder_trainable": 494_464, "percent_of_sam": 0.6},
        "throughput": {"train_img_per_s": 4.0, "step_time_s": 0.5, "eval_img_per_s": 10.0},
        "peak_memory_mb": 9000.0}))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        fake_run(root, "lora", "sbu", seed, {"test": {"ber": 3.0 + seed, "ber_per_image": 4.0 + seed}}, "ber", True)
        fake_run(root, "conv-lora", "cod", seed, {"camo": {"s_measure": 0.88, "weighted_f": 0.80,
                                                           "weighted_f_beta2_0.3": 0.83 + 0.01 * seed}},
                 "s_measure")
        fake_run(root, "lora", "trans10k-v2", seed, {"test": {"miou": 0.70, "miou_trans2seg": 0.65}}, "miou")
    return root


def test_delta_uses_the_column_computed_the_papers_way(runs):
    frame = collect_runs(runs)
    summary = summarise(frame)
    grid, notes = add_paper(comparison_grid(summary), summary, load_reference(), runs=frame)
    grid = grid.set_index("method")
    assert grid.loc["lora", "sbu ber paper"] == "2.74"
    assert grid.loc["lora", "sbu ber Δ vs ber_per_image"] == f"{4.5 - 2.74:+.2f}"  # not ber's 3.5 − 2.74
    assert grid.loc["lora", "trans10k-v2 miou Δ vs miou_trans2seg"] == f"{65.0 - 66.01:+.2f}"
    wf = comparison_grid(summarise(frame, "weighted_f"))
    grid, notes = add_paper(wf, summarise(frame, "weighted_f"), load_reference(), runs=frame)
    assert grid.set_index("method").loc["conv-lora", "cod/camo weighted_f Δ vs weighted_f_beta2_0.3"] == \
        f"{83.5 - 84.0:+.2f}"
    assert any("cod/camo weighted_f" in n and "weighted_f_beta2_0.3 − paper" in n for n in notes)


def test_runs_without_the_official_column_fall_back_and_say_so(runs):
    frame = collect_runs(runs).drop(columns=["ber_per_image"])
    summary = summarise(frame)
    grid, notes = add_paper(comparison_grid(summary), summary, load_reference(), runs=frame)
    assert grid.set_index("method").loc["lora", "sbu ber Δ"] == f"{3.5 - 2.74:+.2f}"
    assert any("sbu ber" in n and "no ber_per_image column" in n for n in notes)


def test_table_command_compares_with_the_official_columns(runs, cli):
    code, stdout, error = cli("table", runs, "--format", "csv", "--paper")
    assert code == 0, error
    assert "sbu ber Δ vs ber_per_image" in stdout and "trans10k-v2 miou Δ vs miou_trans2seg" in stdout
