"""`samfit table --eval`: the scores of `samfit evaluate` (RUN/eval/<name>.json) as extra columns beside the runs'
own test sets, mean ± std over seeds. Run folders written by hand (metrics.json and eval/<name>.json shaped as
samfit run and samfit evaluate write them), so no training is needed."""
import io
import json
from pathlib import Path

import pandas as pd
import pytest


def fake_run(root: Path, method: str, seed: int, iou: float, dataset="polyp", trainable=4_000_000) -> Path:
    folder = root / f"{dataset}_{method}_vit_b_256_s{seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "method": method, "dataset": dataset, "model": "vit_b", "image_size": 256, "seed": seed, "device": "cpu",
        "headline": {"metric": "iou", "lower_is_better": False, "value": iou, "split": "test"},
        "scores": {"test": {"iou": iou, "dice": iou + 0.05}},
        "params": {"trainable": trainable, "encoder_trainable": trainable - 1000, "percent_of_sam": 4.0},
        "throughput": {"train_img_per_s": 4.0, "step_time_s": 0.5, "eval_img_per_s": 10.0},
        "peak_memory_mb": 900.0}))
    return folder


def fake_eval(folder: Path, name: str, scores: dict, headline="iou", lower=False) -> None:
    """RUN/eval/<name>.json as `samfit evaluate` writes it (evaluate_run's keys)."""
    (folder / "eval").mkdir(exist_ok=True)
    first = next(iter(scores))
    (folder / "eval" / f"{name}.json").write_text(json.dumps({
        "run": folder.name, "dataset": name, "source": f"/data/{name}", "task": "binary",
        "headline": {"metric": headline, "lower_is_better": lower, "value": scores[first][headline], "split": first},
        "scores": scores, "images": {s: 10 for s in scores}, "eval_resolution": "input", "image_size": 256,
        "precision": "fp32", "device": "cpu", "per_image": f"{name}_images.csv"}))
    (folder / "eval" / f"{name}_images.csv").write_text("split,image,iou,dice\n")  # never read as an evaluation


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, (lora, ssf) in enumerate([(0.80, 0.70), (0.82, 0.74)]):
        a = fake_run(root, "lora", seed, 0.9)
        fake_eval(a, "hospital2", {"test": {"iou": lora, "dice": lora + 0.1, "iou_per_class": {"x": 1.0}}})
        b = fake_run(root, "ssf", seed, 0.85)
        fake_eval(b, "hospital2", {"test": {"iou": ssf, "dice": ssf + 0.1}})
    fake_eval(a, "kvasir", {"val": {"iou": 0.5, "dice": 0.6}, "test": {"iou": 0.55, "dice": 0.65}})
    return root


def table(cli, *args) -> pd.DataFrame:
    code, out, message = cli("table", *args, "--format", "csv")
    assert code == 0, message
    return pd.read_csv(io.StringIO(out)).set_index("method")


def test_eval_columns_beside_the_runs_own(runs, cli):
    grid = table(cli, runs, "--eval")
    own = ["polyp iou"]
    evals = ["polyp→hospital2 iou", "polyp→kvasir/val iou", "polyp→kvasir iou"]
    assert list(grid.columns) == ["model", "trainable", "% of SAM", *own, *evals, "step s", "peak MB"]
    assert grid.loc["lora", "polyp→hospital2 iou"] == "81.00 ± 1.41 (n=2) *"  # mean ± sample std over seeds
    assert grid.loc["ssf", "polyp→hospital2 iou"] == "72.00 ± 2.83 (n=2)"
    assert grid.loc["lora", "polyp→kvasir/val iou"] == "50.00 (n=1) *" and grid.loc["ssf", "polyp→kvasir iou"] == "—"
    assert grid.loc["lora", "polyp iou"] == "90.00 ± 0.00 (n=2) *"  # the run's own test set, as without --eval
    assert list(table(cli, runs).columns) == ["model", "trainable", "% of SAM", *own, "step s", "peak MB"]
    dice = table(cli, runs, "--eval", "--metric", "dice")
    assert dice.loc["ssf", "polyp→hospital2 dice"] == "82.00 ± 2.83 (n=2)"


def test_runs_trained_on_other_data_are_not_averaged_together(runs, cli):
    other = fake_run(runs, "lora", 0, 0.6, dataset="isic2017")
    fake_eval(other, "hospital2", {"test": {"iou": 0.3, "dice": 0.4}})
    grid = table(cli, runs, "--eval")
    assert grid.loc["lora", "isic2017→hospital2 iou"] .startswith("30.00 (n=1)")
    assert grid.loc["lora", "polyp→hospital2 iou"].startswith("81.00 ± 1.41 (n=2)")


def test_no_or_unreadable_evaluations_are_clear_errors(tmp_path, cli):
    root = tmp_path / "runs"
    folder = fake_run(root, "lora", 0, 0.9)
    code, _, message = cli("table", root, "--eval")
    assert code == 2 and "No `samfit evaluate` results" in message and "samfit evaluate RUN --dataset" in message
    fake_eval(folder, "hospital2", {"test": {"iou": 0.5, "dice": 0.6}})
    code, _, message = cli("table", root, "--eval", "--metric", "mae")
    assert code == 2 and "with metric 'mae'" in message
    (folder / "eval" / "broken.json").write_text("{not json")
    code, _, message = cli("table", root, "--eval")
    assert code == 2 and "Unreadable evaluation" in message and "broken.json" in message and "--name broken" in message
