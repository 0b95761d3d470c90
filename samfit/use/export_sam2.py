"""`samfit export --format sam` for SAM 2 runs: the source SAM 2.1 checkpoint with the run's trained values
written back, so that Meta's `sam2.build_sam.build_sam2(config, ckpt_path=FILE)` loads it strictly, as its own.

The exact inverse of samfit/model/sam2_load.py, key by key over the source file:
- image encoder (Hiera trunk, FPN neck) and no_mem_embed: the run's values with the method merged
  (`load_run(..., merge=True)`), named back by `to_official_key`; Hiera's position tables (pos_embed,
  pos_embed_window) are held at their checkpoint sizes and resized in the forward, so they too are the run's
  (the source's, unless a method trains them);
- sam_mask_decoder: the cut decoder's trained parts written in place (transformer, upscaling and high-res convs,
  IoU and object-score tokens, mask token 0, hypernetwork MLP 0); the other mask tokens, MLPs 1-3 and the IoU and
  object-score heads, which the cut decoder does not have, as in the source;
- everything else (memory attention and encoder, object pointers, the prompt encoder, frozen in every run): the
  source's tensors themselves.
"""
from __future__ import annotations

from pathlib import Path

import torch

from samfit.errors import SamfitError

TOKENS = "mask_decoder.mask_tokens.weight"
MLP = "mask_decoder.output_hypernetworks_mlps."


def _new_value(name: str | None, source: torch.Tensor, trained: dict) -> torch.Tensor:
    """The exported tensor for an official key whose samfit name is `name` (None: not in the image path)."""
    if name is None or name.startswith("prompt_encoder."):
        return source
    if name == TOKENS:
        out = source.clone()
        out[0] = trained[name][0]
        return out
    if name.startswith(MLP) and not name.startswith(MLP + "0."):
        return source  # MLPs 1-3: not in the cut decoder
    return trained[name]


def sam2_state(record, path: Path, source: dict | None = None) -> dict:
    """The official SAM 2.1 state dict (SAM2Base's keys and shapes, those of the file at `path`) of a binary run
    of a mergeable method, its trained values written back."""
    from samfit.model.sam2_load import read_sam2_state, to_official_key, to_samfit_key
    from samfit.use.load import load_run

    source = read_sam2_state(path, record.config.model) if source is None else source  # given: already read
    trained = load_run(record.folder, device="cpu", merge=True).state_dict()
    names = {key: to_samfit_key(key) for key in source}
    placed = set(names.values())
    unplaced = [k for k in trained if k not in placed and not k.startswith("prompt_encoder.")]
    if unplaced:
        raise SamfitError(f"Cannot export {record.folder}: {len(unplaced)} tensors of the merged model have no "
                          f"place in SAM 2's checkpoint {path} (e.g. {to_official_key(unplaced[0])}). The method's "
                          f"merge does not give SAM 2's layout; use --format adapter.")
    out = {}
    for key, value in source.items():
        new = _new_value(names[key], value, trained)
        if new.shape != value.shape:
            raise SamfitError(f"Cannot export {record.folder}: {key} has shape {tuple(new.shape)} after merging, "
                              f"{tuple(value.shape)} in SAM 2's checkpoint {path}. The method's merge does not "
                              f"give SAM 2's layout; use --format adapter.")
        out[key] = value if new is value else new.detach().to(value.dtype).contiguous().clone()
    return out
