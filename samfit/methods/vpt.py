"""VPT-deep (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv 2203.12119; code KMnP/vpt), adapted to SAM's
windowed attention.

Every encoder block i gets its own p learnable prompt tokens P_i ∈ R^{p×d}. They join the block's tokens
(passing through its norm1 like any token) as extra keys and values of EVERY attention window (14x14 windows
in windowed blocks, the whole grid in global blocks); the decomposed relative-position terms apply only to
the patch×patch part of the attention (bias 0 on prompt keys). The prompts' own outputs are dropped after the
block (deep: the next block brings new prompts). For patch token t with query q_t:

    attn(q_t) = softmax([q_t·K_patch/√c + relpos(q_t), q_t·K_prompt/√c]) · [V_patch; V_prompt]

Prompt queries are not computed: their outputs are dropped, so they cannot affect anything (identical to
running the full (T+p)-token attention and discarding the prompt rows). Init as the official code:
uniform(-v, v), v = sqrt(6 / (3·patch² + d)) (xavier-uniform for a patch-embedding-shaped matrix), no prompt
projection, no prompt dropout. Parameters: p·d per block; p=12 gives 12·d·L (LoRA r=3's budget) exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import nn

from samfit.methods.base import Method, register_method, require_blocks, require_int
from samfit.model.attention import decomposed_rel_pos, upcasting_fallback


def prompted_attention(attn: nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """SAM's `Attention` on token grids x (N, h, w, d), every grid's keys/values extended by the same
    (already normalised) prompt tokens (p, d), relative positions on the patch×patch part only."""
    n, h, w, d = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(n, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if attn.use_rel_pos:
        rel_h, rel_w = decomposed_rel_pos(attn, q, h, w)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(n, heads, h * w, h * w)
    p = prompts.shape[0]
    if p:
        pk, pv = attn.qkv(prompts)[:, d:].reshape(p, 2, heads, -1).permute(1, 2, 0, 3).unbind(0)
        k = torch.cat([k, pk.unsqueeze(0).expand(n, -1, -1, -1).to(k.dtype)], dim=2)
        v = torch.cat([v, pv.unsqueeze(0).expand(n, -1, -1, -1).to(v.dtype)], dim=2)
        if bias is not None:
            bias = F.pad(bias, (0, p))
    if bias is not None and upcasting_fallback(q, bias.requires_grad):  # 16-bit on CPU: the explicit form
        out = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(n, h, w, -1))


class PromptedBlock(nn.Module):
    """A SAM encoder `Block` (its own submodules, same parameter names) with p deep prompt tokens."""

    def __init__(self, block: nn.Module, num_prompts: int, patch_size: int = 16):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size
        dim = block.attn.qkv.in_features
        self.prompts = nn.Parameter(torch.empty(num_prompts, dim))
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + dim))
        nn.init.uniform_(self.prompts, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = x.shape[1:3]
            x, pad_hw = window_partition(x, self.window_size)
        x = prompted_attention(self.attn, x, self.norm1(self.prompts))
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, hw)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


@dataclass
class VPTConfig:
    num_prompts: int = 12
    blocks: str = "all"  # placement: all | last:K | first:K | i,j,k

    def __post_init__(self):
        self.num_prompts = require_int("vpt", "num_prompts", self.num_prompts, minimum=1,
                                       note=" (prompt tokens per block)")
        self.blocks = require_blocks("vpt", "blocks", self.blocks)


@register_method
class VPT(Method):
    name = "vpt"
    requires = frozenset({"window-attention", "mlp", "norms"})
    summary = "VPT-deep: learnable prompt tokens joining every attention window of every block"
    Config = VPTConfig
    identical_at_init = False  # the random prompts take part in attention from the start
    mergeable = False

    def inject(self, model) -> None:
        encoder = model.image_encoder
        patch = encoder.patch_embed.proj.kernel_size[0]
        for i in self.block_indices(model):
            encoder.blocks[i] = PromptedBlock(encoder.blocks[i], self.config.num_prompts, patch)
