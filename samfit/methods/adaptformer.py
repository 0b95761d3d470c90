"""AdaptFormer (S. Chen, C. Ge, Z. Tong, J. Wang, Y. Song, J. Wang, P. Luo, "AdaptFormer: Adapting Vision
Transformers for Scalable Visual Recognition", NeurIPS 2022, arXiv 2205.13535; code ShoufaChen/AdaptFormer):
a bottleneck in parallel with the MLP of every encoder block, reading the MLP's normalised input.

    x ← x + MLP(LN(x)) + s · W_up ReLU(W_down LN(x) + b_down) + s · b_up,   W_down ∈ R^{m×d}, W_up ∈ R^{d×m}

with LN = the block's own norm2 and s = 0.1 (the paper's scale). W_up and b_up start at zero (so the model is
exactly SAM at step 0); W_down is kaiming-uniform (a = √5) and b_down zero, as the official `Adapter`.
Size: 2·d·m + m + d per block. The default width m = 6 is a constant because the budget scales with d:
13·d + 6 per block = 108.4% of LoRA r=3's 12·d on vit_b, vit_l and vit_h (m = 5 would give 91.7%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from samfit.methods.base import Method, register_method, require_blocks, require_float, require_int


class ParallelAdapter(nn.Module):
    """Wrap a block's frozen MLP: mlp(h) + s·up(ReLU(down(h))), h = the MLP's (normalised) input."""

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int, scale: float):
        super().__init__()
        self.mlp = mlp
        self.scale = scale
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h) + self.scale * self.up(torch.relu(self.down(h)))


@dataclass
class AdaptFormerConfig:
    bottleneck: int = 6
    scale: float = 0.1  # s, the weight of the adapter branch
    blocks: str = "all"  # placement: all | last:K | first:K | i,j,k

    def __post_init__(self):
        self.bottleneck = require_int("adaptformer", "bottleneck", self.bottleneck, minimum=1,
                                      note=" (the adapter width)")
        self.scale = require_float("adaptformer", "scale", self.scale, low=0, include_low=False)
        self.blocks = require_blocks("adaptformer", "blocks", self.blocks)


@register_method
class AdaptFormer(Method):
    name = "adaptformer"
    requires = frozenset({"mlp", "norms"})
    summary = "scaled bottleneck in parallel with the MLP of every block"
    Config = AdaptFormerConfig
    identical_at_init = True

    def inject(self, model) -> None:
        c = self.config
        for block in self.selected_blocks(model):
            block.mlp = ParallelAdapter(block.mlp, block.norm2.normalized_shape[0], c.bottleneck, c.scale)
