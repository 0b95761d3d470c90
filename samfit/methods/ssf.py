"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022, arXiv 2210.08823; code dongzelian/SSF).

A per-channel affine map after each operation of the frozen encoder, on the channel (last) axis:

    y = γ ⊙ f(x) + β,   f ∈ {attn.qkv, attn.proj, mlp.lin1, mlp.lin2, norm1, norm2} of every block, and the patch
    embedding (before the absolute position embedding is added)

γ ~ N(1, 0.02), β ~ N(0, 0.02) as the official `init_ssf_scale_shift` (so not exactly SAM at step 0).
Parameters: 2·(3d + d + 4d + d + d + d) = 22·d per block, plus 2·d for the patch embedding: 22·d·L + 2·d.
Mergeable: f is affine in its own weights (Linear W x + b, LayerNorm w ⊙ x̂ + b, the patch conv), so
γ ⊙ (W x + b) + β = (diag(γ) W) x + (γ ⊙ b + β): scale the output rows of W and set b ← γ ⊙ b + β
(`merge_scale_shift` does it and gives back plain SAM modules).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from samfit.methods.base import Method, placement_config, register_method


class ScaleShift(nn.Module):
    """Wrap a frozen module whose output has `dim` channels last: base(x) * scale + shift."""

    def __init__(self, base: nn.Module, dim: int):
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.scale + self.shift

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A copy of the wrapped module with γ and β folded into its weight and bias."""
        module = copy.deepcopy(self.base)
        affine = getattr(module, "proj", module)  # a patch embedding (SAM's or Hiera's): its conv; else the module
        rows = (-1,) + (1,) * (affine.weight.dim() - 1)
        affine.weight.mul_(self.scale.view(rows))
        if affine.bias is None:
            affine.bias = nn.Parameter(self.shift.detach().clone(), requires_grad=False)
        else:
            affine.bias.mul_(self.scale).add_(self.shift)
        return module


def merge_scale_shift(model: nn.Module) -> nn.Module:
    """Replace every ScaleShift in `model` by its merged plain module (in place); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ScaleShift):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model


@register_method
class SSF(Method):
    name = "ssf"
    requires = frozenset({"fused-qkv", "mlp", "norms"})
    summary = "per-channel scale and shift after every encoder operation"
    identical_at_init = False  # γ ~ N(1, 0.02), β ~ N(0, 0.02)
    mergeable = True
    Config = placement_config("ssf")  # with a placement, the patch embedding's γ, β come only with blocks=all

    def inject(self, model) -> None:
        encoder = model.image_encoder
        if self.places_everywhere():
            encoder.patch_embed = ScaleShift(encoder.patch_embed, encoder.patch_embed.proj.out_channels)
        for block in self.selected_blocks(model):
            attn, mlp = block.attn, block.mlp
            attn.qkv = ScaleShift(attn.qkv, attn.qkv.out_features)
            attn.proj = ScaleShift(attn.proj, attn.proj.out_features)
            mlp.lin1 = ScaleShift(mlp.lin1, mlp.lin1.out_features)
            mlp.lin2 = ScaleShift(mlp.lin2, mlp.lin2.out_features)
            block.norm1 = ScaleShift(block.norm1, block.norm1.normalized_shape[0])
            block.norm2 = ScaleShift(block.norm2, block.norm2.normalized_shape[0])

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the trained γ, β into SAM's weights: plain SAM modules, same outputs."""
        return merge_scale_shift(model)
