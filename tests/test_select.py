"""Tuned baselines: `--select lr` (and a grid's `select: [lr]`) keeps, per method, dataset and seed, the run best
on the validation headline metric, never on a test score, and says which value won. Hand-written run folders."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from samfit.errors import SamfitError
from samfit.grid import load_grid, write_summary
from samfit.metrics.pooled import recompute
from samfit.report.collect import collect_runs
from samfit.report.select import grid_select, select_best

ROOT = Path(__file__).resolve().parents[1]


def image_rows(seed: int, n: int, quality: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    tp = (rng.integers(50, 100, n) * quality).astype(int)
    fp, fn = rng.integers(5, 40, n), rng.integers(5, 40, n)
    rows = pd.DataFrame({"test_set": "test", "image": [f"im{i:03d}.png" for i in range(n)], "tp": tp, "fp": fp,
                         "tn": 1000, "fn": fn})
    rows.insert(2, "iou_per_image", rows["tp"] / (rows["tp"] + rows["fp"] + rows["fn"]))
    return rows


def write_run(root: Path, method: str, seed: int, lr: float, validation: float, test_quality: float,
              dataset: str = "blobs", lower: bool = False, config: bool = True) -> Path:
    """A finished run: its lr in config.yaml, its validation score in metrics.json, per-image test rows whose
    quality is `test_quality` (independent of `validation`)."""
    folder = root / f"{dataset}_{method}_tiny_64_s{seed}_lr-{lr:g}"
    folder.mkdir(parents=True)
    rows = image_rows(seed, 30, test_quality)
    scores = {"test": recompute(rows.drop(columns=["test_set"]))}
    headline = "iou_per_image"
    (folder / "metrics.json").write_text(json.dumps({
        "method": method, "dataset": dataset, "model": "tiny", "image_size": 64, "seed": seed, "device": "cpu",
        "headline": {"metric": headline, "lower_is_better": lower, "value": scores["test"][headline], "split": "test"},
        "selection": {"split": "val", "best_epoch": 1, "value": validation},
        "scores": scores, "params": {"trainable": 10, "encoder_trainable": 1, "percent_of_sam": 1.0},
        "throughput": {"train_img_per_s": 1.0, "step_time_s": 0.1, "eval_img_per_s": 1.0}, "peak_memory_mb": 1.0}))
    if config:
        (folder / "config.yaml").write_text(yaml.safe_dump({"method": method, "dataset": dataset, "lr": lr,
                                                            "seed": seed}))
    rows.to_csv(folder / "per_image.csv", index=False)
    return folder


@pytest.fixture
def tuned(tmp_path):
    """lora: 3e-4 best on validation for both seeds while 1e-3 has the best *test* scores; bitfit: 1e-3 wins on
    validation for seed 0 and 1e-4 for seed 1."""
    root = tmp_path / "tuned"
    for seed in (0, 1):
        write_run(root, "lora", seed, 1e-4, validation=0.70, test_quality=1.0)
        write_run(root, "lora", seed, 3e-4, validation=0.80, test_quality=1.2)
        write_run(root, "lora", seed, 1e-3, validation=0.60, test_quality=3.0)
    write_run(root, "bitfit", 0, 1e-4, validation=0.5, test_quality=1.0)
    write_run(root, "bitfit", 0, 1e-3, validation=0.9, test_quality=1.0)
    write_run(root, "bitfit", 1, 1e-4, validation=0.9, test_quality=1.0)
    write_run(root, "bitfit", 1, 1e-3, validation=0.5, test_quality=1.0)
    return root


def test_the_best_validation_score_wins_never_the_test_score(tuned):
    runs = collect_runs(tuned)
    kept, chosen = select_best(runs, ["lr"])
    assert len(kept) == 4 and kept.groupby(["method", "seed"]).size().eq(1).all()
    won = {(r.method, r.seed): r.lr for r in chosen.itertuples()}
    assert won == {("lora", 0): 3e-4, ("lora", 1): 3e-4, ("bitfit", 0): 1e-3, ("bitfit", 1): 1e-4}
    best_test = runs.loc[runs[runs["method"] == "lora"]["iou_per_image"].idxmax(), "path"]
    assert best_test not in set(kept["path"])  # the 1e-3 run has the best test score and is not kept
    assert set(chosen["validation"]) == {0.8, 0.9}


def test_lower_is_better_selects_the_lowest(tmp_path):
    root = tmp_path / "mae"
    write_run(root, "lora", 0, 1e-4, validation=0.10, test_quality=1.0, lower=True)
    write_run(root, "lora", 0, 1e-3, validation=0.05, test_quality=1.0, lower=True)
    _, chosen = select_best(collect_runs(root), ["lr"])
    assert chosen["lr"].tolist() == [1e-3]


def test_bad_selections_are_clear_errors(tuned, tmp_path):
    runs = collect_runs(tuned)
    with pytest.raises(SamfitError, match="select a setting such as lr"):
        select_best(runs, ["method"])
    with pytest.raises(SamfitError, match="not a run setting"):
        select_best(runs, ["learning_rate"])
    root = tmp_path / "old"
    folder = write_run(root, "lora", 0, 1e-4, validation=0.5, test_quality=1.0)
    metrics = json.loads((folder / "metrics.json").read_text())
    del metrics["selection"]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(SamfitError, match="validation score"):
        select_best(collect_runs(root), ["lr"])


def test_a_run_without_config_yaml_has_the_default(tmp_path):
    root = tmp_path / "defaults"
    write_run(root, "lora", 0, 1e-4, validation=0.5, test_quality=1.0, config=False)
    _, chosen = select_best(collect_runs(root), ["weight_decay"])
    assert chosen["weight_decay"].tolist() == [1e-4]  # RunConfig's default


def test_table_and_compare_select_and_say_which_value_won(tuned, cli):
    code, out, message = cli("table", tuned, "--format", "csv", "--select", "lr")
    assert code == 0, message
    table = pd.read_csv(pd.io.common.StringIO(out))
    kept = select_best(collect_runs(tuned), ["lr"])[0]
    lora = kept[kept["method"] == "lora"]["iou_per_image"]
    assert table.set_index("method").loc["lora"].str.contains("n=2").any()
    cell = table.set_index("method").loc["lora"].filter(like="iou").iloc[0]
    assert cell.startswith(f"{lora.mean() * 100:.2f}")
    code, out, message = cli("table", tuned, "--format", "csv")  # without --select: every lr averaged
    assert "n=2" in out and f"{lora.mean() * 100:.2f}" not in out
    code, out, message = cli("compare", tuned, "--baseline", "lora", "--select", "lr", "--format", "json",
                             "--resamples", "200")
    assert code == 0, message
    (record,) = json.loads(out)
    assert record["method"] == "bitfit" and record["seeds"] == [0, 1]


def test_the_selection_is_printed(tuned, capsys):
    from samfit.report.select import apply_select

    said = []
    apply_select(collect_runs(tuned), [tuned], ["lr"], said.append)
    assert "lr selected" in said[0] and "s0 0.0003, s1 0.0003" in said[0] and "s0 0.001, s1 0.0001" in said[0]


def test_grid_select_key_validated_recorded_and_read(tmp_path):
    grid = load_grid(ROOT / "benchmarks" / "tuned.yaml", out=str(tmp_path / "tuned"))
    assert len(grid.runs) == 9 * 8 * 3 * 3 and grid.select == ["lr"]
    assert {cfg.lr for cfg in grid.runs} == {1e-4, 3e-4, 1e-3}
    assert "isic2017_lora_vit_h_1024_s0_official_lr-0.0003" in {cfg.name for cfg in grid.runs}
    write_summary(tmp_path / "tuned", grid, [])
    assert grid_select([tmp_path / "tuned", tmp_path]) == ["lr"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"axes": {"method": ["lora"], "lr": [1e-4, 1e-3]}, "select": ["seed"]}))
    with pytest.raises(SamfitError, match="`select` must list axes"):
        load_grid(bad, out=str(tmp_path / "b"))
    bad.write_text(yaml.safe_dump({"axes": {"method": ["lora"]}, "select": ["lr"]}))
    with pytest.raises(SamfitError, match="`select` must list axes"):
        load_grid(bad, out=str(tmp_path / "b"))
