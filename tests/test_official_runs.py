"""Runs on prepared fake copies of the official layouts: every test set is scored and recorded."""
import json
import subprocess
import sys

import pytest
from test_prepare import build_isic, build_polyp

from samfit.data.prepare import prepare_dataset

pytestmark = pytest.mark.slow  # every test trains or runs the command line in a subprocess


def _run(args, env_root):
    import os

    env = dict(os.environ, SAMFIT_DATA=str(env_root))
    return subprocess.run([sys.executable, "-m", "samfit", "run", *args], capture_output=True, text=True, env=env)


def test_lora_on_prepared_fake_isic(tmp_path):
    build_isic(tmp_path / "src")
    prepare_dataset("isic2017", tmp_path / "src", tmp_path / "data", progress=False)
    proc = _run(["--method", "lora", "--dataset", "isic2017", "--model", "tiny", "--limit-train", "8",
                 "--batch-size", "1", "--effective-batch", "1",
                 "--limit-eval", "4", "--epochs", "1", "--image-size", "64", "--out", str(tmp_path / "runs")],
                tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    (metrics_file,) = (tmp_path / "runs").rglob("metrics.json")
    m = json.loads(metrics_file.read_text())
    assert set(m["scores"]) == {"test"}
    assert {"iou_per_image", "dice_per_image", "iou_dataset", "dice_dataset"} <= set(m["scores"]["test"])
    assert m["headline"]["metric"] == "iou_per_image" and m["eval_resolution"] == "gt"


def test_polyp_records_every_test_set(tmp_path):
    build_polyp(tmp_path / "src")
    prepare_dataset("polyp", tmp_path / "src", tmp_path / "data", progress=False)
    proc = _run(["--method", "decoder-only", "--dataset", "polyp", "--model", "tiny", "--limit-train", "4",
                 "--limit-eval", "2", "--epochs", "1", "--image-size", "64", "--batch-size", "1",
                 "--effective-batch", "1", "--eval-resolution", "model", "--out", str(tmp_path / "runs")],
                tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    (metrics_file,) = (tmp_path / "runs").rglob("metrics.json")
    m = json.loads(metrics_file.read_text())
    assert list(m["scores"]) == ["kvasir", "cvc-clinicdb", "cvc-colondb", "etis", "cvc-300"]
    for scores in m["scores"].values():
        assert {"s_measure", "e_measure_mean", "weighted_f", "mae"} <= set(scores)
    assert m["eval_resolution"] == "model"
    # PraNet's split has no val: one of the 2 training images picks the best epoch, never a test set
    assert m["selection"]["split"] == "train (held out)" and m["selection"]["held_out"] == 1
    assert m["train_images"] == 1


def test_unprepared_dataset_explains_how_to_get_it(tmp_path):
    proc = _run(["--dataset", "sbu", "--out", str(tmp_path / "runs")], tmp_path / "empty")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "samfit data download sbu" in proc.stderr and "samfit data prepare sbu" in proc.stderr


def test_corrupt_image_is_named_without_traceback(tmp_path):
    from samfit.data.registry import resolve_dataset, ensure_available

    spec = resolve_dataset("shapes")
    folder = ensure_available(spec, tmp_path / "data")
    bad = folder / "train" / "images" / "0001.png"
    bad.write_bytes(b"not a png")
    proc = _run(["--dataset", "shapes", "--limit-train", "4", "--epochs", "1", "--out", str(tmp_path / "runs")],
                tmp_path / "data")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "0001.png" in proc.stderr and "--skip-bad" in proc.stderr


def test_conv_lora_polyp_zip_scores_the_test_sets_it_has(tmp_path):
    from test_prepare import build_csv_zip_tree, zip_folder

    build_csv_zip_tree(tmp_path / "src")
    archive = zip_folder(tmp_path / "src" / "polyp", tmp_path / "polyp.zip")
    prepare_dataset("polyp", archive, tmp_path / "data", progress=False)
    proc = _run(["--method", "decoder-only", "--dataset", "polyp", "--model", "tiny", "--epochs", "1",
                 "--image-size", "64", "--batch-size", "1", "--effective-batch", "1", "--out", str(tmp_path / "runs")],
                tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    assert "lacks cvc-colondb, etis, cvc-300" in proc.stderr
    (metrics_file,) = (tmp_path / "runs").rglob("metrics.json")
    m = json.loads(metrics_file.read_text())
    assert list(m["scores"]) == ["kvasir", "cvc-clinicdb"] and m["missing_test_sets"] == ["cvc-colondb", "etis",
                                                                                       "cvc-300"]
    assert m["selection"]["split"] == "val" and m["headline"]["split"] == "kvasir"
    assert {"weighted_f_beta2_0.3", "ber", "ber_per_image"} <= set(m["scores"]["kvasir"])
