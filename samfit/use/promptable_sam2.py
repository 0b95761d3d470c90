"""SAM 2's own box-prompted inference, for `samfit evaluate --prompts box` on sam2_hiera_t/s/b+/l runs.

Three SAM2Base models of Meta's sam2 package, each built by `sam2.build_sam.build_sam2` from the run's SAM 2.1 config
(configs/sam2.1/sam2.1_hiera_*.yaml, at its 1024 px) and given a whole state dict strictly:

* plain: the SAM 2.1 checkpoint the run trained from (`sam_iou`, `sam_dice`);
* adapted: that checkpoint with only the image encoder (Hiera trunk, FPN neck, no_mem_embed) replaced by the run's,
  the method merged (`iou`, `dice`); a decoder-only run leaves those tensors bitwise the checkpoint's, so plain and
  adapted are the same computation and `iou_change` is exactly 0;
* tuned: what `samfit export --format sam` writes (samfit/use/export_sam2.py's `sam2_state`: the adapted encoder and
  the run's trained decoder parts) (`tuned_iou`, `tuned_dice`).

Each is prompted through SAM2ImagePredictor (its own transforms: a square 1024×1024 resize, ImageNet mean/std; its
postprocessing of the logits to H×W, thresholded at 0), one XYXY box per connected component, `multimask_output=
False`, the image's prediction the union of the masks. The models are built with `apply_postprocessing=False`, so
the single mask is always mask token 0's (the token the run trained), never swapped for a multimask token by
stability (build_sam2's default), as SamPredictor's multimask_output=False on SAM. Only mergeable methods: the
adapted encoder must be SAM 2's own modules with weights, as the export writes them.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from samfit.errors import SamfitError

PIPELINE = "SAM2ImagePredictor"
CONFIGS = {  # samfit's model -> Meta's SAM 2.1 config (sam2 package, configs/sam2.1/)
    "sam2_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
DECODERS = {  # score columns -> the decoder they were prompted through (recorded in the evaluation JSON)
    "iou, dice, sam_iou, sam_dice": "SAM 2's original mask decoder and prompt encoder (the SAM 2.1 checkpoint's, "
                                    "untouched by the run); mask token 0 (no fallback to the multimask tokens)",
    "tuned_iou, tuned_dice": "SAM 2's mask decoder with the run's trained parts written in (mask token 0, "
                             "hypernetwork MLP 0, transformer, upscaling and high-resolution convs, IoU and "
                             "object-score tokens), as `samfit export --format sam` writes it"}


def is_sam2(record) -> bool:
    """Whether the run's model is a SAM 2 configuration with an official checkpoint (sam2_tiny has none)."""
    from samfit.model.backbones import get_backbone

    backbone = get_backbone(record.config.model)
    return backbone.family == "sam2" and backbone.has_weights


def is_encoder_key(key: str) -> bool:
    """Whether an official SAM2Base key belongs to the image encoder the run adapts (trunk, neck, no_mem_embed)."""
    return key.startswith("image_encoder.") or key == "no_mem_embed"


class SharedEncoder(torch.nn.Module):
    """SAM 2's image encoder (trunk + neck) for two models: the second `set_image` of the same image reuses the
    first's output (each model's `forward_image` still applies its own decoder's conv_s0/conv_s1 to it)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder, self.last = encoder, None

    def forward(self, images: torch.Tensor) -> dict:
        held = self.last
        if held is None or held[0].shape != images.shape or not torch.equal(held[0], images):
            self.last = held = (images, self.encoder(images))
        return {k: list(v) if isinstance(v, list) else v for k, v in held[1].items()}  # forward_image edits lists


def _load(model, state: dict, what: str, path) -> None:
    try:
        model.load_state_dict(state)  # strict, as build_sam2 loads a checkpoint
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SamfitError(f"{what} does not load into SAM 2's {type(model).__name__} strictly ({first}). Is "
                          f"{path} an official SAM 2.1 file ({{'model': state}} as Meta publishes them)?") from None


def sam2_models(record, device: torch.device):
    """(adapted, tuned, plain) SAM2Base models of a binary SAM 2 run of a mergeable method, in eval mode on
    `device`; adapted and tuned share one image encoder module (the same weights)."""
    from sam2.build_sam import build_sam2

    from samfit.engine.sampling import rng_state, set_rng_state
    from samfit.methods import get_method
    from samfit.model.sam2_load import read_sam2_state
    from samfit.use.export_sam2 import sam2_state
    from samfit.use.load import run_checkpoint

    cfg = record.config
    if record.num_classes > 1:
        raise SamfitError(f"Run {record.folder} is multi-class; SAM 2's promptable decoder segments one object per "
                          f"box. --prompts box needs a binary run.")
    if not get_method(cfg.method, **cfg.method_args).mergeable:
        raise SamfitError(f"Run {record.folder} trained method '{cfg.method}', which cannot be merged into SAM 2's "
                          f"weights, so SAM2ImagePredictor has no model to run with its encoder. --prompts box on "
                          f"SAM 2 needs a mergeable method (lora, ssf, bitfit, full, decoder-only, ...); drop "
                          f"--prompts to score the run's own decoder.")
    path = run_checkpoint(record)
    source = read_sam2_state(path, cfg.model)
    tuned_state = sam2_state(record, path, source)  # the export: merged encoder, trained decoder parts written in
    adapted_state = {k: tuned_state[k] if is_encoder_key(k) else v for k, v in source.items()}
    saved = rng_state()  # building initialises weights at random: the caller's streams are given back
    try:
        plain = build_sam2(CONFIGS[cfg.model], None, device="cpu", mode="eval", apply_postprocessing=False)
    finally:
        set_rng_state(saved)
    adapted, tuned = copy.deepcopy(plain), copy.deepcopy(plain)
    _load(plain, source, f"SAM 2 checkpoint {path}", path)
    _load(adapted, adapted_state, f"Run {record.folder}'s adapted model", path)
    _load(tuned, tuned_state, f"Run {record.folder}'s exported model", path)
    adapted.image_encoder = tuned.image_encoder = SharedEncoder(adapted.image_encoder)  # tuned's: the same tensors
    return adapted.to(device).eval(), tuned.to(device).eval(), plain.to(device).eval()


class SAM2BoxPredictor:
    """SAM2ImagePredictor on one model: `box_masks(image, boxes)` is the union of its masks for the boxes."""

    def __init__(self, model):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.predictor = SAM2ImagePredictor(model)

    @torch.no_grad()
    def box_masks(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(H, W) bool: the union of the masks for N XYXY pixel boxes on an RGB uint8 image (H, W, 3)."""
        self.predictor.set_image(image)
        masks, _, _ = self.predictor.predict(box=np.asarray(boxes, np.float32), multimask_output=False)
        return masks.reshape(-1, *image.shape[:2]).any(axis=0)


def sam2_predictors(record, device: torch.device) -> tuple[list, dict]:
    """([adapted, tuned, plain] predictors, {"pipeline", "decoders"} to record) for a SAM 2 run."""
    return [SAM2BoxPredictor(m) for m in sam2_models(record, device)], {"pipeline": PIPELINE, "decoders": DECODERS}
