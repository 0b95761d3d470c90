"""`samfit evaluate RUN --prompts box` on SAM 2 runs: SAM2ImagePredictor at 1024 px on tiny 64 px runs (a LoRA run
and a decoder-only run) from a random checkpoint in the official SAM 2.1 hiera_t layout; each score column checked
against the predictor run here straight on a model built by Meta's `build_sam2` (the source checkpoint, the file
`samfit export --format sam` writes, that file with the source's decoder); refusals."""
import copy
import json

import cv2
import numpy as np
import pytest
import torch
from test_promptable_medsam import write_folder_dataset
from test_sam2 import official_sam2
from test_use_export import finished_run_folder

from samfit.config import make_config
from samfit.errors import SamfitError
from samfit.use.load import RunRecord

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SCORES = ("iou", "dice", "sam_iou", "sam_dice", "tuned_iou", "tuned_dice")
# Logits within this of the threshold (0), relative to the largest, may round either way: the pipeline prompts the
# boxes batched, the reference one at a time, the same modules and weights in fp32 (measured: 3 eps apart); a slip
# (another decoder, encoder or box) moves them far more (the tuned check fails with the source's decoder)
TOL = 2**8 * torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def sam2_runs(tmp_path_factory):
    """(runs {method: folder}, the source checkpoint, the dataset folder): 64 px, one step on one image each."""
    from samfit.engine.train import run

    tmp = tmp_path_factory.mktemp("promptable_sam2")
    checkpoint = tmp / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official_sam2([], size=1024).state_dict()}, checkpoint)
    data = write_folder_dataset(tmp / "data")  # one 72×136 image per split, two objects
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {method: run(make_config(method=method, dataset=str(data), model="sam2_hiera_t",
                                        checkpoint=str(checkpoint), image_size=64, epochs=1, batch_size=1,
                                        effective_batch=1, lr=1e-2, device="cpu", out=str(tmp / "runs")), quiet=True)
                for method in ("lora", "decoder-only")}
    finally:
        torch.set_num_threads(threads)
    return runs, checkpoint, data


def read_test_image(data):
    """(RGB image, ground truth, its component boxes) of the test split, read here with OpenCV."""
    from samfit.use.promptable import component_boxes

    image = cv2.imread(str(data / "test" / "images" / "a.png"))[..., ::-1].copy()
    gt = cv2.imread(str(data / "test" / "masks" / "a.png"), cv2.IMREAD_UNCHANGED) > 127
    return image, gt, component_boxes(gt)


def sam2_from(path):
    """SAM2Base of Meta's 2.1 tiny config at its 1024 px, `path` loaded strictly by build_sam2; mask token 0 only."""
    from sam2.build_sam import build_sam2

    return build_sam2(CONFIG, str(path), device="cpu", mode="eval", apply_postprocessing=False)


@torch.no_grad()
def iou_bounds(model, data) -> tuple[float, float]:
    """The lowest and highest IoU of SAM2ImagePredictor's union mask (one box per object, one mask each) over every
    way of rounding the logits within TOL of 0."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image, gt, boxes = read_test_image(data)
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    logits = np.stack([predictor.predict(box=box, multimask_output=False, return_logits=True)[0][0]
                       for box in boxes])  # one box at a time: another batch than the pipeline's
    tol = TOL * np.abs(logits).max()
    low, high = (logits > tol).any(axis=0), (logits > -tol).any(axis=0)
    return (low & gt).sum() / (high | gt).sum(), (high & gt).sum() / (low | gt).sum()


def within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] - 1e-12 <= value <= bounds[1] + 1e-12


def evaluated(cli, folder, data) -> dict:
    from samfit.use.promptable_sam2 import DECODERS

    code, out, message = cli("evaluate", folder, "--dataset", data, "--prompts", "box", "--device", "cpu")
    assert code == 0, message
    assert "(adapted encoder, SAM 2's original decoder); plain SAM 2" in " ".join(out.split())
    result = json.loads((folder / "eval" / "data_box.json").read_text())
    assert result["pipeline"] == "SAM2ImagePredictor" and result["decoders"] == DECODERS
    assert result["prompts"] == "box" and result["images"] == {"test": 1} and result["merged"] is True
    test = result["scores"]["test"]
    for key in SCORES:
        assert np.isfinite(test[key]) and 0 <= test[key] <= 1, key
    assert test["iou_change"] == test["iou"] - test["sam_iou"]
    assert test["dice_change"] == test["dice"] - test["sam_dice"]
    return test


@pytest.mark.slow  # hiera_t at 1024 px: five image encodings (~3-6 s each on one thread), a 150 MB export
def test_lora_run_columns_are_sam2s_predictor_on_sam2s_models(sam2_runs, tmp_path, cli):
    runs, checkpoint, data = sam2_runs
    test = evaluated(cli, runs["lora"], data)
    assert 0 < test["sam_iou"] < 1  # neither an empty mask nor the ground truth: the checks below can fail
    assert within(test["sam_iou"], iou_bounds(sam2_from(checkpoint), data))
    # tuned: the predictor on the file `samfit export --format sam` writes, as build_sam2 loads it
    code, _, message = cli("export", runs["lora"], "--format", "sam", "--out", tmp_path / "sam2.pt")
    assert code == 0, message
    exported = sam2_from(tmp_path / "sam2.pt")
    assert within(test["tuned_iou"], iou_bounds(exported, data))
    # adapted: that file's (merged) image encoder with the source checkpoint's decoder put back
    source = torch.load(checkpoint, weights_only=True)["model"]
    original = copy.deepcopy(exported)
    prefix = "sam_mask_decoder."
    original.sam_mask_decoder.load_state_dict({k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)})
    assert within(test["iou"], iou_bounds(original, data))
    # the three models differ here, so the comparisons above can tell them apart
    assert test["iou"] != test["sam_iou"] and test["tuned_iou"] != test["iou"]


@pytest.mark.slow  # hiera_t at 1024 px: three image encodings
def test_decoder_only_run_changes_nothing_through_sams_decoder(sam2_runs, cli):
    """A decoder-only run leaves the image encoder bitwise the checkpoint's, and the adapted and plain models are
    the same SAM2Base code on the same tensors: the change is exactly 0, while the trained decoder differs."""
    runs, checkpoint, data = sam2_runs
    test = evaluated(cli, runs["decoder-only"], data)
    assert test["iou_change"] == 0 and test["dice_change"] == 0
    assert test["iou"] == test["sam_iou"] and 0 < test["sam_iou"] < 1
    assert test["tuned_iou"] != test["iou"]  # the decoder was trained: the zero is not every model being one
    assert within(test["sam_iou"], iou_bounds(sam2_from(checkpoint), data))


def test_sam2_refusals(tmp_path, cli):
    """sam2_tiny (no checkpoint), multi-class runs and methods that cannot merge: clear errors, nothing built."""
    from samfit.use.promptable_sam2 import sam2_models

    data = write_folder_dataset(tmp_path / "data", size=(32, 48))
    tiny = finished_run_folder(tmp_path / "tiny_run", "sam2_tiny")
    code, _, message = cli("evaluate", tiny, "--dataset", data, "--prompts", "box")
    assert code == 2 and "model 'sam2_tiny', which has no SAM checkpoint" in message
    assert "sam2_hiera_t/s/b+/l" in message and "drop --prompts" in message
    config = make_config(method="lora", dataset="shapes", model="sam2_hiera_t", image_size=64)
    multiclass = RunRecord(tmp_path, config, {}, {"mask_decoder.class_head.layers.2.bias": torch.zeros(4)})
    with pytest.raises(SamfitError, match="is multi-class; SAM 2's promptable decoder segments one object per box"):
        sam2_models(multiclass, torch.device("cpu"))
    adapter = RunRecord(tmp_path, make_config(method="adapter", dataset="shapes", model="sam2_hiera_t",
                                              image_size=64), {}, {})
    with pytest.raises(SamfitError, match="method 'adapter', which cannot be merged into SAM 2's weights"):
        sam2_models(adapter, torch.device("cpu"))
