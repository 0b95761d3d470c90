"""SAM construction and the prompt-free segmenters."""
from __future__ import annotations

import torch

from samfit.model.backbones import get_backbone, resolve_checkpoint
from samfit.model.sam import (SAM_IMAGE_SIZE, VARIANTS, build_sam_parts, get_variant, load_sam_state,
                              resize_encoder_state, sam_total_parameters)
from samfit.model.sam2 import build_sam2_model, sam2_total_parameters
from samfit.model.segmenter import Segmenter


def default_num_queries(num_classes: int) -> int:
    """Q = 2C mask tokens: semantic targets hold at most C masks per image (one per class present), and
    spare queries ease Hungarian matching early in training (Mask2Former uses Q >> C for the same reason)."""
    return 2 * num_classes


def _decoder_state(state: dict, num_queries: int, binary: bool, head: str = "samfit") -> dict:
    """Map SAM's decoder weights onto the cut decoder: MLP 0, and token 0 for the binary head and for every query
    of the official multi-class head (AutoGluon's SAMForSemanticSegmentation), tokens 0-3 in turn for samfit's."""
    out = {}
    for key, value in state.items():
        if not key.startswith("mask_decoder.") or "iou_prediction_head" in key:
            continue
        name = key[len("mask_decoder."):]
        if name == "mask_tokens.weight":
            one = binary or head == "official"
            value = value[torch.zeros(num_queries, dtype=torch.long) if one else torch.arange(num_queries) % len(value)]
        elif name.startswith("output_hypernetworks_mlps."):
            if not name.startswith("output_hypernetworks_mlps.0."):
                continue
        out[name] = value
    return out


def build_model(variant: str, num_classes: int = 1, image_size: int | None = None, checkpoint=None,
                num_queries: int | None = None, head: str = "samfit") -> Segmenter:
    """Build the prompt-free segmenter of any backbone (`variant` a model name of samfit/model/backbones.py:
    SAM, MedSAM, SAM 2).

    With no checkpoint the weights are random (for counting parameters and tests). `checkpoint` is a path
    to an official SAM state dict; position tables are interpolated to `image_size`. `head` (multi-class only):
    samfit's (queries from tokens 0-3 in turn plus 0.02 noise, a 2-layer class MLP) or the official code's
    (every query equal to token 0, no noise; one Linear(256, C+1)), docs/reference.md.
    """
    backbone = get_backbone(variant)
    if backbone.family == "sam2":  # SAM 2's Hiera: its own module (samfit/model/sam2.py)
        return build_sam2_model(variant, num_classes, image_size, checkpoint, num_queries, head)
    v = get_variant(backbone.architecture)  # MedSAM is built as vit_b
    image_size = image_size or v.fixed_size or SAM_IMAGE_SIZE
    binary = num_classes == 1
    queries = 1 if binary else (num_queries or default_num_queries(num_classes))
    encoder, prompt, decoder = build_sam_parts(backbone.architecture, image_size, queries)
    model = Segmenter(encoder, prompt, decoder, variant, image_size, num_classes, head=head)
    if checkpoint is not None:
        state = load_sam_state(resolve_checkpoint(variant, checkpoint), backbone.architecture)
        state = resize_encoder_state(state, image_size, v.global_blocks)
        prefix = {"image_encoder.": encoder, "prompt_encoder.": prompt}
        for p, module in prefix.items():
            module.load_state_dict({k[len(p):]: t for k, t in state.items() if k.startswith(p)})
        dec = _decoder_state(state, queries, binary, head)
        if not binary and head == "samfit":
            noise = torch.Generator().manual_seed(0)
            w = dec["mask_tokens.weight"]
            dec["mask_tokens.weight"] = w + 0.02 * torch.randn(w.shape, generator=noise)
        missing, unexpected = decoder.load_state_dict(dec, strict=False)
        assert not unexpected and all(k.startswith("class_head.") for k in missing), (missing, unexpected)
    elif not binary and head == "official":  # random SAM: every query still starts as its token 0
        with torch.no_grad():
            decoder.mask_tokens.weight.copy_(decoder.mask_tokens.weight[0:1].expand(queries, -1))
    model.freeze_for_finetuning()
    return model


def total_parameters(model: str) -> int:
    """The complete original model's parameter count (the denominator of "% of SAM"), for any backbone."""
    backbone = get_backbone(model)
    if backbone.family == "sam2":
        return sam2_total_parameters(model)
    return sam_total_parameters(backbone.architecture)


__all__ = ["VARIANTS", "Segmenter", "build_model", "default_num_queries", "total_parameters"]
