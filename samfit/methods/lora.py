"""LoRA (Hu et al. 2021, arXiv 2106.09685) on the fused qkv projection of every encoder block.

    y = W x + b + (alpha / r) · B A x,   A ∈ R^{r×d} (kaiming-uniform), B ∈ R^{3d×r} (zero)

B = 0 makes the model exactly SAM at step 0. Encoder-side parameters: r·d + 3d·r = 12·d per block at r=3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from samfit.methods.base import (Method, register_method, replace_modules, require_blocks, require_float,
                                 require_int)


def add_low_rank_factors(module: nn.Module, base: nn.Linear, rank: int, alpha: float) -> None:
    """Give `module` the frozen `base` and LoRA's factors: A (r×d_in, kaiming-uniform), B (d_out×r, zero)."""
    module.base = base
    module.rank = rank
    module.scaling = alpha / rank
    module.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
    module.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
    nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """Wrap a frozen nn.Linear with a trainable low-rank update (loralib's LoRALinear, as a wrapper)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        add_low_rank_factors(self, base, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The equivalent plain Linear: W + (alpha/r)·B A, in the base's dtype and on its device."""
        weight = self.base.weight
        out = nn.utils.skip_init(nn.Linear, self.base.in_features, self.base.out_features,  # no random init
                                 bias=self.base.bias is not None, dtype=weight.dtype, device=weight.device)
        out.weight.copy_(weight + self.scaling * self.lora_B.to(weight) @ self.lora_A.to(weight))
        out.requires_grad_(weight.requires_grad)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


@dataclass
class LoRAConfig:
    rank: int = 3
    alpha: float = 32.0  # the update is scaled by alpha / rank
    blocks: str = "all"  # placement: all | last:K | first:K | i,j,k

    def __post_init__(self):
        self.rank = require_int("lora", "rank", self.rank, minimum=1)
        self.alpha = require_float("lora", "alpha", self.alpha, low=0, include_low=False)
        self.blocks = require_blocks("lora", "blocks", self.blocks)


@register_method
class LoRA(Method):
    name = "lora"
    requires = frozenset({"fused-qkv"})
    summary = "low-rank update on the fused qkv of every block"
    Config = LoRAConfig
    identical_at_init = True
    mergeable = True

    def inject(self, model) -> None:
        for block in self.selected_blocks(model):
            block.attn.qkv = LoRALinear(block.attn.qkv, self.config.rank, self.config.alpha)

    def merge(self, model: nn.Module) -> nn.Module:
        """Replace every LoRALinear by the plain Linear W + (alpha/r)·B A (in place); returns the model."""
        return replace_modules(model, LoRALinear, lambda m: m.merged())
