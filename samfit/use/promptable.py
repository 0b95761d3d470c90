"""What SAM kept: `samfit evaluate RUN --dataset X --prompts box`.

SAM's own promptable model (segment_anything's Sam: the original prompt encoder and the whole, uncut mask decoder
from the SAM checkpoint the run used) is run twice per image through SamPredictor: with the run's adapted image
encoder (at 1024 px, position tables from the checkpoint; a mergeable method merged first, so the encoder is the
one `samfit export --format sam` writes) and with plain SAM's encoder. The prompts are one box per connected
component of the ground truth (cv2.connectedComponentsWithStats, 8-connectivity; the box is the component's
inclusive pixel extent, XYXY), one mask per box (multimask_output=False), the image's prediction the union of its
masks. Scores per split: per-image IoU and Dice averaged over the images with foreground, for the adapted
encoder (`iou`, `dice`), for SAM's (`sam_iou`, `sam_dice`) and their differences (`iou_change`, `dice_change`: the
gain, or forgetting when negative, that fine-tuning caused). Binary runs of vit_b/l/h, medsam_vit_b and
sam2_hiera_t/s/b+/l only.

MedSAM runs are prompted the same way (the same boxes, columns and decoders, plain MedSAM from the MedSAM checkpoint
the run used) but through MedSAM's own inference path (samfit/use/promptable_medsam.py: a square 1024×1024 resize,
[0, 1] scaling, sigmoid upsampled to H×W > 0.5), not SamPredictor; the JSON's `pipeline` says which was used.
SAM 2 runs (mergeable methods) go through SAM2ImagePredictor on SAM 2's own models, the same boxes and columns
(samfit/use/promptable_sam2.py).

Which decoder: the comparison holds SAM's original decoder fixed, so the change is the encoder's doing alone (a
decoder-only run shows none, up to rounding); the run's decoder was trained without prompts (prompt-free, one mask
token), so it is not SAM's promptable decoder. A third score, `tuned_iou`/`tuned_dice`, prompts the adapted encoder
through the decoder as `samfit export --format sam` writes it (SAM's decoder with the run's trained parts written
in: SamPredictor on the exported checkpoint). `DECODERS` names each column's decoder; the JSON records it.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from samfit.errors import SamfitError

PROMPTS = ("box",)
DECODERS = {  # score columns -> the decoder they were prompted through (recorded in the evaluation JSON)
    "iou, dice, sam_iou, sam_dice": "SAM's original mask decoder (the SAM checkpoint's, untouched by the run)",
    "tuned_iou, tuned_dice": "SAM's mask decoder with the run's trained parts written in (mask token 0, hypernetwork "
                             "MLP 0, transformer, upscaling), as `samfit export --format sam` writes it"}
MEDSAM_DECODERS = {
    "iou, dice, sam_iou, sam_dice": "MedSAM's original mask decoder (the MedSAM checkpoint's, untouched by the run)",
    "tuned_iou, tuned_dice": "MedSAM's mask decoder with the run's trained parts written in (mask token 0, "
                             "hypernetwork MLP 0, transformer, upscaling), as `samfit export --format sam` writes it"}
SCORES = ("iou", "dice", "sam_iou", "sam_dice", "tuned_iou", "tuned_dice")
SAM_SIZE = 1024  # SamPredictor's input size: the one the prompt encoder and decoder were trained at


class _Encoder(torch.nn.Module):
    """An image encoder as segment_anything's Sam expects it (an `img_size` attribute)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder, self.img_size = encoder, SAM_SIZE

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


def component_boxes(gt: np.ndarray) -> np.ndarray:
    """(N, 4) XYXY boxes, one per 8-connected foreground component of a binary mask (inclusive extents)."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(gt.astype(np.uint8), connectivity=8)
    x, y, w, h = (stats[1:, i] for i in range(4))
    return np.stack([x, y, x + w - 1, y + h - 1], axis=1).astype(np.float32) if count > 1 else np.zeros((0, 4))


def _scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    inter, total = float((pred & gt).sum()), float(pred.sum() + gt.sum())
    return inter / (total - inter), 2 * inter / total  # gt has foreground: total > 0


def sam_models(record, device: torch.device):
    """(SAM with the run's adapted encoder, the same with the run's trained decoder parts, plain SAM), in eval
    mode on `device`; the first two share the encoder."""
    import copy

    from segment_anything import sam_model_registry
    from segment_anything.modeling import Sam

    from samfit.model.backbones import get_backbone
    from samfit.model.sam import load_sam_state
    from samfit.use.export import decoder_value
    from samfit.use.load import load_run, run_checkpoint

    cfg = record.config
    backbone = get_backbone(cfg.model)
    # SAM's and MedSAM's files hold segment_anything's prompt encoder and promptable decoder; SAM 2's do not
    if not backbone.has_weights or backbone.family != "sam":
        raise SamfitError(f"Run {record.folder} used model '{cfg.model}', which has no SAM checkpoint with a prompt "
                          f"encoder and promptable decoder to test. --prompts box needs a vit_b, vit_l or vit_h run "
                          f"(or medsam_vit_b, sam2_hiera_t/s/b+/l); drop --prompts to score the run's own decoder.")
    if record.num_classes > 1:
        raise SamfitError(f"Run {record.folder} is multi-class; SAM's promptable decoder segments one object per "
                          f"box. --prompts box needs a binary run.")
    plain = sam_model_registry[backbone.architecture]()  # MedSAM is SAM ViT-B's architecture
    plain.load_state_dict(load_sam_state(run_checkpoint(record), backbone.architecture))
    # merged when mergeable: plain SAM's cost, and the very encoder `samfit export --format sam` writes
    model = load_run(record.folder, device="cpu", image_size=SAM_SIZE, merge=True)
    tuned_decoder, trained = copy.deepcopy(plain.mask_decoder), model.state_dict()
    tuned_decoder.load_state_dict({k: decoder_value(k, v, trained) for k, v in plain.mask_decoder.state_dict().items()})
    encoder = _Encoder(model.image_encoder)
    adapted = Sam(encoder, plain.prompt_encoder, plain.mask_decoder)
    tuned = Sam(encoder, plain.prompt_encoder, tuned_decoder)
    return adapted.to(device).eval(), tuned.to(device).eval(), plain.to(device).eval()


def share_image(source, target) -> None:
    """Give SamPredictor `target` the image `source` has embedded (the two share an encoder): no second pass."""
    target.features, target.original_size, target.input_size = source.features, source.original_size, source.input_size
    target.is_image_set = True


@torch.no_grad()
def box_masks(predictor, image: np.ndarray | None, boxes: np.ndarray, shape=None) -> np.ndarray:
    """The union of SAM's masks for `boxes` on an RGB uint8 image, at the image's size (`image` None: the one the
    predictor holds, of `shape`)."""
    if image is not None:
        predictor.set_image(image)
    device = predictor.device
    box = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, device=device),
                                                shape if image is None else image.shape[:2])
    masks, _, _ = predictor.predict_torch(None, None, boxes=box, multimask_output=False)
    return masks.any(dim=0)[0].cpu().numpy()


def is_medsam(record) -> bool:
    """Whether the run's model is prompted through MedSAM's inference path rather than SamPredictor."""
    from samfit.model.backbones import MEDSAM_NORMALISATION, get_backbone

    return get_backbone(record.config.model).normalisation == MEDSAM_NORMALISATION


def predictors(record, device: torch.device) -> tuple[list, dict]:
    """([adapted, tuned, plain] predictors, {"pipeline", "decoders"} to record) for the run's model."""
    from segment_anything import SamPredictor

    from samfit.use.promptable_medsam import PIPELINE, MedSAMPredictor
    from samfit.use.promptable_sam2 import is_sam2, sam2_predictors

    if is_sam2(record):  # SAM2ImagePredictor on SAM 2's own models (samfit/use/promptable_sam2.py)
        return sam2_predictors(record, device)
    models = sam_models(record, device)
    if is_medsam(record):
        return [MedSAMPredictor(m) for m in models], {"pipeline": PIPELINE, "decoders": MEDSAM_DECODERS}
    return [SamPredictor(m) for m in models], {"pipeline": "SamPredictor", "decoders": DECODERS}


def evaluate_prompts(record, spec, folder: Path, splits: list[str], device: str, limit: int | None,
                     progress) -> tuple[dict, list[dict], dict, dict]:
    """(scores per split, per-image rows, images scored per split, {"pipeline", "decoders"}) of the box-prompted
    comparison."""
    from samfit.config import DEVICES
    from samfit.data import split_pairs
    from samfit.data.folder import read_image, read_mask
    from samfit.engine.step import pick_device
    from samfit.use.promptable_medsam import MedSAMPredictor, medsam_input
    from samfit.use.promptable_sam2 import SAM2BoxPredictor

    if spec.task != "binary":
        raise SamfitError(f"Dataset '{spec.name}' is {spec.task}; --prompts box scores binary masks.")
    if device not in DEVICES:
        raise SamfitError(f"--device {device!r}: choose one of {', '.join(DEVICES)}.")
    dev = pick_device(device)
    (adapted, tuned, plain), meta = predictors(record, dev)
    medsam, sam2 = isinstance(adapted, MedSAMPredictor), isinstance(adapted, SAM2BoxPredictor)
    scores, rows, counts = {}, [], {}
    for split in splits:
        pairs = split_pairs(spec, folder, split)[:limit] if limit else split_pairs(spec, folder, split)
        task = progress.add_task(f"boxes {spec.name}/{split}", total=len(pairs))
        split_rows = []
        for image_path, mask_path in pairs:
            gt = read_mask(mask_path) > 127
            boxes = component_boxes(gt)
            if len(boxes):
                image = np.ascontiguousarray(read_image(image_path))
                if image.shape[:2] != gt.shape:
                    raise SamfitError(f"Mask size {gt.shape[1]}x{gt.shape[0]} of {mask_path} differs from image "
                                      f"size {image.shape[1]}x{image.shape[0]} of {image_path}. Run `samfit data "
                                      f"check` on the dataset and fix the pair.")
                if medsam:
                    prepared = medsam_input(image)
                    adapted.set_image(image, prepared)
                    iou, dice = _scores(adapted.box_masks(boxes), gt)
                    adapted.share_image(tuned)
                    tuned_iou, tuned_dice = _scores(tuned.box_masks(boxes), gt)
                    plain.set_image(image, prepared)
                    sam_iou, sam_dice = _scores(plain.box_masks(boxes), gt)
                elif sam2:  # tuned reuses adapted's encoder output (SharedEncoder)
                    (iou, dice), (tuned_iou, tuned_dice), (sam_iou, sam_dice) = (
                        _scores(p.box_masks(image, boxes), gt) for p in (adapted, tuned, plain))
                else:
                    iou, dice = _scores(box_masks(adapted, image, boxes), gt)
                    share_image(adapted, tuned)
                    tuned_iou, tuned_dice = _scores(box_masks(tuned, None, boxes, gt.shape), gt)
                    sam_iou, sam_dice = _scores(box_masks(plain, image, boxes), gt)
                split_rows.append({"split": split, "image": str(image_path), "boxes": len(boxes), "iou": iou,
                                   "dice": dice, "sam_iou": sam_iou, "sam_dice": sam_dice, "tuned_iou": tuned_iou,
                                   "tuned_dice": tuned_dice})
            progress.advance(task)
        if not split_rows:
            raise SamfitError(f"No image of {spec.name}/{split} has foreground, so there is no box to prompt with. "
                              f"Choose a split with objects (--split).")
        mean = {k: float(np.mean([r[k] for r in split_rows])) for k in SCORES}
        mean.update(iou_change=mean["iou"] - mean["sam_iou"], dice_change=mean["dice"] - mean["sam_dice"])
        scores[split], counts[split] = mean, len(split_rows)
        rows += split_rows
    return scores, rows, counts, meta
