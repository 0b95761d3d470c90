"""FacT-TT, Factor-Tuning in its tensor-train form (S. Jie, Z.-H. Deng, "FacT: Factor-Tuning for Lightweight
Adaptation on Vision Transformer", AAAI 2023, arXiv 2212.03145), on the attention of every encoder block, as
MA-SAM (C. Chen et al., arXiv 2309.08842) applies it to SAM.

The updates of all blocks' weights form one tensor, factorised with two factors shared by every block and a
small core per block and weight:

    ΔW_{i,p} = s · V C_{i,p} U,   U ∈ R^{r×d}, V ∈ R^{d×r} shared;   C_{i,p} ∈ R^{r×r} for block i and
    p ∈ {q, k, v, proj}

    qkv(x) = W_qkv x + b_qkv + s · [V C_q U x | V C_k U x | V C_v U x],   proj(x) = W_o x + b_o + s · V C_o U x

The cores start at zero (so the model is exactly SAM at step 0); U and V keep nn.Linear's kaiming-uniform
init, so the cores get a gradient from the first step. s = 1 by default (`scale`); FacT's dropout on the core
output is left out (samfit trains no method with dropout).
Count: 2·d·r (shared) + 4·r²·L (cores). The budget scales with d·L while the count does not, so no single rank
fits every backbone; the default `rank=0` takes, per backbone and placement, the rank whose count is closest to
LoRA r=3's 12·d·K over the K selected blocks: r = 35 / 46 / 53 on vit_b / vit_l / vit_h (101.8% / 100.8% /
100.8%). Mergeable: ΔW is linear, so it folds into W_qkv and W_o.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from samfit.methods.base import (Method, register_method, replace_modules, require_blocks, require_float,
                                 require_int)

FACTORS = "fact_factors"  # the shared U, V live in the image encoder under this name


class FacTFactors(nn.Module):
    """The shared factors: U = down.weight (r × d), V = up.weight (d × r)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)


class FacTLinear(nn.Module):
    """A frozen Linear whose output (`parts` chunks of width d) gets s·V C_p U x added to chunk p."""

    def __init__(self, base: nn.Linear, factors: FacTFactors, parts: int, scale: float):
        super().__init__()
        self.base = base
        self._factors = (factors,)  # a reference, not a submodule: the factors belong to the encoder
        self.scale = scale
        rank = factors.down.out_features
        self.cores = nn.Parameter(torch.zeros(parts, rank, rank, device=base.weight.device))  # C_p

    @property
    def factors(self) -> FacTFactors:
        return self._factors[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        z = f.down(x)  # U x: (..., r)
        update = f.up(torch.einsum("...r,psr->...ps", z, self.cores.to(z.dtype)))  # (..., parts, d)
        return self.base(x) + self.scale * update.flatten(-2)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """s · [V C_p U]_p stacked over the output chunks: (parts·d × d), in the base weight's dtype."""
        weight = self.base.weight
        u, v = self.factors.down.weight.to(weight), self.factors.up.weight.to(weight)
        return self.scale * torch.cat([v @ core.to(weight) @ u for core in self.cores])

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The equivalent plain Linear W + ΔW (SAM's bias), in the base's dtype and on its device."""
        weight = self.base.weight
        out = nn.utils.skip_init(nn.Linear, self.base.in_features, self.base.out_features,
                                 bias=self.base.bias is not None, dtype=weight.dtype, device=weight.device)
        out.weight.copy_(weight + self.delta())
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out.requires_grad_(weight.requires_grad)


def fact_count(dim: int, rank: int, blocks: int) -> int:
    return 2 * dim * rank + 4 * rank * rank * blocks


def budget_rank(dim: int, blocks: int) -> int:
    """The rank whose count 2·d·r + 4·r²·K is closest to LoRA r=3's 12·d·K (the smaller on a tie)."""
    target = 12 * dim * blocks
    return min(range(1, dim + 1), key=lambda r: (abs(fact_count(dim, r, blocks) - target), r))


@dataclass
class FacTConfig:
    rank: int = 0  # 0: per backbone, the rank closest to LoRA r=3's budget
    scale: float = 1.0  # s
    blocks: str = "all"  # placement: all | last:K | first:K | i,j,k

    def __post_init__(self):
        self.rank = require_int("fact", "rank", self.rank, minimum=0,
                                note=" (0: chosen per backbone within LoRA r=3's budget)")
        self.scale = require_float("fact", "scale", self.scale, low=0, include_low=False)
        self.blocks = require_blocks("fact", "blocks", self.blocks)


@register_method
class FacT(Method):
    name = "fact"
    requires = frozenset({"fused-qkv", "uniform-width"})
    summary = "FacT-TT: factors shared across blocks, a small core per block on qkv and proj"
    Config = FacTConfig
    identical_at_init = True
    mergeable = True

    def rank(self, dim: int, blocks: int) -> int:
        return self.config.rank or budget_rank(dim, blocks)

    def inject(self, model) -> None:
        encoder = model.image_encoder
        blocks = self.selected_blocks(model)
        dim = encoder.patch_embed.proj.out_channels
        factors = FacTFactors(dim, self.rank(dim, len(blocks)))
        setattr(encoder, FACTORS, factors)
        for block in blocks:
            block.attn.qkv = FacTLinear(block.attn.qkv, factors, 3, self.config.scale)
            block.attn.proj = FacTLinear(block.attn.proj, factors, 1, self.config.scale)

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every ΔW into SAM's Linears and drop the shared factors (in place); returns the model."""
        replace_modules(model, FacTLinear, lambda m: m.merged())
        for module in model.modules():
            if FACTORS in module._modules:
                delattr(module, FACTORS)
        return model
