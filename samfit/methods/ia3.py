"""(IA)³, Infused Adapter by Inhibiting and Amplifying Inner Activations (H. Liu et al., "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022, arXiv
2205.05638), on SAM's image encoder: learned per-channel scales of the keys, the values and the MLP's hidden
activation of every block.

    k = l_k ⊙ (W_k x + b_k),   v = l_v ⊙ (W_v x + b_v),   MLP(x) = W_2 (l_ff ⊙ GELU(W_1 x + b_1)) + b_2

on the fused qkv (its k and v thirds; q is untouched) and on the input of `mlp.lin2`, as HF PEFT's IA3 does for
feed-forward layers. l_k, l_v ∈ R^d and l_ff ∈ R^{4d} start at one, so the model is exactly SAM at step 0.
Count: 2·d + 4·d = 6·d per block, 6·d·L in all (no size knob: outside the ±35% budget by nature).
Mergeable: l_k, l_v scale the k and v rows of W_qkv and b_qkv; l_ff scales the columns of W_2.
"""
from __future__ import annotations

import torch
from torch import nn

from samfit.methods.base import Method, placement_config, register_method, replace_modules


def _plain_copy(base: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain Linear with the given weight and bias, in the base's dtype and device and its frozen state."""
    out = nn.utils.skip_init(nn.Linear, base.in_features, base.out_features, bias=bias is not None,
                             dtype=base.weight.dtype, device=base.weight.device)
    out.weight.copy_(weight)
    if bias is not None:
        out.bias.copy_(bias)
    return out.requires_grad_(base.weight.requires_grad)


class KeyValueScale(nn.Module):
    """Wrap the fused qkv Linear (output [q | k | v], d each): q unchanged, k ⊙ l_k, v ⊙ l_v."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        dim = base.out_features // 3
        self.scale_k = nn.Parameter(torch.ones(dim, dtype=base.weight.dtype, device=base.weight.device))
        self.scale_v = nn.Parameter(torch.ones(dim, dtype=base.weight.dtype, device=base.weight.device))

    def scales(self) -> torch.Tensor:
        return torch.cat([torch.ones_like(self.scale_k), self.scale_k, self.scale_v])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.scales()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        s = self.scales().to(self.base.weight)
        bias = None if self.base.bias is None else self.base.bias * s
        return _plain_copy(self.base, self.base.weight * s[:, None], bias)


class InputScale(nn.Module):
    """Wrap a Linear so that its input is scaled per channel first: base(l ⊙ x)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.ones(base.in_features, dtype=base.weight.dtype, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x * self.scale)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        return _plain_copy(self.base, self.base.weight * self.scale.to(self.base.weight), self.base.bias)


@register_method
class IA3(Method):
    name = "ia3"
    requires = frozenset({"fused-qkv", "mlp"})
    summary = "learned scales on keys, values and the MLP hidden activation (ones at init)"
    Config = placement_config("ia3")
    identical_at_init = True
    mergeable = True

    def inject(self, model) -> None:
        for block in self.selected_blocks(model):
            block.attn.qkv = KeyValueScale(block.attn.qkv)
            block.mlp.lin2 = InputScale(block.mlp.lin2)

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold l_k, l_v into the qkv rows and l_ff into lin2's columns: plain SAM Linears, same outputs."""
        replace_modules(model, KeyValueScale, lambda m: m.merged())
        return replace_modules(model, InputScale, lambda m: m.merged())
