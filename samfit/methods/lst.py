"""Ladder Side-Tuning (Sung, Cho, Bansal, NeurIPS 2022, "LST: Ladder Side-Tuning for Parameter and Memory
Efficient Transfer Learning", arXiv 2206.06522; code ylsung/Ladder-Side-Tuning).

SAM's encoder runs entirely under torch.no_grad(): no autograd graph, no backward pass through it. A narrow
side network of width w reads the backbone's hidden states through a ladder of down-projections:

    s_{-1} = D_first(h_{-1})                                 h_{-1} = patch embedding + position embedding
    s_i    = SideBlock_i(μ_i · s_{i-1} + (1 − μ_i) · D_i(h_i))    h_i = output of SAM block i, D_i: Linear(d, w)
    μ_i    = sigmoid(α_i / T),  T = 0.1,  α_i = 0 (μ_i = 0.5)
    out    = Neck(h_{L-1}) + U(LayerNorm(s_{L-1}))             U: Linear(w, 256), zero-initialised

U = 0 makes the model exactly SAM at step 0. Backward stores only the side network's narrow activations and
the L + 1 backbone hidden states that the trainable D_i need for their weight gradients; none of the
backbone's internal activations (attention maps, the 4d-wide MLP hidden layer, ...) are kept.

Side blocks are light pre-norm ViT blocks of width w (attention + MLP of ratio 4), mirroring the backbone's
attention pattern (windowed where SAM's block is windowed, global where it is global) with PyTorch's
scaled_dot_product_attention and no relative-position tables: positional information reaches the side
network through every D_i(h_i), and the global blocks stay memory-efficient at 1024 px. A transformer (not
an MLP) side network keeps LST's design (the side network is a pruned copy of the backbone's architecture).

Size: (L + 1)·(d·w + w) + L·(12·w² + 13·w + 1) + 2·w + 256·w + 256. The ladder's down-projections
dominate (≈ d·w per block), so the budget fixes the width w rather than the reduction factor r = d / w: the
LST paper's r = 8 would give 21-34x LoRA r=3's 12·d·L. The default w = 8 (r = 96, 128, 160 on vit_b/l/h; one
head of dimension 8, a multiple of 8 as fused half-precision attention kernels require) gives
92,772 / 228,272 / 368,440 = 83.9% / 77.4% / 75.0% of 12·d·L. `reduction=r` sets w = d / r instead.

Deviation: LST initialises its side network from the backbone's weights, structurally pruned by Fisher
information (which needs task data); here the side blocks are initialised as a ViT (truncated normal,
std 0.02) and the down-projections as nn.Linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import nn

from samfit.errors import SamfitError
from samfit.methods.base import Method, register_method, require_float, require_int
from samfit.model.sam import PROMPT_DIM


class SideBlock(nn.Module):
    """Pre-norm ViT block (windowed or global attention, MLP ratio 4) without relative positions."""

    def __init__(self, dim: int, heads: int, window_size: int):
        super().__init__()
        self.heads = heads
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, 4 * dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, c / heads)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window_size > 0:
            size = h.shape[1:3]
            windows, padded = window_partition(h, self.window_size)
            h = window_unpartition(self.attention(windows), self.window_size, padded, size)
        else:
            h = self.attention(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class LSTEncoder(nn.Module):
    """SAM's frozen ImageEncoderViT, run without gradients, plus a trainable ladder side network."""

    def __init__(self, backbone: nn.Module, width: int, heads: int, temperature: float):
        super().__init__()
        self.backbone = backbone
        self.temperature = temperature
        dim = backbone.patch_embed.proj.out_channels
        depth = len(backbone.blocks)
        self.side_first_downsample = nn.Linear(dim, width)
        self.side_downsamples = nn.ModuleList(nn.Linear(dim, width) for _ in range(depth))
        self.side_gates = nn.Parameter(torch.zeros(depth))  # α_i
        self.side_blocks = nn.ModuleList(SideBlock(width, heads, block.window_size) for block in backbone.blocks)
        for block in self.side_blocks:
            block.apply(self._init_vit)
        self.side_norm = nn.LayerNorm(width, eps=1e-6)
        self.side_upsample = nn.Linear(width, PROMPT_DIM)
        nn.init.zeros_(self.side_upsample.weight)
        nn.init.zeros_(self.side_upsample.bias)

    @staticmethod
    def _init_vit(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def gates(self) -> torch.Tensor:
        """μ_i = sigmoid(α_i / T), the weight of the side path against the new backbone state."""
        return torch.sigmoid(self.side_gates / self.temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        sam = self.backbone
        with torch.no_grad():
            x = sam.patch_embed(images)
            if sam.pos_embed is not None:
                x = x + sam.pos_embed
        side = self.side_first_downsample(x)
        mu = self.gates()
        for i, block in enumerate(sam.blocks):
            with torch.no_grad():
                x = block(x)
            side = mu[i] * side + (1 - mu[i]) * self.side_downsamples[i](x)
            side = self.side_blocks[i](side)
        with torch.no_grad():
            embedding = sam.neck(x.permute(0, 3, 1, 2))
        return embedding + self.side_upsample(self.side_norm(side)).permute(0, 3, 1, 2)


@dataclass
class LSTConfig:
    side_dim: int = 8
    reduction: int = 0  # > 0: side width d / reduction (the LST paper's r), overriding side_dim
    heads: int = 1
    gate_temperature: float = 0.1

    def __post_init__(self):
        self.side_dim = require_int("lst", "side_dim", self.side_dim, minimum=1, note=" (the side network width)")
        self.reduction = require_int("lst", "reduction", self.reduction, minimum=0,
                                     note=" (0: the width is side_dim; r > 0: it is d / r)")
        self.heads = require_int("lst", "heads", self.heads, minimum=1)
        self.gate_temperature = require_float("lst", "gate_temperature", self.gate_temperature, low=0,
                                              include_low=False)
        if not self.reduction and self.side_dim % self.heads:
            divisors = ", ".join(str(h) for h in range(1, self.side_dim + 1) if self.side_dim % h == 0)
            raise SamfitError(f"--method-arg heads={self.heads} for method 'lst': the side width side_dim="
                              f"{self.side_dim} must be divisible by heads; pick heads from {divisors}.")


@register_method
class LST(Method):
    name = "lst"
    requires = frozenset({"vit-stem", "window-attention"})
    summary = "ladder side network beside a gradient-free backbone (no backward through SAM)"
    Config = LSTConfig
    identical_at_init = True

    def side_width(self, dim: int) -> int:
        cfg = self.config
        width = dim // cfg.reduction if cfg.reduction else cfg.side_dim
        if width < 1 or width % cfg.heads:
            given = f"reduction={cfg.reduction}" if cfg.reduction else f"side_dim={cfg.side_dim}"
            raise SamfitError(f"--method-arg {given} for method 'lst': the side width {width} (encoder width {dim}) "
                              f"must be at least 1 and divisible by heads={cfg.heads}.")
        return width

    def inject(self, model) -> None:
        dim = model.image_encoder.patch_embed.proj.out_channels
        model.image_encoder = LSTEncoder(model.image_encoder, self.side_width(dim), self.config.heads,
                                         self.config.gate_temperature)
