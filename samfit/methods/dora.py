"""DoRA, Weight-Decomposed Low-Rank Adaptation (S.-Y. Liu, C.-Y. Wang, H. Yin, P. Molchanov, Y.-C. F. Wang,
K.-T. Cheng, M.-H. Chen, ICML 2024, arXiv 2402.09353), on the fused qkv projection of every encoder block.

    W' = m ⊙ (W0 + (α/r)·B A) / ‖W0 + (α/r)·B A‖,   y = W' x + b

with the norm taken per output feature (over each row of the (3d × d) weight, as HF PEFT's `DoraLinearLayer`
does), A ∈ R^{r×d} kaiming-uniform and B ∈ R^{3d×r} zero (LoRA's init), and the magnitude m ∈ R^{3d}
initialised to ‖W0‖ row-wise, so W' = W0 and the model is exactly SAM at step 0. The bias is not rescaled.
m is stored as m = ‖W0‖ + Δm with Δm ∈ R^{3d} trainable and zero at init (‖W0‖ recomputed from the frozen W0
in the model's dtype): the same function and the same gradient as storing m itself, but exact identity at init
in any dtype; the one difference is AdamW's weight decay, which pulls m towards ‖W0‖ rather than towards 0.
As in the paper (Sec. 4.3) and HF PEFT, the norm is treated as a constant in the backward pass (detached): the
forward value is the equation above; gradients reach m, A and B through the numerator.
Computed without forming W' for the activations: y = (m / ‖W0 + (α/r)·B A‖) ⊙ (W0 x + (α/r)·B A x) + b.
Defaults r = 3, α = 32 as LoRA. Count: LoRA's 4·r·d plus m's 3·d = 15·d per block at r = 3, 15·d·L in all.
Mergeable: `merged()` gives the plain Linear with weight W' and SAM's bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from samfit.methods.base import (Method, register_method, replace_modules, require_blocks, require_float,
                                 require_int)
from samfit.methods.lora import add_low_rank_factors


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per output feature (the L2 norm of each row of an (out × in) weight)."""
    return torch.linalg.vector_norm(weight, dim=1)


class DoRALinear(nn.Module):
    """Wrap a frozen nn.Linear with DoRA's magnitude vector and low-rank direction update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        add_low_rank_factors(self, base, rank, alpha)
        self.magnitude_offset = nn.Parameter(torch.zeros(base.out_features, device=base.weight.device))  # Δm

    def magnitude(self) -> torch.Tensor:
        """m = ‖W0‖ + Δm per output feature."""
        with torch.no_grad():
            norm = row_norm(self.base.weight)
        return norm.to(self.magnitude_offset.dtype) + self.magnitude_offset

    def delta(self) -> torch.Tensor:
        """(α/r)·B A, in the base weight's dtype."""
        weight = self.base.weight
        return self.scaling * (self.lora_B.to(weight) @ self.lora_A.to(weight))

    def column_scale(self) -> torch.Tensor:
        """m / ‖W0 + (α/r)·B A‖ per output feature, the norm detached."""
        with torch.no_grad():
            norm = row_norm(self.base.weight + self.delta())
        magnitude = self.magnitude()
        return magnitude / norm.to(magnitude.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        direction = x @ self.base.weight.T + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)
        out = self.column_scale() * direction
        return out if self.base.bias is None else out + self.base.bias

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The equivalent plain Linear: weight m ⊙ (W0 + (α/r)·B A) / ‖·‖, SAM's bias; in the base's dtype and
        on its device."""
        weight = self.base.weight
        updated = weight + self.delta()
        out = nn.utils.skip_init(nn.Linear, self.base.in_features, self.base.out_features,
                                 bias=self.base.bias is not None, dtype=weight.dtype, device=weight.device)
        out.weight.copy_((self.magnitude().to(weight) / row_norm(updated))[:, None] * updated)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out.requires_grad_(weight.requires_grad)


@dataclass
class DoRAConfig:
    rank: int = 3
    alpha: float = 32.0  # the update is scaled by alpha / rank
    blocks: str = "all"  # placement: all | last:K | first:K | i,j,k

    def __post_init__(self):
        self.rank = require_int("dora", "rank", self.rank, minimum=1)
        self.alpha = require_float("dora", "alpha", self.alpha, low=0, include_low=False)
        self.blocks = require_blocks("dora", "blocks", self.blocks)


@register_method
class DoRA(Method):
    name = "dora"
    requires = frozenset({"fused-qkv"})
    summary = "weight-decomposed low-rank update (magnitude + direction) on the fused qkv of every block"
    Config = DoRAConfig
    identical_at_init = True
    mergeable = True

    def inject(self, model) -> None:
        for block in self.selected_blocks(model):
            block.attn.qkv = DoRALinear(block.attn.qkv, self.config.rank, self.config.alpha)

    def merge(self, model: nn.Module) -> nn.Module:
        """Replace every DoRALinear by its plain Linear (in place); returns the model."""
        return replace_modules(model, DoRALinear, lambda m: m.merged())
