"""Using a finished run: samfit.load_run, `samfit predict` and `samfit evaluate` on a 1-epoch tiny run of the built-in
`shapes` data. Predicting the run's test images and scoring the written PNGs gives metrics.json's numbers exactly
(same model rebuilt from config.yaml and the seed, same preprocessing, same batches, same upsampling)."""
import io
import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import samfit
from samfit import SamfitError
from samfit.config import make_config
from samfit.data import resolve_dataset
from samfit.engine.train import run
from samfit.metrics import BinaryEvaluator, MulticlassEvaluator

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT_EVAL = 6
whole_run = pytest.mark.slow  # tests on a trained run (one 1-epoch tiny run, ~5 s, shared by the module)


def _train(tmp, dataset, **extra):
    settings = dict(method="lora", dataset=dataset, model="tiny", image_size=64, epochs=1, limit_train=4,
                    limit_eval=LIMIT_EVAL, batch_size=2, effective_batch=2, device="cpu", out=str(tmp / "runs"),
                    data_root=str(tmp / "data"))
    settings.update(extra)
    return run(make_config(**settings), quiet=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("use")
    folder = _train(tmp, "shapes")
    return folder, tmp / "data" / "shapes"


def first_images(data_dir, split="test"):
    return sorted((data_dir / split / "images").iterdir())[:LIMIT_EVAL]


def _gt(data_dir, image, split="test"):
    return cv2.imread(str(data_dir / split / "masks" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)


# predict and evaluate merge LoRA into SAM's weights; the run scored its test set unmerged. In fp32 the two differ
# by rounding (~1e-7 relative), so a pixel can flip only where the unmerged probability is that close to a
# threshold: scores must then be equal exactly unless some pixel lies within this margin of one.
MARGIN = 1e-5
THRESHOLDS = (0.5, 125 / 255, 125.5 / 255)  # IoU/Dice; BER per image (255·p > 125) and pooled (round(255·p) > 125)


def unmerged_probabilities(folder, images) -> list[np.ndarray]:
    """The run's own (unmerged) probabilities at each image's size, as predict computes them."""
    import torch.nn.functional as F

    from samfit.use.predict import read_rgb, to_input

    model = samfit.load_run(folder, device="cpu")
    out = []
    for path in images:
        image = read_rgb(path)
        with torch.no_grad():
            logits = model(to_input(image, model.run_config.image_size)[None])["logits"]
        out.append(F.interpolate(logits.sigmoid(), size=image.shape[:2], mode="bilinear")[0, 0].numpy())
    return out


def near_a_threshold(probabilities) -> int:
    return sum(int((np.abs(p - t) < MARGIN).sum()) for p in probabilities for t in THRESHOLDS)


@whole_run
def test_predict_then_score_gives_the_runs_numbers(trained, tmp_path, cli):
    folder, data_dir = trained
    images = first_images(data_dir)
    code, out, message = cli("predict", folder, *images, "--out", tmp_path / "pred", "--device", "cpu")
    assert code == 0, message
    evaluator = BinaryEvaluator(sod=False)
    probabilities = unmerged_probabilities(folder, images)
    for image, prob in zip(images, probabilities):
        mask = cv2.imread(str(tmp_path / "pred" / "masks" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
        gt = _gt(data_dir, image)
        assert mask.shape == gt.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert np.all(((mask > 127) == (prob > 0.5)) | (np.abs(prob - 0.5) < MARGIN))  # the merge flips none else
        evaluator.update(mask > 127, gt)
    expected = json.loads((folder / "metrics.json").read_text())["scores"]["test"]
    assert 0 < expected["iou_per_image"] < 1  # masks that are neither empty nor perfect: the comparison can fail
    # the dataset's metrics (IoU, Dice) threshold at 0.5 as the masks do; BER has its own threshold (125/255)
    declared = resolve_dataset("shapes").metrics
    if near_a_threshold(probabilities) == 0:  # else a pixel may flip by rounding alone (checked above)
        assert {k: v for k, v in evaluator.compute().items() if k in declared} == {k: expected[k] for k in declared}


@whole_run
def test_load_run_eval_mode_and_another_size(trained):
    folder, _ = trained
    torch.manual_seed(123)
    stream = torch.get_rng_state()
    model = samfit.load_run(folder, device="cpu")
    assert torch.equal(torch.get_rng_state(), stream)  # it reseeds to rebuild, then gives the caller's stream back
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    best = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)
    state = model.state_dict()
    assert best and all(torch.equal(state[k], v) for k, v in best.items())
    bigger = samfit.load_run(folder, device="cpu", image_size=128)
    assert bigger.image_encoder.pos_embed.shape[1:3] == (8, 8) and bigger.image_size == 128
    with torch.no_grad():
        assert bigger(torch.zeros(1, 3, 128, 128))["logits"].shape == (1, 1, 128, 128)
    same = {k: v for k, v in bigger.state_dict().items() if "pos_embed" not in k and "rel_pos" not in k}
    assert all(torch.equal(v, state[k]) for k, v in same.items())  # only the position tables differ


def method_layers(encoder) -> set[str]:
    """The encoder's modules that are neither SAM's (segment_anything, torch.nn) nor SAM's Attention with samfit's
    fused forward (SDPAAttention: the same weights and arithmetic cost): a method's layers, if any."""
    from samfit.model.attention import SDPAAttention

    return {type(m).__qualname__ for m in encoder.modules() if not isinstance(m, SDPAAttention)
            and not type(m).__module__.startswith(("segment_anything.", "torch.nn."))}


@whole_run
def test_predict_and_evaluate_merge_a_mergeable_method_first(trained, tmp_path, cli, monkeypatch):
    import samfit.engine.evaluate as engine
    from samfit.use.predict import predict_images

    folder, data_dir = trained
    model = samfit.load_run(folder, device="cpu")
    assert method_layers(model.image_encoder) == {"LoRALinear"}  # load_run alone keeps the run's own layers
    summary = predict_images(model, first_images(data_dir)[:1], tmp_path / "pred")
    assert len(summary.written) == 1 and model.merged and method_layers(model.image_encoder) == set()
    seen, real = [], engine.predict_batches
    monkeypatch.setattr(engine, "predict_batches",  # records the model evaluate scores with, then runs as ever
                        lambda model, *a, **k: seen.append(method_layers(model.image_encoder)) or real(model, *a, **k))
    code, _, message = cli("evaluate", folder, "--dataset", data_dir, "--limit", 1, "--device", "cpu",
                           "--name", "merged")
    assert code == 0, message
    assert seen == [set()] and json.loads((folder / "eval" / "merged.json").read_text())["merged"] is True


@whole_run
def test_a_decoder_lora_is_merged_with_any_method_in_float64(tmp_path):
    import copy

    from samfit.use.load import merge_for_inference

    folder = _train(tmp_path, "shapes", method="ssf", decoder="lora:2", lr=1e-2)  # its B moves off zero
    model = samfit.load_run(folder, device="cpu").double()
    assert "DecoderLoRALinear" in {type(m).__name__ for m in model.mask_decoder.modules()}
    merged = merge_for_inference(copy.deepcopy(model))
    assert method_layers(merged.image_encoder) == set() and method_layers(merged.mask_decoder) == set()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = model(x)["logits"], merged(x)["logits"]
    # the same function with differently rounded weights: a few float64 eps of the output's scale
    assert (after - before).abs().max() <= 2**20 * torch.finfo(torch.float64).eps * before.abs().max()


@whole_run
def test_predict_outputs_and_a_corrupt_image_is_skipped(trained, tmp_path, cli):
    folder, data_dir = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in first_images(data_dir)[:2]:
        shutil.copy(image, inputs / image.name)
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    code, out, message = cli("predict", folder, inputs, "--out", tmp_path / "pred", "--overlay", "--probabilities",
                             "--batch-size", "1", "--device", "cpu")
    assert code == 0, message
    assert "wrote 2 mask(s)" in " ".join(out.split()) and "; 1 skipped" in " ".join(out.split())
    assert sorted(p.name for p in (tmp_path / "pred" / "masks").iterdir()) == ["0000.png", "0001.png"]
    image = cv2.imread(str(inputs / "0000.png"))
    overlay = cv2.imread(str(tmp_path / "pred" / "overlays" / "0000.jpg"))
    prob = cv2.imread(str(tmp_path / "pred" / "probabilities" / "0000.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(tmp_path / "pred" / "masks" / "0000.png"), cv2.IMREAD_UNCHANGED)
    assert overlay.shape == image.shape and prob.dtype == np.uint16 and prob.shape == image.shape[:2]
    assert np.array_equal(prob > 0.5 * 65535, mask > 0)
    assert sorted(p.name for p in inputs.iterdir()) == ["0000.png", "0001.png", "broken.png"]  # inputs untouched


@whole_run
def test_predict_refuses_bad_inputs(trained, tmp_path, cli):
    folder, data_dir = trained
    images = data_dir / "test" / "images"
    code, _, message = cli("predict", folder, images, "--out", images / "masks")
    assert code == 2 and "inside the input folder" in message
    (tmp_path / "empty").mkdir()
    code, _, message = cli("predict", folder, tmp_path / "empty", "--out", tmp_path / "o1")
    assert code == 2 and "No images in folder" in message
    (tmp_path / "bad.png").write_bytes(b"nope")
    code, _, message = cli("predict", folder, tmp_path / "bad.png", "--out", tmp_path / "o2")
    assert code == 2 and "nothing was written" in message and not (tmp_path / "o2" / "masks").exists()
    code, _, message = cli("predict", folder, str(tmp_path / "*.jpg"), "--out", tmp_path / "o3")
    assert code == 2 and "No image files match" in message


@whole_run
def test_unfinished_runs_are_refused(trained, tmp_path):
    folder, _ = trained
    for status, words in [({"status": "running"}, "still running"),
                          ({"status": "failed", "error": "boom"}, "did not finish (status failed: boom)")]:
        copy = tmp_path / status["status"]
        shutil.copytree(folder, copy)
        (copy / "status.json").write_text(json.dumps(status))
        with pytest.raises(SamfitError, match=words.replace("(", r"\(").replace(")", r"\)")):
            samfit.load_run(copy)
    with pytest.raises(SamfitError, match="not a samfit run folder"):
        samfit.load_run(tmp_path)


def test_a_missing_or_different_sam_checkpoint_is_named(tmp_path):
    from samfit.config import RunConfig
    from samfit.use.load import RunRecord, run_checkpoint

    path = tmp_path / "sam_vit_b_custom.pth"
    record = RunRecord(tmp_path, RunConfig(model="vit_b"), {"sam_checkpoint": {"path": str(path), "md5": "0" * 32}},
                       {})
    gone = r"(?s)sam_vit_b_custom.pth, which is not there.*samfit weights download vit_b"  # the message spans lines
    with pytest.raises(SamfitError, match=gone):
        run_checkpoint(record)
    path.write_bytes(b"other weights")
    with pytest.raises(SamfitError, match=r"has MD5 [0-9a-f]{32}, but run .* MD5 0{32}"):
        run_checkpoint(record)


@whole_run
def test_evaluate_writes_eval_json_and_leaves_metrics_json_alone(trained, cli):
    folder, data_dir = trained
    before = (folder / "metrics.json").read_bytes()
    code, out, message = cli("evaluate", folder, "--dataset", data_dir, "--limit", LIMIT_EVAL, "--device", "cpu",
                             "--name", "again")
    assert code == 0, message
    assert (folder / "metrics.json").read_bytes() == before
    result = json.loads((folder / "eval" / "again.json").read_text())
    if near_a_threshold(unmerged_probabilities(folder, first_images(data_dir))) == 0:  # see MARGIN
        assert result["scores"]["test"] == json.loads(before)["scores"]["test"]  # the same images, same protocol
    else:  # a few flipped pixels among LIMIT_EVAL images of 128 x 128
        floats = lambda d: {k: v for k, v in d.items() if isinstance(v, float)}  # noqa: E731
        assert floats(result["scores"]["test"]) == pytest.approx(floats(json.loads(before)["scores"]["test"]), abs=1e-2)
    rows = (folder / "eval" / "again_images.csv").read_text().splitlines()
    assert rows[0].startswith("split,image,iou,dice,iou_per_image,") and len(rows) == 1 + LIMIT_EVAL
    assert {"tp", "fp", "tn", "fn", "ber_tp"} <= set(rows[0].split(","))
    code, out, message = cli("table", folder.parent, "--eval", "--format", "csv")
    assert code == 0, message
    grid = pd.read_csv(io.StringIO(out))
    head = result["headline"]["metric"]
    assert len(grid) == 1 and grid.loc[0, f"shapes→again {head}"] == grid.loc[0, f"shapes {head}"]  # same images
    code, _, message = cli("evaluate", folder, "--dataset", data_dir, "--split", "nope")
    assert code == 2 and "no split 'nope'" in message and "Available: test, train, val" in message
    code, _, message = cli("evaluate", folder, "--dataset", "shapes-multiclass", "--data-root", data_dir.parent)
    assert code == 2 and "segments binary" in message
    assert (folder / "metrics.json").read_bytes() == before


@whole_run
def test_multiclass_predict_writes_palette_class_maps_scoring_as_the_run(tmp_path, cli):
    from PIL import Image

    folder = _train(tmp_path, "shapes-multiclass")
    data_dir = tmp_path / "data" / "shapes-multiclass"
    images = first_images(data_dir)
    code, _, message = cli("predict", folder, *images, "--out", tmp_path / "pred", "--device", "cpu")
    assert code == 0, message
    evaluator = MulticlassEvaluator(5)
    for image in images:
        written = Image.open(tmp_path / "pred" / "masks" / f"{image.stem}.png")
        assert written.mode == "P" and written.getpalette()[:6] == [0, 0, 0, 230, 25, 75]
        evaluator.update(np.array(written).astype(np.int64), _gt(data_dir, image))
    expected = json.loads((folder / "metrics.json").read_text())["scores"]["test"]
    result = evaluator.compute()
    assert result["miou"] == expected["miou"]


@whole_run
def test_load_run_takes_the_adapter_file_in_place_of_the_run_folder(trained, tmp_path, cli):
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, data_dir = trained
    adapter = tmp_path / "lora.safetensors"
    code, _, message = cli("export", folder, "--format", "adapter", "--out", adapter)
    assert code == 0, message
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = samfit.load_run(folder, device="cpu")(x)["logits"]
        assert torch.equal(samfit.load_run(adapter, device="cpu")(x)["logits"], expected)
        with safe_open(str(adapter), "pt") as f:  # the random tiny SAM is redrawn from the recorded seed
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
        other = tmp_path / "other_seed.safetensors"
        save_file(tensors, str(other), {**meta, "config": json.dumps({**config, "seed": config["seed"] + 1})})
        assert not torch.equal(samfit.load_run(other, device="cpu")(x)["logits"], expected)
    image = first_images(data_dir)[0]
    code, out, message = cli("predict", adapter, image, "--out", tmp_path / "pred", "--device", "cpu")
    assert code == 0, message
    assert (tmp_path / "pred" / "masks" / f"{image.stem}.png").is_file()


def test_files_that_are_not_adapters_are_refused(tmp_path, cli):
    from safetensors.torch import save_file

    from samfit.config import RunConfig

    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(SamfitError, match="not a readable safetensors file"):
        samfit.load_run(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SamfitError, match="not a samfit adapter"):
        samfit.load_run(tmp_path / "plain.safetensors")
    code, _, message = cli("evaluate", tmp_path / "plain.safetensors", "--dataset", "shapes")
    assert code == 2 and "is a file (an adapter?)" in message and "samfit predict" in message
    sam = tmp_path / "sam_vit_b_custom.pth"  # an adapter whose SAM checkpoint is another file: named, with its MD5
    sam.write_bytes(b"other weights")
    meta = {"format": "samfit-adapter", "config": json.dumps(RunConfig(model="vit_b", image_size=64).to_dict()),
            "sam_checkpoint_md5": "0" * 32, "sam_checkpoint_path": str(sam)}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "vit_b.safetensors"), meta)
    with pytest.raises(SamfitError, match=r"sam_vit_b_custom.pth has MD5 [0-9a-f]{32}, but run .* MD5 0{32}"):
        samfit.load_run(tmp_path / "vit_b.safetensors")
