"""Export a trained run for other tools.

`--format sam` (mergeable methods, binary runs of vit_b/l/h and MedSAM; SAM 2 below): a state dict with exactly
the keys and shapes of the official sam_vit_*.pth, so `segment_anything.sam_model_registry[variant](checkpoint=
FILE)` loads it strictly:
- image encoder: the method merged into SAM's weights (`Method.merge`); the absolute position embedding and the
  relative-position tables are the source checkpoint's, at their original 1024 px sizes (the run used copies
  interpolated to its input size; no mergeable method trains them);
- mask decoder: the trained parts written back in place: the two-way transformer, the output upscaling, the IoU
  token, mask token 0 and hypernetwork MLP 0; SAM's other mask tokens, MLPs 1-3 and the IoU head, which the cut
  decoder does not have, as in the source checkpoint;
- prompt encoder: the source checkpoint's (frozen in every run).
SAM 2 runs (sam2_hiera_*): the source SAM 2.1 file, {"model": state} in SAM2Base's layout, with the trained values
written back (samfit/use/export_sam2.py), so `sam2.build_sam.build_sam2(config, ckpt_path=FILE)` loads it.

`--format adapter` (every method): a safetensors file of the trained parameters only (checkpoints/best.pt), with
the method, its settings, the run's settings and the SAM checkpoint's MD5 and path in its metadata;
`samfit.load_run` (and so predict and export) takes the file in place of the run folder (samfit/use/adapter.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from samfit.errors import SamfitError

FORMATS = ("sam", "adapter")
POSITION_TABLE = ("image_encoder.pos_embed", ".attn.rel_pos_h", ".attn.rel_pos_w")


def _is_position_table(key: str) -> bool:
    return key == POSITION_TABLE[0] or key.endswith(POSITION_TABLE[1:])


def decoder_value(name: str, source: torch.Tensor, trained: dict) -> torch.Tensor:
    """SAM's decoder tensor `name` (without the prefix) with the cut decoder's trained values written in."""
    key = "mask_decoder." + name
    if name == "mask_tokens.weight":
        out = source.clone()
        out[0] = trained[key][0]
        return out
    if name.startswith("output_hypernetworks_mlps.") and not name.startswith("output_hypernetworks_mlps.0."):
        return source  # MLPs 1-3: not in the cut decoder
    if name.startswith("iou_prediction_head."):
        return source  # removed from the cut decoder, never trained
    return trained[key]


def sam_state(run_dir, out: Path | None = None) -> tuple[dict, str]:
    """(the official-layout state dict, the model name) of a run; `out` must not be the checkpoint it used. SAM 2:
    SAM2Base's state dict (samfit/use/export_sam2.py), which the file holds as {"model": state}."""
    from samfit.methods import get_method
    from samfit.model.backbones import get_backbone
    from samfit.model.sam import load_sam_state
    from samfit.use.load import load_run, read_run, run_checkpoint

    record = read_run(run_dir)
    cfg = record.config
    method = get_method(cfg.method, **cfg.method_args)
    if not method.mergeable:
        raise SamfitError(
            f"Run {record.folder} trained method '{cfg.method}', which cannot be merged into SAM's weights, so it "
            f"has no plain SAM checkpoint. Export its trained parameters with `samfit export {record.folder} "
            f"--format adapter --out FILE.safetensors`, or use the run folder itself (samfit predict).")
    backbone = get_backbone(cfg.model)
    if not backbone.has_weights:
        raise SamfitError(f"Run {record.folder} used model '{cfg.model}', which has no official SAM checkpoint "
                          f"layout to export to. --format sam needs a vit_b, vit_l, vit_h, medsam_vit_b or "
                          f"sam2_hiera_* run; --format adapter works for any run.")
    if record.num_classes > 1:
        raise SamfitError(f"Run {record.folder} has a mask-classification head ({record.num_classes} classes), "
                          f"which SAM's decoder has no place for. Use --format adapter.")
    path = run_checkpoint(record)
    if out is not None and out.exists() and out.resolve() == path.resolve():
        raise SamfitError(f"--out {out} is the SAM checkpoint run {record.folder} was trained from; choose another "
                          f"file.")
    if backbone.family == "sam2":
        from samfit.use.export_sam2 import sam2_state

        return sam2_state(record, path), cfg.model
    source = load_sam_state(path, backbone.architecture)  # MedSAM: a vit_b file
    model = load_run(record.folder, device="cpu", merge=True)  # the method (and a decoder LoRA) folded in
    trained = model.state_dict()
    out = {}
    for key, value in source.items():
        if key.startswith("image_encoder.") and not _is_position_table(key):
            new = trained[key]
        elif key.startswith("mask_decoder."):
            new = decoder_value(key[len("mask_decoder."):], value, trained)
        else:  # position tables at 1024 px, the prompt encoder
            new = value
        if new.shape != value.shape:
            raise SamfitError(f"Cannot export {record.folder}: {key} has shape {tuple(new.shape)} after merging, "
                              f"{tuple(value.shape)} in SAM's checkpoint. The method's merge does not give SAM's "
                              f"layout; use --format adapter.")
        out[key] = new.detach().to(value.dtype).contiguous().clone()
    return out, cfg.model


def adapter_tensors(run_dir) -> tuple[dict, dict]:
    """(trained tensors, metadata of strings) for the adapter format."""
    import dataclasses
    from importlib.metadata import version

    from samfit.use.adapter import FORMAT
    from samfit.use.load import read_run

    record = read_run(run_dir)
    cfg = record.config
    checkpoint = record.metrics.get("sam_checkpoint") or {}
    meta = {"format": FORMAT, "samfit": version("samfit"), "method": cfg.method,
            "method_args": json.dumps(cfg.method_args, sort_keys=True), "model": cfg.model,
            "image_size": str(cfg.image_size), "num_classes": str(record.num_classes),
            "sam_checkpoint_md5": checkpoint.get("md5", ""), "sam_checkpoint_path": checkpoint.get("path", ""),
            "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True)}
    return {k: v.contiguous() for k, v in record.best.items()}, meta


def export_run(run_dir, out: str | Path, fmt: str = "sam") -> Path:
    """Write the run in `fmt` to `out` atomically; returns the path."""
    from samfit.engine.rundir import save_torch
    from samfit.engine.rundir import write_bytes
    from samfit.model.backbones import get_backbone

    if fmt not in FORMATS:
        raise SamfitError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    out = Path(out).expanduser()
    if out.is_dir():
        example = out / ("sam_export.pth" if fmt == "sam" else "adapter.safetensors")
        raise SamfitError(f"--out {out} is a folder; give a file name, e.g. {example}.")
    if fmt == "sam":
        state, model = sam_state(run_dir, out)
        save_torch(out, {"model": state} if get_backbone(model).family == "sam2" else state)
        return out
    try:
        from safetensors.torch import save
    except ImportError:
        raise SamfitError("--format adapter needs the safetensors package: pip install safetensors "
                          "(a samfit dependency; reinstall samfit with `make install`).") from None
    tensors, meta = adapter_tensors(run_dir)
    write_bytes(out, save(tensors, metadata=meta))
    return out
