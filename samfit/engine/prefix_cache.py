"""Prefix cache for late placement: when every trainable part of the image encoder sits in blocks >= k, the
encoder's first part

    h_k = blocks[k-1] ∘ … ∘ blocks[0] (patch_embed(x) + pos_embed)

is the same function of the image in every epoch, so it is computed once per image and view (flipped or not),
kept, and training runs only the rest, neck(blocks[L-1] ∘ … ∘ blocks[k](h_k)), and the decoder.

Eligibility is read off the model, never from the method's name (`prefix_plan`):
- the image encoder is SAM's ImageEncoderViT with its own forward (no hook, no patched forward), so the split
  above is exactly what its forward computes;
- every trainable parameter is in the mask decoder, in a block of the encoder, or in its neck (after the
  blocks); k is the first block holding one, and k >= 1;
- the prefix (patch embedding and blocks < k) holds only SAM's and torch's modules, without hooks or patched
  forwards (activation checkpointing excepted: it computes the same thing), and nothing random in training mode
  (no dropout with p > 0, no batch statistics).

The stored tensor per image and view is h_k (in its own memory layout: a contiguous copy in another layout
would change the rounding of the layers after it), (S/16, S/16, d) (d = 768 on ViT-B: 0.75 MB at 256 px in fp32).
Storing it in bf16/fp16 (`--cache-dtype`) halves that and rounds it; the rounding is measured when the cache is
built and reported (engine/cache.py).

SAM 2's Hiera (HieraEncoder) is multi-scale: its FPN neck reads the output of every stage end, so the stored
prefix is the tuple (h_k, outputs of the stage ends e < k-1): those the neck will read that h_k is not itself
(when block k-1 ends a stage, its output is h_k, stored once). Training runs blocks >= k, collects the stage
outputs still to come, then the neck and the decoder, as HieraEncoder.forward does. Each part keeps its own
memory layout (StoredInput's tuple form).
"""
from __future__ import annotations

import math
import re

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn

from samfit.model.checkpointing import is_checkpointed
from samfit.model.sam import PATCH
from samfit.model.sam2 import HieraEncoder

SAM_MODULE_PREFIXES = ("segment_anything.", "sam2.modeling.", "torch.nn.", "samfit.model.")
BLOCK_PARAMETER = re.compile(r"image_encoder\.blocks\.(\d+)\.")
AFTER_BLOCKS = ("mask_decoder.", "image_encoder.neck.", "image_encoder.no_mem_embed")  # no_mem_embed: SAM 2's


def module_problem(module: nn.Module, where: str) -> str | None:
    """Why `module` may not compute plain SAM's function (None when it does)."""
    if not type(module).__module__.startswith(SAM_MODULE_PREFIXES):
        return f"{where} is a {type(module).__name__}, not one of SAM's modules"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{where} has forward hooks"
    if "forward" in module.__dict__ and not is_checkpointed(module):
        return f"{where} has a patched forward"
    dropout = isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
    dropout = dropout or getattr(module, "drop_prob", 0) > 0  # sam2's DropPath (stochastic depth)
    if dropout or isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{where} is a {type(module).__name__}, random or batch-dependent in training mode"
    return None


def first_trainable_block(model: nn.Module) -> tuple[int | None, str | None]:
    """(k, None) with k the first encoder block holding a trainable parameter, or (None, why there is none)."""
    blocks = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(AFTER_BLOCKS):
            continue
        match = BLOCK_PARAMETER.match(name)
        if match is None:
            return None, f"{name} trains before the first block or outside the encoder's blocks"
        blocks.add(int(match[1]))
    if not blocks:
        return None, "no parameter of the encoder's blocks trains"
    return min(blocks), None


def prefix_depth(model: nn.Module) -> tuple[int | None, str | None]:
    """(k, None) when patch embedding + blocks < k can be cached (k >= 1), else (None, why not)."""
    encoder = model.image_encoder
    if type(encoder) not in (ImageEncoderViT, HieraEncoder):
        return None, f"the image encoder is a {type(encoder).__name__}, not SAM's ImageEncoderViT or SAM 2's Hiera"
    problem = module_problem(encoder, "image_encoder")
    if problem:
        return None, problem
    k, reason = first_trainable_block(model)
    if reason:
        return None, reason
    if k == 0:
        return None, "block 0 trains"
    for part, module in [("patch_embed", encoder.patch_embed)] + [(f"blocks.{i}", encoder.blocks[i])
                                                                   for i in range(k)]:
        for name, sub in module.named_modules():
            problem = module_problem(sub, f"image_encoder.{part}" + (f".{name}" if name else ""))
            if problem:
                return None, problem
    return k, None


class EncoderPrefix(nn.Module):
    """What the encoder's forward computes on the way to block k: ViT h_k = blocks[:k](patch_embed(x) + pos_embed);
    Hiera the tuple (h_k, outputs of the stage ends before block k-1), its position embedding added as its own."""

    def __init__(self, encoder: nn.Module, k: int):
        super().__init__()
        self.encoder, self.k = encoder, k

    def forward(self, images: torch.Tensor):
        e = self.encoder
        x = e.patch_embed(images)
        hiera = isinstance(e, HieraEncoder)
        if hiera:
            x = x + e.position_embedding(*x.shape[1:3])
        elif e.pos_embed is not None:
            x = x + e.pos_embed
        stages = []
        for i, block in enumerate(e.blocks[:self.k]):
            x = block(x)
            if hiera and i in e.stage_ends and i < self.k - 1:
                stages.append(x)
        return (x, *stages) if hiera else x


def prefix_item_mb(encoder: nn.Module, k: int, image_size: int) -> float:
    """fp32 MB of one image's stored prefix, from the blocks' widths and strides (no forward run)."""
    if not isinstance(encoder, HieraEncoder):
        return encoder.patch_embed.proj.out_channels * (image_size // PATCH) ** 2 * 4 / 2**20
    grid, kept = image_size // encoder.patch_embed.proj.stride[0], 0
    for i, block in enumerate(encoder.blocks[:k]):
        if block.q_stride:
            grid //= block.q_stride[0]
        if i == k - 1 or i in encoder.stage_ends:
            kept += block.dim_out * grid * grid
    return kept * 4 / 2**20


def memory_order(x: torch.Tensor) -> list[int]:
    """x's dimensions from outermost to innermost in memory, the batch first: x.permute(order) is contiguous when
    x is a permutation of a contiguous tensor (SAM's h_k is: patch_embed permutes a channels-first convolution)."""
    return [0] + sorted(range(1, x.dim()), key=lambda d: (-x.stride(d), d))


class StoredInput(nn.Module):
    """A module fed with tensors stored as x.permute(order).contiguous(): `restore` gives back x's shape and its
    memory layout (strides), so the layers after the cache run the same kernels as on the live tensor. A tuple of
    tensors (SAM 2's embedding and high-resolution features) is stored as one (N, Σ numel) row per image, each
    part in its own memory order, and restored to the tuple with each part's layout."""

    order: list[int] | None = None
    parts: list[tuple[list[int], tuple[int, ...]]] | None = None  # per part: memory order, permuted shape

    def store(self, x) -> torch.Tensor:
        """What the cache keeps of the live `x` (a tensor or a tuple of tensors with one batch dimension)."""
        if isinstance(x, tuple):
            if self.parts is None:
                self.parts = [(memory_order(t), tuple(t.permute(memory_order(t)).shape[1:])) for t in x]
            return torch.cat([t.permute(order).reshape(len(t), -1) for t, (order, _) in zip(x, self.parts)], dim=1)
        if self.order is None:
            self.order = memory_order(x)
        return x.permute(self.order).contiguous()

    def restore(self, stored: torch.Tensor):
        if self.parts is not None:
            out, start = [], 0
            for order, shape in self.parts:
                size = math.prod(shape)  # compact copy first: the part's batch stride is then its own, as live
                part = stored[:, start:start + size].contiguous().view(len(stored), *shape)
                out.append(part.permute([order.index(d) for d in range(part.dim())]))
                start += size
            return tuple(out)
        if self.order is None:
            return stored
        return stored.permute([self.order.index(d) for d in range(stored.dim())])


class PrefixCachedSegmenter(StoredInput):
    """The Segmenter fed with stored prefixes: blocks >= k, the neck (Hiera: with the stored stage outputs), the
    decoder and the auxiliary losses."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, k

    def encode_rest(self, x):
        e = self.model.image_encoder
        if not isinstance(e, HieraEncoder):
            for block in e.blocks[self.k:]:
                x = block(x)
            return e.neck(x.permute(0, 3, 1, 2))
        x, *stages = x  # the stage outputs before block k-1, then those from block k-1 on
        stages = [t.permute(0, 3, 1, 2) for t in stages]
        if self.k - 1 in e.stage_ends:
            stages.append(x.permute(0, 3, 1, 2))
        for i in range(self.k, len(e.blocks)):
            x = e.blocks[i](x)
            if i in e.stage_ends:
                stages.append(x.permute(0, 3, 1, 2))
        features, _ = e.neck(stages)  # the rest of HieraEncoder.forward
        s4, s8, s16 = features[:-1]
        return s16 + e.no_mem_embed.reshape(1, -1, 1, 1), s4, s8

    def forward(self, prefixes: torch.Tensor) -> dict:
        out = self.model.decode(self.encode_rest(self.restore(prefixes)))
        out["aux_loss"] = self.model.collect_aux_loss(prefixes)
        return out
