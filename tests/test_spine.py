"""The spine: build, count, train deterministically, record a run folder, table it."""
import json
import subprocess
import sys

import pytest
import torch

import samfit
from samfit.config import make_config
from samfit.engine.train import run


def test_lora_counts_match_the_paper_on_vit_b_and_vit_h():
    b = samfit.get_method("lora").apply(samfit.build_model("vit_b", image_size=256))  # real init for vit_b
    assert samfit.count_parameters(b)["trainable"] == 3_616_128
    assert samfit.count_parameters(b)["encoder_trainable"] == 110_592
    with torch.device("meta"):
        h = samfit.get_method("lora").apply(samfit.build_model("vit_h", image_size=256))
    assert samfit.count_parameters(h)["trainable"] == 3_997_056


def test_sam_total_is_the_papers_vit_h_count():
    from samfit.model.sam import sam_total_parameters

    assert sam_total_parameters("vit_h") == 641_090_608


@pytest.mark.slow
def test_methods_json_cli():
    out = subprocess.run([sys.executable, "-m", "samfit", "methods", "--model", "vit_b", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = {r["method"]: r for r in json.loads(out)}
    assert rows["decoder-only"]["trainable"] == 3_505_536
    assert rows["lora"]["trainable"] == 3_616_128
    assert rows["lora"]["encoder_trainable"] == 110_592


def _quick(tmp_path, data_root, **kw):
    settings = dict(method="lora", dataset="shapes", epochs=2, limit_train=8, limit_eval=4,
                    out=str(tmp_path / "runs"), data_root=str(data_root), device="cpu")
    settings.update(kw)
    return run(make_config(**settings), quiet=True)


@pytest.mark.slow
def test_run_folder_contract_and_determinism(tmp_path, data_root):
    first = _quick(tmp_path, data_root, name="a")
    second = _quick(tmp_path, data_root, name="b")
    for f in ("config.yaml", "metrics.json", "history.csv", "status.json", "checkpoints/best.pt",
              "checkpoints/last.pt"):
        assert (first / f).is_file(), f
    m1 = json.loads((first / "metrics.json").read_text())
    m2 = json.loads((second / "metrics.json").read_text())
    assert m1["scores"] == m2["scores"]  # same seed, same scores, bit for bit
    assert m1["params"]["trainable"] == samfit.count_parameters(
        samfit.get_method("lora").apply(samfit.build_model("tiny")))["trainable"]
    assert json.loads((first / "status.json").read_text())["status"] == "done"
    assert not (first / "run.lock").exists()
    # trainable-only checkpoint: no frozen SAM tensor in it
    best = torch.load(first / "checkpoints" / "best.pt", weights_only=True)
    assert all("lora_" in k or k.startswith("mask_decoder.") for k in best)
    for key in ("train_img_per_s", "eval_img_per_s", "step_time_s"):
        assert m1["throughput"][key] > 0
    assert m1["peak_memory_mb"] > 0 and m1["versions"]["torch"] == torch.__version__
    table = subprocess.run([sys.executable, "-m", "samfit", "table", str(tmp_path / "runs"), "--format", "markdown"],
                           capture_output=True, text=True, check=True).stdout
    assert "lora" in table and "iou_per_image" in table


@pytest.mark.slow
def test_checkpoint_holds_exactly_the_trainable_parameters(tmp_path, data_root):
    folder = _quick(tmp_path, data_root, method="lora")
    saved = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)["trainable"]
    model = samfit.get_method("lora").apply(samfit.build_model("tiny"))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_unknown_method_suggests_the_closest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "samfit", "run", "--method", "lorra", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Did you mean 'lora'" in proc.stderr and "Traceback" not in proc.stderr


def test_vit_run_without_weights_names_the_download_command(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("SAMFIT_CHECKPOINTS", str(tmp_path / "none"))
    with pytest.raises(samfit.SamfitError, match="samfit weights download vit_b"):
        _quick(tmp_path, data_root, model="vit_b", image_size=256)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["decoder-only", "lora"])
def test_learns_shapes_well_beyond_predicting_all_foreground(method, tmp_path, data_root):
    import cv2
    import numpy as np

    folder = _quick(tmp_path, data_root, method=method, epochs=8, limit_train=None, limit_eval=None)
    m = json.loads((folder / "metrics.json").read_text())
    masks = sorted((data_root / "shapes" / "test" / "masks").glob("*.png"))
    all_foreground = np.mean([(cv2.imread(str(p), 0) > 127).mean() for p in masks])  # IoU of predicting 1 everywhere
    assert m["scores"]["test"]["iou_per_image"] > 2.5 * all_foreground, (m["scores"], all_foreground)
