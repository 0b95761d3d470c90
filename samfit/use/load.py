"""`load_run`: the trained Segmenter of a finished run folder (or of its `samfit export --format adapter` file,
samfit/use/adapter.py), rebuilt from its own record.

config.yaml gives the settings (`RunConfig(**yaml)`), `build_model_for` the model exactly as the run built it:
SAM from the checkpoint the run used (metrics.json's `sam_checkpoint`: path and MD5, checked), or, for a variant
without official weights (`tiny`), SAM's random initialisation drawn again from the run's seed; the method applied
with the run's settings; then the best epoch's trainable parameters (checkpoints/best.pt). At another input size
the position embedding and the global blocks' relative-position tables are interpolated as for a checkpoint
(docs/reference.md, Protocol): from the SAM checkpoint's own 1024 px tables, or from the run's for `tiny`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from samfit.config import DEVICES, RunConfig
from samfit.errors import SamfitError
from samfit.model.backbones import check_image_size, get_backbone, weights_url
from samfit.model.sam import VARIANTS, resize_encoder_state

_MD5_SEEN: dict[tuple, str] = {}  # (path, size, mtime) -> MD5, so loading a run twice reads the file once


@dataclass
class RunRecord:
    """What a finished run folder says about itself."""

    folder: Path
    config: RunConfig
    metrics: dict
    best: dict  # the best epoch's trainable parameters

    @property
    def num_classes(self) -> int:
        """1 for a binary run; C for a mask-classification run (its class head has C + 1 outputs)."""
        biases = [k for k in self.best if k.startswith("mask_decoder.class_head.") and k.endswith(".bias")]
        if not biases:
            return 1
        return self.best[max(biases, key=lambda k: int(k.split(".")[-2]))].shape[0] - 1

    @property
    def best_file(self) -> Path:
        """Where the trained parameters came from: checkpoints/best.pt, or the adapter file itself."""
        return self.folder if self.folder.is_file() else self.folder / "checkpoints" / "best.pt"

    @property
    def num_queries(self) -> int:
        return self.best["mask_decoder.mask_tokens.weight"].shape[0]


def read_run(run_dir: str | Path) -> RunRecord:
    """A finished run folder's (or an adapter file's) settings, record and best parameters; a clear error for
    anything else."""
    folder = Path(run_dir).expanduser()
    if folder.is_file():
        from samfit.use.adapter import read_adapter

        return RunRecord(*read_adapter(folder))
    if not folder.is_dir():
        raise SamfitError(f"Run folder {folder} does not exist. Give the folder `samfit run` wrote (under "
                          f"results/ or --out), the one holding config.yaml and metrics.json.")
    status_file = folder / "status.json"
    if not (folder / "config.yaml").is_file() or not status_file.is_file():
        raise SamfitError(f"{folder} is not a samfit run folder (no config.yaml or status.json). Give the folder "
                          f"`samfit run` wrote, e.g. results/shapes_lora_tiny_128_s0.")
    import json

    status = json.loads(status_file.read_text())
    state = status.get("status")
    if state == "running":
        raise SamfitError(f"Run {folder} is still running (status.json says so): there is no final model yet. "
                          f"Wait for it to finish; if its process is gone, continue it with the same "
                          f"`samfit run` command plus --resume.")
    if state in ("failed", "interrupted") or not (folder / "metrics.json").is_file():
        why = f": {status['error']}" if status.get("error") else ""
        raise SamfitError(f"Run {folder} did not finish (status {state}{why}). Continue it with the same "
                          f"`samfit run` command plus --resume, then use it.")
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        config = RunConfig(**saved)
    except (yaml.YAMLError, TypeError) as exc:
        raise SamfitError(f"{folder / 'config.yaml'} cannot be read as run settings ({exc}). It was edited or "
                          f"written by another samfit version; re-run the run.") from None
    best_path = folder / "checkpoints" / "best.pt"
    if not best_path.is_file():
        raise SamfitError(f"Run {folder} has no {best_path.relative_to(folder)}: its best parameters are missing. "
                          f"Re-run it (the checkpoint folder was deleted or not copied).")
    try:
        best = torch.load(best_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file raises many types
        raise SamfitError(f"{best_path} is unreadable ({type(exc).__name__}): the file is damaged. Copy the run "
                          f"folder again or re-run the run.") from None
    metrics = json.loads((folder / "metrics.json").read_text())
    if "head" not in saved and any(".class_head.layers.1." in k for k in best):  # made before `head` existed
        config = dataclasses.replace(config, head="samfit")
    return RunRecord(folder, config, metrics, best)


def _md5(path: Path) -> str:
    from samfit.download import md5sum

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_SEEN:
        _MD5_SEEN[key] = md5sum(path)
    return _MD5_SEEN[key]


def run_checkpoint(record: RunRecord) -> Path | None:
    """The SAM checkpoint the run trained from (None for a variant without weights), checked against its MD5."""
    cfg = record.config
    if not get_backbone(cfg.model).has_weights:
        return None
    recorded = record.metrics.get("sam_checkpoint") or {}
    w = get_backbone(cfg.model).weights
    how = (f"Download the official file with `samfit weights download {cfg.model}` (from {weights_url(cfg.model)})"
           if w.url else f"Download {w.file} by hand from {w.source},")
    if recorded:
        path = Path(recorded["path"])
        if not path.is_file():
            raise SamfitError(
                f"Run {record.folder} was trained from the SAM checkpoint {path}, which is not there any more. "
                f"{how} to that path (or copy the very file there); the file must have MD5 {recorded['md5']}.")
        actual = _md5(path)
        if actual != recorded["md5"]:
            raise SamfitError(
                f"SAM checkpoint {path} has MD5 {actual}, but run {record.folder} was trained from a file with "
                f"MD5 {recorded['md5']}: it is a different or damaged file. {how} (the run's file must have "
                f"MD5 {recorded['md5']}).")
        return path
    from samfit.model.backbones import resolve_checkpoint  # a run recorded before checkpoints were: as it resolved

    return resolve_checkpoint(cfg.model, cfg.checkpoint)


def _resize_trained(best: dict, model: torch.nn.Module, image_size: int, global_blocks) -> dict:
    """Trained tensors whose shape depends on the input size (a trained position table) interpolated to it; any
    other shape mismatch is an error."""
    own = model.state_dict()
    out = dict(best)
    for key, value in best.items():
        if key not in own or own[key].shape == value.shape:
            continue
        if key == "image_encoder.pos_embed" or ".attn.rel_pos_" in key:
            base = {k: v for k, v in own.items() if k == "image_encoder.pos_embed" or ".attn.rel_pos_" in k}
            base.update({k: v for k, v in best.items() if k in base})
            out[key] = resize_encoder_state(base, image_size, global_blocks)[key]
        else:
            raise SamfitError(f"The trained parameter {key} has shape {tuple(value.shape)} at the run's input size "
                              f"but {tuple(own[key].shape)} at --image-size {image_size}: this method's parameters "
                              f"depend on the input size. Use the run's own size.")
    return out


def load_run(run_dir: str | Path, device: str | torch.device = "auto", image_size: int | None = None,
             merge: bool = False):
    """The trained Segmenter of a finished run (its folder or its adapter file), in eval mode on `device` ("auto": CUDA when present), at the run's
    input size or at `image_size` (a multiple of 16; positions interpolated). `merge=True` (what predict and
    evaluate use): a mergeable method folded into SAM's weights first (`merge_for_inference`)."""
    from samfit.engine.sampling import rng_state, set_rng_state

    saved = rng_state()  # rebuilding reseeds the global generators; the caller's streams are given back
    try:
        model = _load(read_run(run_dir), device, image_size)
    finally:
        set_rng_state(saved)
    return merge_for_inference(model) if merge else model


def merge_for_inference(model):
    """The loaded model with a mergeable method (LoRA, SSF, BitFit, ...) folded into SAM's own weights, in place
    (`Method.merge`): the image encoder holds only SAM's modules, so inference costs what plain SAM's does and
    computes the same function (up to the rounding of the merged weights). `model.merged` says whether it was
    merged; a method that cannot merge (Conv-LoRA, adapters, VPT, ...) is returned as it is. LoRA on the decoder
    (`--decoder lora:R`) is folded in with any method: W + (α/R)·B·A is SAM's decoder Linear again."""
    from samfit.methods import get_method
    from samfit.methods.base import replace_modules
    from samfit.model.decoder_lora import DecoderLoRALinear

    method = get_method(model.run_config.method, **model.run_config.method_args)
    if method.mergeable:
        method.merge(model)
    replace_modules(model.mask_decoder, DecoderLoRALinear, lambda m: m.merged())
    model.merged = method.mergeable
    return model


def _load(record: RunRecord, device, image_size):
    from samfit.engine.sampling import seed_everything
    from samfit.engine.step import pick_device
    from samfit.engine.train import build_model_for

    cfg = dataclasses.replace(record.config, grad_checkpoint=False)
    if not isinstance(device, torch.device) and device not in DEVICES:
        raise SamfitError(f"--device {device!r}: choose one of {', '.join(DEVICES)}.")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    size = image_size or cfg.image_size
    check_image_size(cfg.model, size)
    backbone = get_backbone(cfg.model)  # SAM 2's position tables are resized in its forward: nothing to resize
    global_blocks = VARIANTS[backbone.architecture].global_blocks if backbone.family == "sam" else ()
    checkpoint = run_checkpoint(record)
    num_classes = record.num_classes
    queries = cfg.queries or 2 * num_classes  # what build_model makes of the run's `queries` setting
    if num_classes > 1 and record.num_queries != queries:
        raise SamfitError(f"Run {record.folder} has {record.num_queries} mask tokens for {num_classes} classes; "
                          f"its config.yaml builds {queries}. It was made by another samfit version; re-run it.")
    cpu = torch.device("cpu")
    seed_everything(cfg.seed)  # as the run did before building: the same random SAM (tiny) and method init
    if size == cfg.image_size or checkpoint is not None or backbone.family != "sam":  # tables from the checkpoint
        model = build_model_for(dataclasses.replace(cfg, image_size=size), num_classes, cpu, checkpoint)
    else:  # no 1024 px source (tiny): the run's own tables, interpolated
        state = build_model_for(cfg, num_classes, cpu).state_dict()
        try:
            state = resize_encoder_state(state, size, global_blocks)
        except KeyError as exc:
            raise SamfitError(f"Cannot rebuild run {record.folder} at --image-size {size}: method "
                              f"'{cfg.method}' moves SAM's position table {exc} elsewhere. Use the run's own size "
                              f"{cfg.image_size}.") from None
        seed_everything(cfg.seed)
        model = build_model_for(dataclasses.replace(cfg, image_size=size), num_classes, cpu)
        model.load_state_dict(state)
    best = _resize_trained(record.best, model, size, global_blocks)
    missing_trained = [n for n, p in model.named_parameters() if p.requires_grad and n not in best]
    unexpected = [k for k in best if k not in model.state_dict()]
    if missing_trained or unexpected:
        raise SamfitError(f"{record.best_file} does not fit the model its config.yaml "
                          f"builds (missing {missing_trained[:3]}, unexpected {unexpected[:3]}): the method's code "
                          f"changed since the run. Re-run it with this samfit version.")
    model.load_state_dict(best, strict=False)
    model.requires_grad_(False)
    model.run_config = dataclasses.replace(cfg, image_size=size)
    return model.to(dev).eval()
