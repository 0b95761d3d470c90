"""Decoder-only embedding cache: when SAM's image encoder is frozen and untouched, its output for an image
never changes, so each training image is encoded once (and once more flipped when flipping is on) and the
decoder trains from the stored embeddings; the validation split used for model selection is encoded once too.

Eligibility is read off the model, without naming a method: no trainable parameter outside the mask
decoder, and an image encoder made only of SAM's and torch's own modules (no method layer, wrapper, hook or
patched forward other than activation checkpointing, which computes the same thing).

Exactness: the engine draws each image's flip from the seeded (seed, epoch, batch) generator
(`sampling.flip_choices`), so a cached batch holds exactly the embeddings the encoder would have produced for the
flipped or unflipped image. The encoder is run on batches of the training micro-batch size (the last batch
padded to that size) and, for validation, in the evaluation's own batches, because a CPU GEMM's rounding can
depend on the number of rows. With one image per batch the scores of a cached run are those of the uncached
run bitwise on any CPU (tested); with more, an image's embedding can still depend on its row in the batch on
some CPUs (MKL's AVX2 kernels: up to ~4e-6 at 64 px), so the two runs agree up to that rounding.

Bounded: the embeddings (256 × S/16 × S/16 per image and view, fp32 upper bound) plus the targets (uint8)
must fit under `cache_max_mb`; otherwise `cache_embeddings=auto` trains uncached and says why, and `on`
stops with an error. The cache lives in host RAM (the device gets one batch at a time).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn
from torch.utils.data import DataLoader, Dataset

from samfit.errors import SamfitError
from samfit.model.checkpointing import is_checkpointed
from samfit.model.sam import PATCH, PROMPT_DIM

SAM_MODULE_PREFIXES = ("segment_anything.", "torch.nn.", "samfit.model.")


def uncacheable_reason(model: nn.Module) -> str | None:
    """None when the image encoder is frozen plain SAM; otherwise why its embeddings cannot be cached."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("mask_decoder.")]
    if trainable:
        return f"{len(trainable)} trainable parameters outside the mask decoder (e.g. {trainable[0]})"
    encoder = model.image_encoder
    if not isinstance(encoder, ImageEncoderViT):
        return f"the image encoder is a {type(encoder).__name__}, not SAM's ImageEncoderViT"
    for name, module in encoder.named_modules():
        where = f"image_encoder.{name}" if name else "image_encoder"
        if not type(module).__module__.startswith(SAM_MODULE_PREFIXES):
            return f"{where} is a {type(module).__name__}, not one of SAM's modules"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{where} has forward hooks"
        if "forward" in module.__dict__ and not is_checkpointed(module):
            return f"{where} has a patched forward"
    return None


def cache_size_mb(n_train: int, n_val: int, image_size: int, flip: bool) -> float:
    """Embeddings (fp32 upper bound) of every training image and view and every validation image, plus the
    training targets as uint8."""
    grid = image_size // PATCH
    embedding = PROMPT_DIM * grid * grid * 4
    views = 2 if flip else 1
    return (n_train * views * embedding + n_val * embedding + n_train * image_size * image_size) / 2**20


class CachedEncoderSegmenter(nn.Module):
    """The Segmenter fed with stored embeddings: forward(embeddings) = decode + auxiliary losses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor) -> dict:
        out = self.model.decode(embeddings)
        out["aux_loss"] = self.model.collect_aux_loss(embeddings)
        return out


class EmbeddingDataset(Dataset):
    """A split's stored embeddings in place of its images: items (embedding, 0, index); `gt` as the split's."""

    def __init__(self, dataset, embeddings: torch.Tensor):
        self.dataset, self.embeddings = dataset, embeddings

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, index: int):
        return self.embeddings[index], 0, index

    def gt(self, index: int):
        return self.dataset.gt(index)


@dataclass
class EmbeddingCache:
    train: torch.Tensor  # (N, views, 256, g, g): view 0 as read, view 1 flipped
    targets: torch.Tensor  # (N, ...) uint8
    target_dtype: torch.dtype
    val: EmbeddingDataset
    model: CachedEncoderSegmenter
    build_time_s: float

    @property
    def size_mb(self) -> float:
        tensors = (self.train, self.targets, self.val.embeddings)
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    def report(self) -> dict:
        return {"enabled": True, "size_mb": round(self.size_mb, 1), "train_images": len(self.train),
                "views": self.train.shape[1], "val_images": len(self.val), "dtype": str(self.train.dtype),
                "build_time_s": round(self.build_time_s, 3)}

    def batches(self, indices: list[int], batch_size: int, flips):
        """(embeddings, targets, indices) for consecutive batches of `indices`; `flips(i, n)` gives the
        (n,) bool flip choices of batch i (None: no flipping)."""
        for i, start in enumerate(range(0, len(indices) - batch_size + 1, batch_size)):
            idx = torch.tensor(indices[start:start + batch_size])
            flip = flips(i, len(idx)) if flips is not None else torch.zeros(len(idx), dtype=torch.bool)
            embeddings = self.train[idx, flip.long()]
            targets = self.targets[idx].to(self.target_dtype)
            targets[flip] = targets[flip].flip(-1)
            yield embeddings, targets, idx


def _as_uint8(targets: torch.Tensor) -> torch.Tensor:
    stored = targets.to(torch.uint8)
    if not torch.equal(stored.to(targets.dtype), targets):
        raise SamfitError("Embedding cache: targets are not whole numbers in 0..255; use --cache-embeddings off.")
    return stored


@torch.no_grad()
def _encode(model, images: torch.Tensor, batch_size: int, device, autocast) -> torch.Tensor:
    """Encode `images` in batches of exactly `batch_size` (the last one padded with repeats)."""
    n = images.shape[0]
    if n < batch_size:
        images = torch.cat([images, images[torch.arange(batch_size - n) % n]])
    with autocast():
        return model.encode(images.to(device, non_blocking=True))[:n].cpu()


def build_cache(model, train_set, val_set, batch_size: int, eval_batch_size: int, flip: bool, device, autocast,
                num_workers: int = 0) -> EmbeddingCache:
    """Encode the training split (both views when flipping) and the validation split once."""
    started = time.perf_counter()
    train, targets = [], []
    for images, target, _ in DataLoader(train_set, batch_size=batch_size, num_workers=num_workers):
        views = [_encode(model, images, batch_size, device, autocast)]
        if flip:
            views.append(_encode(model, images.flip(-1), batch_size, device, autocast))
        train.append(torch.stack(views, dim=1))
        targets.append(target)
    target_dtype = targets[0].dtype
    val = [_encode(model, images, len(images), device, autocast)
           for images, _, _ in DataLoader(val_set, batch_size=eval_batch_size, num_workers=num_workers)]
    return EmbeddingCache(train=torch.cat(train), targets=_as_uint8(torch.cat(targets)), target_dtype=target_dtype,
                          val=EmbeddingDataset(val_set, torch.cat(val)), model=CachedEncoderSegmenter(model),
                          build_time_s=time.perf_counter() - started)


def prepare_cache(cfg, model, train_set, val_set, local_batch: int, device, autocast, log=print):
    """(EmbeddingCache or None, report for metrics.json) according to cfg.cache_embeddings (auto | on | off)
    and cfg.cache_max_mb."""
    if cfg.cache_embeddings == "off":
        return None, {"enabled": False, "reason": "--cache-embeddings off"}
    reason = uncacheable_reason(model)
    if reason is None:
        need = cache_size_mb(len(train_set), len(val_set), cfg.image_size, cfg.flip)
        if need > cfg.cache_max_mb:
            reason = (f"the cache would take {need:.0f} MB, over --cache-max-mb {cfg.cache_max_mb} "
                      f"({len(train_set)} training images at {cfg.image_size} px)")
    if reason is not None:
        if cfg.cache_embeddings == "on":
            raise SamfitError(f"--cache-embeddings on: cannot cache the image embeddings: {reason}. Use "
                              f"--cache-embeddings auto (caches only when it can) or raise --cache-max-mb.")
        return None, {"enabled": False, "reason": reason}
    cache = build_cache(model, train_set, val_set, local_batch, cfg.batch_size, cfg.flip, device, autocast,
                        cfg.num_workers)
    log(f"Cached {len(train_set)} training images ({cache.train.shape[1]} views) and {len(val_set)} validation "
        f"images: {cache.size_mb:.0f} MB in {cache.build_time_s:.1f} s.")
    return cache, cache.report()
