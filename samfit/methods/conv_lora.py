"""Conv-LoRA (Zhong et al., "Convolution Meets LoRA", ICLR 2024, arXiv 2401.17868) on the fused qkv of every
encoder block; the official layer is AutoGluon MultiModal's `ConvLoRALinear` (models/conv_lora/).

On a token grid x ∈ R^{N×h×w×d} (per window in windowed blocks, the whole grid in global blocks):

    z    = A x                                                      A ∈ R^{r×d} (kaiming-uniform)
    g    = GAP(z) W_gate (+ randn · (softplus(GAP(z) W_noise) + 1e-2) in training)    W_gate, W_noise ∈ R^{r×M} (0)
    E_i(z) = resize_{h×w}( GELU( Conv3x3_i( bicubic_up_{s_i}(z) ) ) ),  s_i = i for i = 1..M (bias zero)
    z'   = z + Σ_{i ∈ topk(g)} softmax(topk(g))_i · E_i(z)          (top-1: the one weight is 1)
    y    = W x + b + (α/r) · B z'                                   B ∈ R^{3d×r} (zero)

B = 0 makes the model exactly SAM at step 0. The router learns from the MoE load-balancing loss of noisy
top-k gating (Shazeer et al. 2017), per layer  w · (cv²(importance) + cv²(load))  with importance = Σ_batch
gates and load = Σ_batch P(expert in the top-k under fresh noise) (hard counts without noise); each layer
leaves it in `self.aux_loss` during a training forward and the Segmenter adds it to the task loss.

Extra parameters per layer beyond LoRA: 2·r·M (router) + M·(9r² + r) (experts) = 720 at r=3, M=8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from samfit.errors import SamfitError
from samfit.methods.base import (Method, _coerce, register_method, require_blocks, require_bool, require_float,
                                 require_int, require_ints, show)
from samfit.methods.lora import add_low_rank_factors


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var/mean² (unbiased variance, as the reference); 0 for one value."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # 16-bit up to float32; float64 kept
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating on pooled features (Shazeer et al. 2017) with its load-balancing loss."""

    def __init__(self, dim: int, experts: int, top_k: int = 1, noisy: bool = True,
                 balance_weight: float = 0.01, noise_epsilon: float = 1e-2):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise SamfitError(f"Conv-LoRA top_k={top_k} must be between 1 and experts={experts}.")
        self.num_experts = experts
        self.top_k = top_k
        self.balance_weight = balance_weight
        self.noise_epsilon = noise_epsilon
        self.w_gate = nn.Parameter(torch.zeros(dim, experts))
        self.w_noise = nn.Parameter(torch.zeros(dim, experts)) if noisy else None

    def forward(self, pooled: torch.Tensor):
        """pooled (N, r) -> top-k expert indices (N, k), their gate weights (N, k), balancing loss ().
        Routing runs in float32 (or float64 for a float64 model) even under autocast (top-k ties and the normal
        CDF need the precision)."""
        with torch.autocast(pooled.device.type, enabled=False):
            return self._route(pooled.to(torch.promote_types(pooled.dtype, torch.float32)))

    def _route(self, pooled: torch.Tensor):
        clean = pooled @ self.w_gate.to(pooled.dtype)
        noisy = self.w_noise is not None and self.training
        if noisy:
            stddev = F.softplus(pooled @ self.w_noise.to(pooled.dtype)) + self.noise_epsilon
            logits = clean + torch.randn_like(clean) * stddev
        else:
            logits = clean
        top_values, top_indices = logits.topk(min(self.top_k + 1, self.num_experts), dim=1)
        indices = top_indices[:, :self.top_k]
        weights = top_values[:, :self.top_k].softmax(dim=1)
        gates = torch.zeros_like(logits).scatter(1, indices, weights)
        importance = gates.sum(0)
        if noisy and self.top_k < self.num_experts:
            load = self._prob_in_top_k(clean, logits, stddev, top_values).sum(0)
        else:
            load = (gates > 0).sum(0).float()
        loss = self.balance_weight * (cv_squared(importance) + cv_squared(load))
        return indices, weights, loss

    def _prob_in_top_k(self, clean, noisy, stddev, top_values):
        """Smooth P(expert stays in the top-k when only its own noise is redrawn), differentiable in the
        clean logits and the noise scale: Φ((clean − threshold) / stddev), the threshold being the k-th
        (if the expert is out) or (k+1)-th (if it is in) largest noisy logit of the sample."""
        threshold_if_in = top_values[:, self.top_k:self.top_k + 1]
        threshold_if_out = top_values[:, self.top_k - 1:self.top_k]
        is_in = noisy > threshold_if_in
        prob_if_in = torch.special.ndtr((clean - threshold_if_in) / stddev)
        prob_if_out = torch.special.ndtr((clean - threshold_if_out) / stddev)
        return torch.where(is_in, prob_if_in, prob_if_out)


class ConvExpert(nn.Module):
    """Bicubic upsample by `scale`, Conv2d(r, r, 3, pad 1) with zero bias, GELU, bicubic back to (h, w)."""

    def __init__(self, rank: int, scale: int):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(rank, rank, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        if self.scale != 1:
            z = F.interpolate(z, scale_factor=self.scale, mode="bicubic", align_corners=False)
        z = F.gelu(self.conv(z))
        if self.scale != 1:
            z = F.interpolate(z, size=(h, w), mode="bicubic", align_corners=False)
        return z


class ConvLoRALinear(nn.Module):
    """A frozen nn.Linear plus a LoRA update whose low-rank features pass through a routed multi-scale
    convolution expert. Input: a token grid (N, h, w, d); each of the N grids is routed on its own."""

    def __init__(self, base: nn.Linear, rank: int = 3, alpha: float = 32, experts: int = 8,
                 scales: tuple[int, ...] | None = None, top_k: int = 1, noisy_gating: bool = True,
                 balance_weight: float = 0.01):
        super().__init__()
        scales = tuple(scales) if scales else tuple(range(1, experts + 1))
        if len(scales) != experts:
            raise SamfitError(f"Conv-LoRA has {experts} experts but {len(scales)} scales {scales}.")
        add_low_rank_factors(self, base, rank, alpha)
        self.router = NoisyTopKRouter(rank, experts, top_k, noisy_gating, balance_weight)
        self.experts = nn.ModuleList(ConvExpert(rank, s) for s in scales)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"ConvLoRALinear expects a token grid (N, h, w, d), got shape {tuple(x.shape)}")
        z = (x @ self.lora_A.T).permute(0, 3, 1, 2)  # (N, r, h, w)
        indices, weights, loss = self.router(z.mean(dim=(2, 3)))
        if self.training:
            self.aux_loss = loss
        z = z + self.dispatch(z, indices, weights)
        return self.base(x) + self.scaling * (z.permute(0, 2, 3, 1) @ self.lora_B.T)

    def dispatch(self, z: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k weight · expert_k(z), batched: each expert runs once on all grids routed to it.
        One host sync (the per-expert counts), no loop over samples."""
        n, k = indices.shape
        expert_of = indices.reshape(-1)
        order = torch.argsort(expert_of, stable=True)
        samples = torch.arange(n, device=z.device).repeat_interleave(k)[order]
        gate = weights.reshape(-1)[order].to(z.dtype)
        # scatter_add, not bincount: bincount reads the largest index back to the host (a second sync)
        counts = torch.zeros(len(self.experts), dtype=torch.long, device=z.device).scatter_add_(
            0, expert_of, torch.ones_like(expert_of)).tolist()
        out = torch.zeros_like(z)
        for expert, rows, row_gate in zip(self.experts, samples.split(counts), gate.split(counts)):
            if rows.numel():
                y = expert(z.index_select(0, rows)).to(z.dtype)
                out = out.index_add(0, rows, y * row_gate.view(-1, 1, 1, 1))
        return out


@dataclass
class ConvLoRAConfig:
    rank: int = 3
    alpha: float = 32.0
    experts: int = 8
    scales: tuple[int, ...] = ()  # () = 1, 2, ..., experts
    top_k: int = 1
    noisy_gating: bool = True
    balance_weight: float = 0.01
    blocks: str = "all"  # placement: all | last:K | first:K | i,j,k

    def __post_init__(self):
        m = "conv-lora"
        self.blocks = require_blocks(m, "blocks", self.blocks)
        self.rank = require_int(m, "rank", self.rank, minimum=1)
        self.alpha = require_float(m, "alpha", self.alpha, low=0, include_low=False)
        self.experts = require_int(m, "experts", self.experts, minimum=1)
        self.scales = require_ints(m, "scales", self.scales, minimum=1) or tuple(range(1, self.experts + 1))
        if len(self.scales) != self.experts:
            raise SamfitError(
                f"--method-arg scales={show(self.scales)} for method '{m}': {len(self.scales)} scales but "
                f"experts={self.experts}; there must be one scale per expert (or leave experts out).")
        self.top_k = require_int(m, "top_k", self.top_k, minimum=1, maximum=self.experts,
                                 note=f" (experts={self.experts})")
        self.noisy_gating = require_bool(m, "noisy_gating", self.noisy_gating)
        self.balance_weight = require_float(m, "balance_weight", self.balance_weight, low=0)


@register_method
class ConvLoRA(Method):
    name = "conv-lora"
    requires = frozenset({"fused-qkv", "token-grid"})
    summary = "LoRA on the fused qkv with a routed multi-scale conv expert on the low-rank features"
    Config = ConvLoRAConfig
    identical_at_init = True
    mergeable = False  # the expert path is non-linear in x

    def __init__(self, **overrides):
        scales = overrides.get("scales")
        if scales is not None and "experts" not in overrides:  # scales alone: one expert per scale
            scales = _coerce(self.name, "scales", scales, tuple[int, ...], ConvLoRAConfig)
            if isinstance(scales, (tuple, list)) and scales:
                overrides = {**overrides, "scales": scales, "experts": len(scales)}
        super().__init__(**overrides)

    def inject(self, model) -> None:
        c = self.config
        for block in self.selected_blocks(model):
            block.attn.qkv = ConvLoRALinear(block.attn.qkv, c.rank, c.alpha, c.experts, c.scales, c.top_k,
                                            c.noisy_gating, c.balance_weight)
