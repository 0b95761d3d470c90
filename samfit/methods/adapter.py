"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv 1902.00751),
inserted serially after the attention and after the MLP of every encoder block.

    adapter(h) = h + W_up · GELU(W_down · h + b_down) + b_up,   W_down ∈ R^{m×d}, W_up ∈ R^{d×m}

applied to the sub-layer's output before SAM's residual add: x ← x + adapter(attn(norm1(x))), then
x ← x + adapter(mlp(norm2(x))). W_up and b_up are zero, so the model is exactly SAM at step 0; W_down and
b_down keep nn.Linear's default init (kaiming-uniform) so that W_up gets a gradient from the first step.

Size: 2·(2·d·m + m + d) per block. The default bottleneck m = 3 is fixed (not a function of d) because
the budget scales with d: 14·d + 6 per block = 116.7% of LoRA r=3's 12·d on vit_b, vit_l and vit_h
(129,096 / 344,208 / 573,632 encoder-side parameters); m = 2 would give 83.3%.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from samfit.methods.base import Method, register_method, require_blocks, require_int


class BottleneckAdapter(nn.Module):
    """h + up(GELU(down(h))) with a zero-initialised up-projection (the identity at init)."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class SerialAdapter(nn.Module):
    """Wrap a frozen sub-layer (attention or MLP) so that its output passes through an adapter."""

    def __init__(self, sublayer: nn.Module, dim: int, bottleneck: int):
        super().__init__()
        self.sublayer = sublayer
        self.adapter = BottleneckAdapter(dim, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.sublayer(x))


@dataclass
class AdapterConfig:
    bottleneck: int = 3
    blocks: str = "all"  # placement: all | last:K | first:K | i,j,k

    def __post_init__(self):
        self.bottleneck = require_int("adapter", "bottleneck", self.bottleneck, minimum=1, note=" (the adapter width)")
        self.blocks = require_blocks("adapter", "blocks", self.blocks)


@register_method
class Adapter(Method):
    name = "adapter"
    requires = frozenset({"mlp", "norms"})
    summary = "serial bottleneck adapters after the attention and the MLP of every block"
    Config = AdapterConfig
    identical_at_init = True

    def inject(self, model) -> None:
        m = self.config.bottleneck
        for block in self.selected_blocks(model):
            dim = block.norm2.normalized_shape[0]  # the attention's output width (Hiera: the block's dim_out)
            block.attn = SerialAdapter(block.attn, dim, m)
            block.mlp = SerialAdapter(block.mlp, dim, m)
