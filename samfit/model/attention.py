"""SAM's encoder attention computed by `torch.nn.functional.scaled_dot_product_attention` (`--attention sdpa`,
the default) or by SAM's own code (`--attention reference`).

SAM's `Attention` (segment_anything.modeling.image_encoder) forms the attention matrix explicitly:

    A = softmax(scale · Q Kᵀ + B_rel) V,   B_rel[(i, j), (k, l)] = rel_h[i, j, k] + rel_w[i, j, l]

with rel_h = Q_(i,j) · R_h[i − k] and rel_w = Q_(i,j) · R_w[j − l] (the decomposed relative positions of
MViTv2, Li et al. 2022). The sdpa form builds the same B_rel from the same two einsums and passes it to
`scaled_dot_product_attention` as the additive mask, so PyTorch picks its fused kernel (flash / memory-efficient
attention where the device and dtypes allow it, its math kernel otherwise). Equal to SAM's own up to rounding,
gradients included (B_rel depends on Q, so its gradient flows back into Q): tested in float64, which both forms
support on CPU, to 2**20 eps of each tensor's scale; in fp32 the rounding differences reach ~1e-3 of a gradient's
scale on the sharply randomised tiny model of the tests.
One exception: on CPU, PyTorch's fused kernels take no gradient for the bias and its math fallback upcasts
16-bit inputs to fp32, so 16-bit training there uses the explicit form (`upcasting_fallback`).

`set_attention(model, "sdpa" | "reference")` switches every SAM `Attention` inside a model in place (the
module keeps its parameters, names and identity, so it composes with methods that wrap `attn.qkv` or the
attention module, and with VPT, which calls its own attention on SAM's parameters).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

from samfit.errors import SamfitError

ATTENTION_KINDS = ("sdpa", "reference")


def decomposed_rel_pos(attn: Attention, q: torch.Tensor, h: int, w: int):
    """rel_h (B, heads, h, w, h) and rel_w (B, heads, h, w, w) for queries q (B, heads, h·w, c) on an h×w grid."""
    b, heads, _, c = q.shape
    r_q = q.reshape(b, heads, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype))
    return rel_h, rel_w


def upcasting_fallback(q: torch.Tensor, bias_needs_grad: bool) -> bool:
    """True where PyTorch has no fused kernel and its math fallback would compute in fp32: on CPU, a bias that
    needs a gradient, 16-bit inputs (measured at 512 px, bf16, LoRA: 1.34x the step time and 1.29x the memory
    of the explicit form)."""
    return q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16) and bias_needs_grad


def explicit_attention(q, k, v, rel_h, rel_w, scale: float) -> torch.Tensor:
    """softmax(scale · Q Kᵀ + rel_h + rel_w) V written out, as SAM's own Attention computes it."""
    b, heads, n, _ = q.shape
    h, w = rel_h.shape[2:4]
    scores = ((q * scale) @ k.transpose(-2, -1)).view(b, heads, h, w, h, w)
    scores = (scores + rel_h[..., :, None] + rel_w[..., None, :]).view(b, heads, n, n)
    return scores.softmax(dim=-1) @ v


def sdpa_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """SAM's Attention.forward on x (B, h, w, d), through scaled_dot_product_attention."""
    b, h, w, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        rel_h, rel_w = decomposed_rel_pos(attn, q, h, w)
        if upcasting_fallback(q, rel_h.requires_grad or rel_w.requires_grad):
            out = explicit_attention(q, k, v, rel_h, rel_w, attn.scale)
        else:
            bias = (rel_h[:, :, :, :, :, None] + rel_w[:, :, :, :, None, :]).reshape(b, attn.num_heads, h * w, h * w)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class SDPAAttention(Attention):
    """SAM's Attention with the sdpa forward; no state of its own (set_attention swaps the class in place)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sdpa_attention(self, x)


def set_attention(model: nn.Module, kind: str) -> nn.Module:
    """Compute every SAM Attention in `model` with `kind` ("sdpa" or "reference"); returns the model."""
    if kind not in ATTENTION_KINDS:
        raise SamfitError(f"--attention {kind!r}: choose one of {', '.join(ATTENTION_KINDS)}.")
    cls = SDPAAttention if kind == "sdpa" else Attention
    for module in model.modules():
        if isinstance(module, Attention):
            module.__class__ = cls
    return model


def attention_kind(model: nn.Module) -> str | None:
    """"sdpa", "reference", or None when the model has no SAM Attention."""
    kinds = {"sdpa" if isinstance(m, SDPAAttention) else "reference" for m in model.modules()
             if isinstance(m, Attention)}
    if len(kinds) > 1:
        return "mixed"
    return kinds.pop() if kinds else None
