"""`samfit evaluate RUN --prompts box` on MedSAM runs: MedSAM's own inference path (MedSAM_Inference.py), checked
against a re-implementation of its recipe written here, against SamPredictor (the same for a square 1024 px image,
different for a non-square one), and end to end on a run from a random MedSAM-layout checkpoint."""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from samfit.config import make_config
from samfit.use.promptable_medsam import MedSAMPredictor, medsam_input

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = torch.finfo(torch.float32).eps
# Probabilities the pipeline and the reference compute with the same modules in fp32, boxes batched vs one at a
# time: rounding only (measured 1.1e-6, 9 eps). A slip in the recipe moves them far more (measured on the test's
# image: cv2's bicubic resize instead of skimage's 1.4e-2, no uint8 cast and x / 255 3.8e-3, the box scaled by the
# longest side 0.31, the logits upsampled before the sigmoid 0.49)
TOL = 2**8 * EPS


def cheap_sam(seed: int = 0) -> Sam:
    """A segment_anything Sam with SAM's prompt encoder and decoder at their real sizes (1024 px input, 64×64
    embedding) and a one-block 32-wide image encoder, so a 1024 px pass costs ~0.05 s. Pixel mean 0 and std 255:
    SamPredictor then scales an image spanning 0-255 as MedSAM's min-max does."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=32, depth=1, num_heads=1, mlp_ratio=2,
                              out_chans=256, window_size=16)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=256, num_heads=8))
    with torch.no_grad():  # logits of a few units (random init gives ~0.1): sigmoid-then-upsample is not linear
        decoder.output_hypernetworks_mlps[0].layers[-1].weight.mul_(30)
    return Sam(encoder, prompt, decoder, pixel_mean=[0, 0, 0], pixel_std=[255, 255, 255]).eval()


def scene(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(an RGB uint8 image spanning 0-255, its binary mask): a textured background, an ellipse and a rectangle."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.uniform(40, 140, (h, w, 3)), (0, 0), 2)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 4, h // 2), (w // 8, h // 4), 0, 0, 360, 1, -1)
    cv2.rectangle(mask, (w // 2, h // 5), (w - w // 6, h - h // 4), 1, -1)
    image[mask > 0] += [90, 40, -20]
    image = np.clip(image, 0, 255)
    image[0, 0], image[-1, -1] = 0, 255
    return image.astype(np.uint8), mask > 0


def boxes_of(mask: np.ndarray) -> np.ndarray:
    from samfit.use.promptable import component_boxes

    return component_boxes(mask)


@torch.no_grad()
def reference_probabilities(model: Sam, image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    """MedSAM_Inference.py's recipe, one box at a time as the script prompts: skimage order-3 resize to 1024×1024
    (anti-aliased, range kept) cast to uint8, (x - min) / clip(max - min, 1e-8), the encoder; the box times
    1024 / (W, H, W, H); boxes-only prompt, one mask; sigmoid, bilinear to H×W."""
    from skimage import transform

    h, w = image.shape[:2]
    img = transform.resize(image, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    img = (img - img.min()) / np.clip(img.max() - img.min(), a_min=1e-8, a_max=None)
    embedding = model.image_encoder(torch.tensor(img).float().permute(2, 0, 1).unsqueeze(0))
    out = []
    for box in boxes:
        box_1024 = np.asarray(box, np.float64)[None] / np.array([w, h, w, h]) * 1024
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.as_tensor(box_1024).float()[:, None, :],
                                             masks=None)
        logits, _ = model.mask_decoder(image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
        out.append(F.interpolate(torch.sigmoid(logits), size=(h, w), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out)


def test_pipeline_equals_medsams_recipe_on_a_non_square_image():
    model = cheap_sam()
    image, gt = scene(72, 136)
    boxes = boxes_of(gt)
    assert len(boxes) == 2
    predictor = MedSAMPredictor(model)
    predictor.set_image(image)
    got = predictor.probabilities(boxes)
    expected = reference_probabilities(model, image, boxes)
    assert got.shape == expected.shape == (2, 72, 136)
    assert (got - expected).abs().max().item() <= TOL
    masks = predictor.box_masks(boxes)
    reference = (expected > 0.5).any(dim=0).numpy()
    certain = ((expected - 0.5).abs() > TOL).all(dim=0).numpy()  # pixels no rounding can flip
    assert certain.mean() > 0.99 and np.array_equal(masks[certain], reference[certain])
    assert 0.05 < masks.mean() < 0.95  # a mask with both classes: the comparison can fail


def test_medsam_input_is_a_square_resize_scaled_to_unit_range():
    image, _ = scene(40, 100)
    x = medsam_input(image)
    assert x.shape == (1, 3, 1024, 1024) and x.dtype == torch.float32
    assert x.min().item() == 0 and x.max().item() == 1
    # the same image squeezed to 1024 x 1024 (no aspect-preserving resize, no padding): a column of the input
    # follows the image's column at x * W / 1024, so the left and right borders keep the image's own values
    left, right = x[0, :, :, 0].mean().item(), x[0, :, :, -1].mean().item()
    scaled = (image.astype(np.float64) - image.min()) / (image.max() - image.min())
    assert left == pytest.approx(scaled[:, 0].mean(), abs=0.02) and right == pytest.approx(scaled[:, -1].mean(),
                                                                                           abs=0.02)


def test_pipeline_differs_from_sampredictor_on_a_non_square_image_only():
    """The two paths agree where they should (a square 1024 px image: no resize, no padding, the same [0, 1]
    scaling here), so on a non-square image the difference is MedSAM's square resize against SamPredictor's
    longest-side resize and padding: a routing of MedSAM through SamPredictor fails the second half."""
    model = cheap_sam()
    for size, same in [((1024, 1024), True), ((72, 136), False)]:
        image, gt = scene(*size)
        boxes = boxes_of(gt)
        medsam = MedSAMPredictor(model)
        medsam.set_image(image)
        ours = medsam.low_res_logits(boxes)
        sam = SamPredictor(model)
        sam.set_image(image)
        box = sam.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2])
        theirs_masks, _, theirs = sam.predict_torch(None, None, boxes=box, multimask_output=False)
        relative = ((ours - theirs).norm() / theirs.norm()).item()
        if same:
            assert relative <= TOL, relative
        else:
            assert relative > 1e-2, relative
            disagree = (medsam.box_masks(boxes) != theirs_masks.any(dim=0)[0].numpy()).mean()
            assert disagree > 0.01, disagree


def write_folder_dataset(root, size=(72, 136)):
    """A canonical-layout folder: train/, val/ and test/, one non-square image each."""
    for split, seed in [("train", 1), ("val", 3), ("test", 2)]:
        image, gt = scene(*size, seed=seed)
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
        cv2.imwrite(str(root / split / "images" / "a.png"), image[..., ::-1])
        cv2.imwrite(str(root / split / "masks" / "a.png"), gt.astype(np.uint8) * 255)
    return root


def test_sam2_tiny_stays_refused(tmp_path, cli):
    data = write_folder_dataset(tmp_path / "data")
    run = tmp_path / "sam2_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(make_config(method="lora", dataset="shapes",
                                                                model="sam2_tiny", image_size=64).to_dict()))
    (run / "status.json").write_text(json.dumps({"status": "done"}))
    (run / "metrics.json").write_text("{}")
    torch.save({}, run / "checkpoints" / "best.pt")
    code, _, message = cli("evaluate", run, "--dataset", data, "--prompts", "box")
    assert code == 2 and "model 'sam2_tiny'" in message
    assert "--prompts box needs a vit_b, vit_l or vit_h run (or medsam_vit_b, sam2_hiera_t/s/b+/l)" in message


def iou_bounds(probabilities: torch.Tensor, gt: np.ndarray) -> tuple[float, float]:
    """The lowest and highest IoU of the union mask over every way of thresholding pixels within TOL of 0.5."""
    low = (probabilities > 0.5 + TOL).any(dim=0).numpy()
    high = (probabilities > 0.5 - TOL).any(dim=0).numpy()
    return (low & gt).sum() / (high | gt).sum(), (high & gt).sum() / (low | gt).sum()


@pytest.mark.slow  # ViT-B at 1024 px: three image encodings (~14 s each on 1 thread), a 375 MB checkpoint
def test_decoder_only_medsam_run_box_evaluation(tmp_path, cli):
    """A decoder-only run of a random MedSAM-layout checkpoint (segment_anything's ViT-B, saved as MedSAM's file),
    trained two steps at 64 px with SAM's own attention code: its encoder is MedSAM's, bit for bit and computed by
    the same code as plain MedSAM's, so `iou_change` is exactly 0; plain MedSAM's score is MedSAM's recipe on the
    checkpoint as MedSAM_Inference.py loads it."""
    from segment_anything import sam_model_registry

    from samfit.engine.train import run
    from samfit.use.promptable import MEDSAM_DECODERS

    torch.manual_seed(0)
    medsam = sam_model_registry["vit_b"]()
    with torch.no_grad():  # logits of a few units, as in cheap_sam: masks with both classes
        medsam.mask_decoder.output_hypernetworks_mlps[0].layers[-1].weight.mul_(30)
    checkpoint = tmp_path / "medsam_vit_b.pth"
    torch.save(medsam.state_dict(), checkpoint)
    del medsam
    data = write_folder_dataset(tmp_path / "data")
    folder = run(make_config(method="decoder-only", dataset=str(data), model="medsam_vit_b",
                             checkpoint=str(checkpoint), image_size=64, epochs=1, batch_size=1, effective_batch=1,
                             lr=1e-2, attention="reference", device="cpu", out=str(tmp_path / "runs")), quiet=True)
    code, out, message = cli("evaluate", folder, "--dataset", data, "--prompts", "box", "--device", "cpu")
    assert code == 0, message
    said = " ".join(out.split())
    assert "(adapted encoder, MedSAM's original decoder); plain MedSAM" in said
    result = json.loads((folder / "eval" / "data_box.json").read_text())
    test = result["scores"]["test"]
    assert result["pipeline"] == "MedSAM_Inference" and result["decoders"] == MEDSAM_DECODERS
    assert result["images"] == {"test": 1}
    for key in ("iou", "dice", "sam_iou", "sam_dice", "tuned_iou", "tuned_dice"):
        assert np.isfinite(test[key]) and 0 <= test[key] <= 1, key
    assert 0 < test["sam_iou"] < 1  # a mask that is neither empty nor the ground truth: the zero below can fail
    assert test["iou_change"] == 0 and test["dice_change"] == 0
    reference = sam_model_registry["vit_b"](checkpoint=str(checkpoint)).eval()
    image = cv2.imread(str(data / "test" / "images" / "a.png"))[..., ::-1].copy()
    gt = cv2.imread(str(data / "test" / "masks" / "a.png"), cv2.IMREAD_UNCHANGED) > 127
    low, high = iou_bounds(reference_probabilities(reference, image, boxes_of(gt)), gt)
    assert low - 1e-12 <= test["sam_iou"] <= high + 1e-12, (low, test["sam_iou"], high)
