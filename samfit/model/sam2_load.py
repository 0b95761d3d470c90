"""Official SAM 2.1 checkpoints ({"model": state dict} in SAM2Base's key layout) onto the prompt-free segmenter.

Key map (official -> samfit), the rest of the file (memory attention and encoder, object pointers, ...) unused:

    image_encoder.trunk.X                      -> image_encoder.X   (Hiera held flat beside the neck)
    image_encoder.trunk.blocks.i.mlp.layers.0  -> image_encoder.blocks.i.mlp.lin1   (layers.1 -> lin2)
    image_encoder.neck.X                       -> image_encoder.neck.X
    no_mem_embed                               -> image_encoder.no_mem_embed
    sam_prompt_encoder.X                       -> prompt_encoder.X
    sam_mask_decoder.X                         -> mask_decoder.X    (without the IoU and object-score heads; mask
                                                  token 0 and MLP 0, or Q tokens cycled for the multi-class head)
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from samfit.errors import SamfitError
from samfit.model.sam2_configs import HIERA

PATCH_KEY = "image_encoder.trunk.patch_embed.proj.weight"
HEADS = ("iou_prediction_head.", "pred_obj_score_head.")


def to_samfit_key(key: str) -> str | None:
    """The segmenter's name for an official key (None: a key the image path does not use)."""
    if key == "no_mem_embed":
        return "image_encoder.no_mem_embed"
    if key.startswith("image_encoder.trunk."):
        key = "image_encoder." + key[len("image_encoder.trunk."):]
        return re.sub(r"\.mlp\.layers\.([01])\.", lambda m: f".mlp.lin{int(m[1]) + 1}.", key)
    if key.startswith("image_encoder.neck."):
        return key
    if key.startswith("sam_prompt_encoder."):
        return "prompt_encoder." + key[len("sam_prompt_encoder."):]
    if key.startswith("sam_mask_decoder.") and not key[len("sam_mask_decoder."):].startswith(HEADS):
        return "mask_decoder." + key[len("sam_mask_decoder."):]
    return None


def to_official_key(key: str) -> str:
    """The inverse of `to_samfit_key`."""
    if key == "image_encoder.no_mem_embed":
        return "no_mem_embed"
    if key.startswith("image_encoder.neck."):
        return key
    if key.startswith("image_encoder."):
        key = "image_encoder.trunk." + key[len("image_encoder."):]
        return re.sub(r"\.mlp\.lin([12])\.", lambda m: f".mlp.layers.{int(m[1]) - 1}.", key)
    if key.startswith("prompt_encoder."):
        return "sam_prompt_encoder." + key[len("prompt_encoder."):]
    return "sam_" + key  # mask_decoder.X


def guess_sam2(state: dict) -> str | None:
    """Which SAM 2 configuration a state dict is, from Hiera's first width and its number of blocks."""
    width = state[PATCH_KEY].shape[0]
    depth = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
    for name, h in HIERA.items():
        if h.embed_dim == width and sum(h.stages) == depth:
            return name
    return None


def read_sam2_state(path: Path, name: str) -> dict:
    """The official state dict in `path`, checked to be SAM 2 and the configuration `name`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise SamfitError(f"Could not read checkpoint {path} ({type(exc).__name__}): the file is corrupt or not a "
                          f"PyTorch checkpoint of tensors. Download it again with `samfit weights download "
                          f"{name}`.") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or PATCH_KEY not in state:
        what = "a SAM (v1) state dict" if isinstance(state, dict) and "image_encoder.pos_embed" in state else \
            "not a SAM 2 checkpoint"
        raise SamfitError(f"Checkpoint {path} is {what} (no {PATCH_KEY}), but --model is {name}. Pass a SAM 2.1 "
                          f"file ({{'model': state}} as Meta publishes them), or the --model it belongs to.")
    found = guess_sam2(state)
    if found != name:
        raise SamfitError(f"Checkpoint {path} is for {found or 'an unknown SAM 2 configuration'}, but --model is "
                          f"{name}. Pass --model {found}" + (" or" if found else "") + f" the {name} checkpoint.")
    return state


def load_sam2_weights(model, checkpoint, name: str, queries: int, binary: bool, head: str) -> None:
    """Load an official SAM 2.1 file into `model` (a SAM2Segmenter), strictly: every weight of the image path
    must be in the file with its shape."""
    from samfit.model.backbones import resolve_checkpoint

    path = resolve_checkpoint(name, checkpoint)
    official = read_sam2_state(path, name)
    state = {}
    for key, value in official.items():
        new = to_samfit_key(key)
        if new is None:
            continue
        if new == "mask_decoder.mask_tokens.weight":
            one = binary or head == "official"
            value = value[torch.zeros(queries, dtype=torch.long) if one else torch.arange(queries) % len(value)]
        elif new.startswith("mask_decoder.output_hypernetworks_mlps.") and not new.startswith(
                "mask_decoder.output_hypernetworks_mlps.0."):
            continue
        state[new] = value
    if not binary and head == "samfit":  # as for SAM: distinct queries from tokens 0-3 plus a little noise
        w = state["mask_decoder.mask_tokens.weight"]
        state["mask_decoder.mask_tokens.weight"] = w + 0.02 * torch.randn(w.shape, generator=torch.Generator()
                                                                           .manual_seed(0))
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("mask_decoder.class_head.")]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or wrong:
        raise SamfitError(f"Checkpoint {path} does not fit {name}: {len(missing)} weights missing (e.g. "
                          f"{to_official_key(missing[0]) if missing else '-'}), {len(wrong)} of another shape "
                          f"(e.g. {wrong[0] if wrong else '-'}). Is it an official SAM 2.1 file?")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
