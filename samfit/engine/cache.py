"""Training from stored encoder outputs: the decoder-only embedding cache and the prefix cache of late placement.

* **Decoder-only**: when SAM's image encoder is frozen and untouched, its output for an image never changes,
  so each training image is encoded once (and once more flipped when flipping is on) and the decoder trains
  from the stored embeddings. Eligibility is read off the model, without naming a method: no trainable
  parameter outside the mask decoder, and an image encoder made only of SAM's and torch's own modules (no
  method layer, wrapper, hook or patched forward other than activation checkpointing, which computes the same
  thing). SAM's ViT stores its s16 embedding; SAM 2's Hiera the tuple (s16 embedding, s4, s8 features) its
  decoder reads, one row per image with each map in its own memory layout (`StoredInput`).
* **Prefix** (engine/prefix_cache.py): when every trainable encoder part sits in blocks >= k and nothing before
  them is random, patch embedding + positions + blocks < k are computed once per image and view, and training
  runs blocks >= k, the neck and the decoder. SAM 2's Hiera also stores the outputs of the stage ends before
  block k that its FPN neck reads. Tried when the decoder-only cache does not apply.
The validation split used for model selection is stored the same way.

Exactness: the engine draws each image's flip from the seeded (seed, epoch, batch) generator
(`sampling.flip_choices`), so a cached batch holds exactly what the encoder (or its prefix) would have produced
for the flipped or unflipped image. The stored part is run on batches of the training micro-batch size (the
last batch padded to that size) and, for validation, in the evaluation's own batches, because a CPU GEMM's
rounding can depend on the number of rows. With one image per batch the scores of a cached run are those of the
uncached run bitwise on any CPU (tested); with more, an image's output can still depend on its row in the batch
on some CPUs (MKL's AVX2 kernels: up to ~4e-6 at 64 px), so the two runs agree up to that rounding.

Storage: in the encoder's output dtype (fp32 on CPU; exact) or, with `--cache-dtype bf16|fp16`, rounded to
half the size. The rounding is measured while building: the largest and the relative RMS error of the stored
tensors, and its effect on the first validation batch's logits (largest change, share of pixels whose mask
flips); metrics.json records them under `embedding_cache.precision`.

Bounded: the stored tensors (fp32 upper bound) plus the targets (uint8) must fit under `cache_max_mb`;
otherwise `cache_embeddings=auto` trains uncached and says why, and `on` stops with an error. The cache lives in
host RAM (the device gets one batch at a time).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn
from torch.utils.data import DataLoader, Dataset

from samfit.engine.prefix_cache import (EncoderPrefix, PrefixCachedSegmenter, StoredInput, module_problem,
                                         prefix_depth, prefix_item_mb)
from samfit.errors import SamfitError
from samfit.model.sam import PATCH, PROMPT_DIM
from samfit.model.sam2 import HieraEncoder

STORE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None: the encoder's own dtype


def uncacheable_reason(model: nn.Module) -> str | None:
    """None when the image encoder is frozen plain SAM; otherwise why its embeddings cannot be cached."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("mask_decoder.")]
    if trainable:
        return f"{len(trainable)} trainable parameters outside the mask decoder (e.g. {trainable[0]})"
    encoder = model.image_encoder
    if not isinstance(encoder, (ImageEncoderViT, HieraEncoder)):
        return f"the image encoder is a {type(encoder).__name__}, not SAM's ImageEncoderViT or SAM 2's Hiera"
    for name, module in encoder.named_modules():
        problem = module_problem(module, f"image_encoder.{name}" if name else "image_encoder")
        if problem:
            return problem
    return None


@dataclass
class CachePlan:
    """What is stored per image and view (`encode`: images -> stored tensor) and what trains from it (`model`)."""

    kind: str  # "decoder-only" | "prefix"
    encode: Callable
    model: nn.Module
    item_mb: float  # fp32 size of one image's stored tensor
    blocks: int | None = None  # prefix: the number of encoder blocks stored


def cache_plan(model: nn.Module, image_size: int) -> tuple[CachePlan | None, str | None]:
    """(the plan, None), or (None, why neither cache applies), read off the model."""
    grid = image_size // PATCH
    reason = uncacheable_reason(model)
    if reason is None:  # SAM 2 also keeps the stride-4 and stride-8 features its decoder reads
        levels = 1 + 4 + 16 if isinstance(model.image_encoder, HieraEncoder) else 1
        return CachePlan("decoder-only", model.encode, CachedEncoderSegmenter(model),
                         PROMPT_DIM * levels * grid * grid * 4 / 2**20), None
    k, prefix_reason = prefix_depth(model)
    if k is None:
        return None, f"{reason}; no prefix to cache: {prefix_reason}"
    return CachePlan("prefix", EncoderPrefix(model.image_encoder, k), PrefixCachedSegmenter(model, k),
                     prefix_item_mb(model.image_encoder, k, image_size), blocks=k), None


def cache_size_mb(n_train: int, n_val: int, image_size: int, flip: bool, item_mb: float | None = None) -> float:
    """Stored tensors (fp32 upper bound; default: decoder-only embeddings) of every training image and view and
    every validation image, plus the training targets as uint8."""
    if item_mb is None:
        item_mb = PROMPT_DIM * (image_size // PATCH) ** 2 * 4 / 2**20
    views = 2 if flip else 1
    return n_train * views * item_mb + n_val * item_mb + n_train * image_size * image_size / 2**20


class CachedEncoderSegmenter(StoredInput):
    """The Segmenter fed with stored embeddings: forward(embeddings) = decode + auxiliary losses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, stored: torch.Tensor) -> dict:
        out = self.model.decode(self.restore(stored))
        out["aux_loss"] = self.model.collect_aux_loss(stored)
        return out


class EmbeddingDataset(Dataset):
    """A split's stored tensors in place of its images: items (tensor in `dtype`, 0, index); `gt` as the split's."""

    def __init__(self, dataset, embeddings: torch.Tensor, dtype: torch.dtype | None = None):
        self.dataset, self.embeddings, self.dtype = dataset, embeddings, dtype or embeddings.dtype

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, index: int):
        return self.embeddings[index].to(self.dtype), 0, index

    def gt(self, index: int):
        return self.dataset.gt(index)


@dataclass
class Rounding:
    """The error of storing tensors in a narrower dtype, accumulated over everything stored."""

    max_abs: float = 0.0
    err_sq: float = 0.0
    ref_sq: float = 0.0

    def add(self, exact: torch.Tensor, stored: torch.Tensor) -> None:
        err = stored.double() - exact.double()
        self.max_abs = max(self.max_abs, err.abs().max().item() if err.numel() else 0.0)
        self.err_sq += err.square().sum().item()
        self.ref_sq += exact.double().square().sum().item()

    def report(self) -> dict:
        rel = math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq else 0.0
        return {"max_abs_error": self.max_abs, "relative_rms_error": rel}


@dataclass
class EmbeddingCache:
    train: torch.Tensor  # (N, views, ...): view 0 as read, view 1 flipped
    targets: torch.Tensor  # (N, ...) uint8
    target_dtype: torch.dtype
    val: EmbeddingDataset
    model: nn.Module  # what the stored tensors go through
    build_time_s: float
    kind: str = "decoder-only"
    blocks: int | None = None
    compute_dtype: torch.dtype | None = None  # the dtype batches are handed out in
    precision: dict = field(default_factory=dict)

    @property
    def size_mb(self) -> float:
        tensors = (self.train, self.targets, self.val.embeddings)
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    def report(self) -> dict:
        out = {"enabled": True, "kind": self.kind, "size_mb": round(self.size_mb, 1), "train_images": len(self.train),
               "views": self.train.shape[1], "val_images": len(self.val), "dtype": str(self.train.dtype),
               "build_time_s": round(self.build_time_s, 3)}
        if self.blocks is not None:
            out["blocks_cached"] = self.blocks
        if self.precision:
            out["precision"] = self.precision
        return out

    def batches(self, indices: list[int], batch_size: int, flips):
        """(stored tensors, targets, indices) for consecutive batches of `indices`; `flips(i, n)` gives the
        (n,) bool flip choices of batch i (None: no flipping)."""
        for i, start in enumerate(range(0, len(indices) - batch_size + 1, batch_size)):
            idx = torch.tensor(indices[start:start + batch_size])
            flip = flips(i, len(idx)) if flips is not None else torch.zeros(len(idx), dtype=torch.bool)
            embeddings = self.train[idx, flip.long()].to(self.compute_dtype or self.train.dtype)
            targets = self.targets[idx].to(self.target_dtype)
            targets[flip] = targets[flip].flip(-1)
            yield embeddings, targets, idx


def _as_uint8(targets: torch.Tensor) -> torch.Tensor:
    stored = targets.to(torch.uint8)
    if not torch.equal(stored.to(targets.dtype), targets):
        raise SamfitError("Embedding cache: targets are not whole numbers in 0..255; use --cache-embeddings off.")
    return stored


@torch.no_grad()
def _encode(encode, images: torch.Tensor, batch_size: int, device, autocast) -> torch.Tensor:
    """Run `encode` on `images` in batches of exactly `batch_size` (the last one padded with repeats)."""
    n = images.shape[0]
    if n < batch_size:
        images = torch.cat([images, images[torch.arange(batch_size - n) % n]])
    with autocast():
        out = encode(images.to(device, non_blocking=True))
    return tuple(t[:n].cpu() for t in out) if isinstance(out, tuple) else out[:n].cpu()


def build_cache(model, train_set, val_set, batch_size: int, eval_batch_size: int, flip: bool, device, autocast,
                num_workers: int = 0, plan: CachePlan | None = None, store_dtype: torch.dtype | None = None
                ) -> EmbeddingCache:
    """Store the training split (both views when flipping) and the validation split once, by `plan` (default:
    the decoder-only embeddings), in `store_dtype` (None: as computed)."""
    plan = plan or CachePlan("decoder-only", model.encode, CachedEncoderSegmenter(model), 0.0)
    started, rounding = time.perf_counter(), Rounding()

    def stored(x) -> torch.Tensor:
        x = plan.model.store(x)
        if store_dtype is None or store_dtype == x.dtype:
            return x
        kept = x.to(store_dtype)
        if not torch.isfinite(kept).all() and torch.isfinite(x).all():
            raise SamfitError(f"--cache-dtype: a stored value overflows {store_dtype} (largest magnitude "
                              f"{x.abs().max().item():.4g}); use --cache-dtype bf16 or fp32.")
        rounding.add(x, kept)
        return kept

    train, targets, compute_dtype = [], [], None
    for images, target, _ in DataLoader(train_set, batch_size=batch_size, num_workers=num_workers):
        views = [_encode(plan.encode, images, batch_size, device, autocast)]
        if flip:
            views.append(_encode(plan.encode, images.flip(-1), batch_size, device, autocast))
        compute_dtype = (views[0][0] if isinstance(views[0], tuple) else views[0]).dtype
        train.append(torch.stack([stored(v) for v in views], dim=1))
        targets.append(target)
    val, first_val = [], None
    for images, _, _ in DataLoader(val_set, batch_size=eval_batch_size, num_workers=num_workers):
        exact = _encode(plan.encode, images, len(images), device, autocast)
        val.append(stored(exact))
        if first_val is None:  # as stored, before rounding
            first_val = plan.model.store(exact)
    cache = EmbeddingCache(train=torch.cat(train), targets=_as_uint8(torch.cat(targets)), target_dtype=targets[0].dtype,
                           val=EmbeddingDataset(val_set, torch.cat(val), compute_dtype), model=plan.model,
                           build_time_s=0.0, kind=plan.kind, blocks=plan.blocks, compute_dtype=compute_dtype)
    if store_dtype is not None and store_dtype != compute_dtype:
        cache.precision = {**rounding.report(), **_logit_change(plan.model, first_val, store_dtype, device, autocast)}
    cache.build_time_s = time.perf_counter() - started
    return cache


@torch.no_grad()
def _logit_change(forward: nn.Module, exact: torch.Tensor, store_dtype, device, autocast) -> dict:
    """The rounding's effect on the first validation batch's logits (eval mode): largest change and the share of
    pixels whose mask (logit > 0) flips."""
    training = forward.training
    forward.eval()
    try:
        with autocast():
            a = forward(exact.to(device))["logits"].float()
            b = forward(exact.to(store_dtype).to(exact.dtype).to(device))["logits"].float()
    finally:
        forward.train(training)
    return {"logits_max_abs_change": (a - b).abs().max().item(),
            "mask_pixels_flipped": ((a > 0) != (b > 0)).double().mean().item()}


def prepare_cache(cfg, model, train_set, val_set, local_batch: int, device, autocast, log=print):
    """(EmbeddingCache or None, report for metrics.json) according to cfg.cache_embeddings (auto | on | off),
    cfg.cache_max_mb and cfg.cache_dtype."""
    if cfg.cache_embeddings == "off":
        return None, {"enabled": False, "reason": "--cache-embeddings off"}
    plan, reason = cache_plan(model, cfg.image_size)
    if plan is not None:
        need = cache_size_mb(len(train_set), len(val_set), cfg.image_size, cfg.flip, plan.item_mb)
        if need > cfg.cache_max_mb:
            reason = (f"the {plan.kind} cache would take {need:.0f} MB, over --cache-max-mb {cfg.cache_max_mb} "
                      f"({len(train_set)} training images at {cfg.image_size} px)")
    if reason is not None:
        if cfg.cache_embeddings == "on":
            raise SamfitError(f"--cache-embeddings on: cannot cache the image embeddings: {reason}. Use "
                              f"--cache-embeddings auto (caches only when it can) or raise --cache-max-mb.")
        return None, {"enabled": False, "reason": reason}
    cache = build_cache(model, train_set, val_set, local_batch, cfg.batch_size, cfg.flip, device, autocast,
                        cfg.num_workers, plan=plan, store_dtype=STORE_DTYPES[cfg.cache_dtype])
    what = "image embeddings" if plan.kind == "decoder-only" else f"outputs of encoder blocks 0-{plan.blocks - 1}"
    log(f"Cached the {what} of {len(train_set)} training images ({cache.train.shape[1]} views) and "
        f"{len(val_set)} validation images: {cache.size_mb:.0f} MB in {cache.build_time_s:.1f} s.")
    return cache, cache.report()
