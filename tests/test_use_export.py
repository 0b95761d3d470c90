"""`samfit export`: LoRA, SSF and BitFit runs on ViT-B (from a randomly initialised checkpoint written in the official
key layout, trained two steps at 256 px) exported as plain SAM checkpoints that segment_anything loads strictly; the
exported image encoder at 1024 px computes load_run(run, image_size=1024)'s (LoRA: one forward each, within 1e-4
relative in fp32, in the box test; SSF and BitFit: the same weights as load_run's merged encoder, exactly) and
SamPredictor segments with a box; the adapter format; refusals; the box-prompted evaluation on both decoders."""
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import yaml
from segment_anything import SamPredictor, sam_model_registry

import samfit
from samfit.config import make_config
from samfit.engine.train import run

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ("lora", "ssf", "bitfit")
CHANGED = {"lora": "blocks.0.attn.qkv.weight", "ssf": "blocks.0.attn.qkv.weight", "bitfit": "blocks.0.attn.qkv.bias"}


class TrainedRuns(dict):
    """{method: run folder}, each run trained on first use: under pytest-xdist every worker builds module fixtures
    itself, so a worker trains only the methods its tests ask for."""

    def __init__(self, tmp, checkpoint):
        super().__init__()
        self.tmp, self.checkpoint = tmp, checkpoint

    def __missing__(self, method):
        self[method] = run(make_config(method=method, dataset="shapes", model="vit_b", checkpoint=str(self.checkpoint),
                                       image_size=256, epochs=1, limit_train=4, limit_eval=1, batch_size=2,
                                       effective_batch=2, lr=1e-2, device="cpu", out=str(self.tmp / "runs"),
                                       data_root=str(self.tmp / "data")), quiet=True)
        return self[method]


@pytest.fixture(scope="module")
def vit_b_runs(tmp_path_factory):
    """(the runs of one source checkpoint, trained two steps at 256 px, by method; the checkpoint; its state)."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    state = sam.state_dict()
    with torch.no_grad():  # SAM starts its position tables at zero: make the 1024 px originals recognisable
        for key, value in state.items():
            if key == "image_encoder.pos_embed" or ".rel_pos_" in key:
                value.normal_(0, 0.02)
    checkpoint = tmp / "sam_vit_b_random.pth"
    torch.save(state, checkpoint)
    del sam
    return TrainedRuns(tmp, checkpoint), checkpoint, state


@pytest.fixture(scope="module")
def vit_b_run(vit_b_runs):
    folders, checkpoint, state = vit_b_runs
    return folders["lora"], checkpoint, state


def shapes_test_image(folder):
    """(an RGB test image of the run's shapes data, its ground truth)."""
    data = folder.parents[1] / "data" / "shapes"
    image_path = sorted((data / "test" / "images").iterdir())[0]
    gt = cv2.imread(str(data / "test" / "masks" / f"{image_path.stem}.png"), cv2.IMREAD_UNCHANGED) > 127
    return np.ascontiguousarray(cv2.imread(str(image_path))[..., ::-1]), gt


@pytest.mark.slow  # ViT-B: a training step, an export, three ViT-B builds
@pytest.mark.parametrize("method", METHODS)
def test_exported_run_is_a_strict_sam_checkpoint_with_load_runs_weights(method, vit_b_runs, tmp_path, cli):
    folders, checkpoint, source = vit_b_runs
    folder = folders[method]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["sam_checkpoint"]["path"] == str(checkpoint.resolve())
    out = tmp_path / "exported.pth"
    code, _, message = cli("export", folder, "--format", "sam", "--out", out)
    assert code == 0, message
    exported = torch.load(out, weights_only=True)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in source.items()}
    sam = sam_model_registry["vit_b"](checkpoint=str(out)).eval()  # strict load
    for key in ["image_encoder.pos_embed", "image_encoder.blocks.2.attn.rel_pos_h", "prompt_encoder.pe_layer."
                "positional_encoding_gaussian_matrix", "mask_decoder.mask_tokens.weight",
                "mask_decoder.output_hypernetworks_mlps.1.layers.0.weight", "mask_decoder.iou_prediction_head."
                "layers.0.weight"]:
        part = exported[key][1:] if key == "mask_decoder.mask_tokens.weight" else exported[key]
        assert torch.equal(part, source[key][1:] if key == "mask_decoder.mask_tokens.weight" else source[key]), key
    best = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)
    assert torch.equal(exported["mask_decoder.mask_tokens.weight"][0], best["mask_decoder.mask_tokens.weight"][0])
    for key in ["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight", "mask_decoder.transformer.layers.0."
                "self_attn.q_proj.weight"]:
        assert torch.equal(exported[key], best[key]) and not torch.equal(exported[key], source[key]), key
    changed = "image_encoder." + CHANGED[method]
    assert (exported[changed] - source[changed]).abs().max() > 1e-4  # the trained encoder part is merged in
    # The exported encoder has load_run(run, image_size=1024)'s merged weights exactly (the same merge of the same
    # tensors; position tables both the source's 1024 px originals). That the merge computes the unmerged function
    # is checked in float64 for every mergeable method (tests/test_use_merge.py) and, for LoRA, by one ViT-B forward
    # at 1024 px in the box test (a forward costs ~14 s here, so SSF and BitFit are checked on their weights).
    loaded = samfit.load_run(folder, device="cpu", image_size=1024, merge=True)
    reference = loaded.image_encoder.state_dict()
    for key, value in sam.image_encoder.state_dict().items():
        assert torch.equal(value, reference[key]), key
    predictor = SamPredictor(sam)  # on a stand-in embedding: the prompt encoder and decoder with a box
    predictor.reset_image()
    predictor.features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    predictor.original_size, predictor.input_size, predictor.is_image_set = (1024, 1024), (1024, 1024), True
    masks, scores, _ = predictor.predict(box=np.array([100, 200, 600, 700]), multimask_output=False)
    assert masks.shape == (1, 1024, 1024) and np.isfinite(scores).all()


@pytest.mark.slow
def test_adapter_format_and_refusals(vit_b_run, tmp_path, cli):
    from safetensors import safe_open

    folder, checkpoint, _ = vit_b_run
    out = tmp_path / "adapter.safetensors"
    code, _, message = cli("export", folder, "--format", "adapter", "--out", out)
    assert code == 0, message
    best = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(best) and all(torch.equal(f.get_tensor(k), best[k]) for k in best)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert meta["method"] == "lora" and json.loads(meta["method_args"]) == {}
    assert meta["sam_checkpoint_md5"] == metrics["sam_checkpoint"]["md5"] and len(meta["sam_checkpoint_md5"]) == 32
    assert meta["sam_checkpoint_path"] == metrics["sam_checkpoint"]["path"]  # where load_run(adapter) looks first
    assert out.stat().st_size < 20 * 2**20  # the trained parameters only, not SAM's 90M
    code, _, message = cli("export", folder, "--format", "sam", "--out", checkpoint)
    assert code == 2 and "is the SAM checkpoint" in message
    copy = tmp_path / "conv"
    shutil.copytree(folder, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, "method": "conv-lora"}))
    code, _, message = cli("export", copy, "--format", "sam", "--out", tmp_path / "x.pth")
    assert code == 2 and "cannot be merged" in message and "--format adapter" in message
    assert not (tmp_path / "x.pth").exists()
    moved = tmp_path / "moved.pth"
    shutil.move(checkpoint, moved)
    try:
        code, _, message = cli("export", folder, "--format", "sam", "--out", tmp_path / "y.pth")
        assert code == 2 and "not there any more" in message and "samfit weights download vit_b" in message
    finally:
        shutil.move(moved, checkpoint)


@pytest.mark.slow  # ViT-B at 1024 px: four image encodings (~14 s each here)
def test_box_prompts_on_both_decoders_and_the_exported_encoder_at_1024_px(vit_b_run, tmp_path, cli):
    import copy

    from segment_anything.modeling import Sam

    from samfit.use.promptable import DECODERS, component_boxes, share_image

    folder, checkpoint, source = vit_b_run
    data = folder.parents[1] / "data" / "shapes"
    code, out, message = cli("evaluate", folder, "--dataset", data, "--prompts", "box", "--limit", 1, "--device",
                             "cpu")
    assert code == 0, message
    said = " ".join(out.split())
    assert "(adapted encoder, SAM's original decoder); plain SAM" in said and "trained decoder parts" in said
    result = json.loads((folder / "eval" / "shapes_box.json").read_text())
    test = result["scores"]["test"]
    assert result["prompts"] == "box" and result["headline"]["metric"] == "iou" and result["images"] == {"test": 1}
    assert result["decoders"] == DECODERS and result["merged"] is True
    assert all(0 <= test[k] <= 1 for k in ("iou", "dice", "sam_iou", "sam_dice", "tuned_iou", "tuned_dice"))
    assert test["iou_change"] == pytest.approx(test["iou"] - test["sam_iou"])
    # `iou` is SamPredictor with the exported checkpoint's encoder (a mergeable method: the same merged encoder) and
    # SAM's original decoder; `tuned_iou` is SamPredictor on the exported checkpoint as it is (the run's trained
    # decoder parts written into SAM's decoder)
    code, _, message = cli("export", folder, "--format", "sam", "--out", tmp_path / "sam.pth")
    assert code == 0, message
    exported = sam_model_registry["vit_b"](checkpoint=str(tmp_path / "sam.pth")).eval()
    decoder = copy.deepcopy(exported.mask_decoder)
    decoder.load_state_dict({k[len("mask_decoder."):]: v for k, v in source.items() if k.startswith("mask_decoder.")})
    original = Sam(exported.image_encoder, exported.prompt_encoder, decoder).eval()
    image, gt = shapes_test_image(folder)
    boxes = component_boxes(gt)
    assert len(boxes) >= 1 and boxes[0][2] >= boxes[0][0]
    tuned = SamPredictor(exported)
    tuned.set_image(image)  # the exported encoder on the image, as SamPredictor preprocesses it
    # ... computes load_run(run, image_size=1024)'s encoder, unmerged (the run's own LoRA layers), on that input: in
    # fp32 merged vs unmerged weights and SAM's attention vs samfit's sdpa differ by rounding (measured 4.9e-7
    # relative); an update dropped or mis-scaled moves the embedding far more (the trained one moved it by ~1)
    resized = torch.as_tensor(tuned.transform.apply_image(image)).permute(2, 0, 1)[None].float()
    loaded = samfit.load_run(folder, device="cpu", image_size=1024)
    assert any(type(m).__name__ == "LoRALinear" for m in loaded.image_encoder.modules())
    with torch.no_grad():
        expected = loaded.image_encoder(exported.preprocess(resized))  # SAM's mean/std, padded to 1024 x 1024
    relative = ((tuned.features - expected).norm() / expected.norm()).item()
    assert relative <= 1e-4, relative
    with_sams_decoder = SamPredictor(original)
    share_image(tuned, with_sams_decoder)  # the same encoder: one pass
    for predictor, key in [(with_sams_decoder, "iou"), (tuned, "tuned_iou")]:
        union = np.zeros_like(gt)
        for box in boxes:
            masks, _, _ = predictor.predict(box=box, multimask_output=False)
            union |= masks[0]
        assert test[key] == pytest.approx((union & gt).sum() / (union | gt).sum(), abs=1e-6), key
    assert test["tuned_iou"] != test["iou"]  # the two decoders differ, so the comparison can tell them apart
    tiny = finished_run_folder(tmp_path / "tiny_run", "tiny")  # no SAM weights: refused before anything is built
    code, _, message = cli("evaluate", tiny, "--dataset", data, "--prompts", "box")
    assert code == 2 and "--prompts box needs a vit_b, vit_l or vit_h run" in message


def finished_run_folder(folder, model: str):
    """A run folder that reads as finished (config, status, empty metrics and checkpoint) for `model`: enough for
    the refusals that look only at the run's settings."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(make_config(method="lora", dataset="shapes", model=model,
                                                                   image_size=64).to_dict()))
    (folder / "status.json").write_text(json.dumps({"status": "done"}))
    (folder / "metrics.json").write_text("{}")
    torch.save({}, folder / "checkpoints" / "best.pt")
    return folder
