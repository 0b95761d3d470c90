"""Three exact ways to compute SAM's attention with its decomposed relative-position bias, forward + backward
of one attention call on ViT-B's shapes (12 heads of 64 channels), timed side by side:

- reference: softmax(scale·QKᵀ + B_rel)V written out, as SAM's code does (`explicit_attention`);
- mask: scaled_dot_product_attention with B_rel as the additive mask (samfit's `--attention sdpa`);
- folded: the bias moved into the products, so sdpa runs without a mask. With one-hot key positions e_h, e_w,

      scale·q·k + rel_h[q, k_h] + rel_w[q, k_w] = [scale·q, rel_h[q], rel_w[q]] · [k, e_h(k), e_w(k)],

  i.e. Q' = [scale·Q, rel_h, rel_w] and K' = [K, E_h, E_w] (head dim c + h + w; V zero-padded to match), which
  lets PyTorch's fused CPU kernel run even though the bias needs a gradient. An experiment, not used by samfit
  (see docs/performance.md for why).

    python benchmarks/bench_attention_forms.py --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from samfit.model.attention import explicit_attention

HEADS, CHANNELS = 12, 64
# (label, batch of windows or images, grid h, grid w) for ViT-B's windowed (14×14) and global blocks
SHAPES = [("256 px global (16×16), batch 2", 2, 16, 16),
          ("512 px windowed (25 windows of 14×14)", 25, 14, 14),
          ("512 px global (32×32), batch 1", 1, 32, 32)]


def masked(q, k, v, rel_h, rel_w, scale):
    b, heads, n, _ = q.shape
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, n, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def folded(q, k, v, rel_h, rel_w, scale):
    b, heads, n, c = q.shape
    h, w = rel_h.shape[2:4]
    one_hot_row = torch.eye(h, dtype=q.dtype).repeat_interleave(w, 0)  # key (i, j) -> e_i
    one_hot_col = torch.eye(w, dtype=q.dtype).repeat(h, 1)              # key (i, j) -> e_j
    q_ = torch.cat([q * scale, rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w)], -1)
    k_ = torch.cat([k, one_hot_row.expand(b, heads, n, h), one_hot_col.expand(b, heads, n, w)], -1)
    v_ = F.pad(v, (0, h + w))
    return F.scaled_dot_product_attention(q_, k_, v_, scale=1.0)[..., :c]


FORMS = {"reference": explicit_attention, "mask": masked, "folded": folded}


def time_forms(batch: int, h: int, w: int, repeats: int) -> tuple[dict[str, float], float]:
    """Median seconds of forward + backward per form (interleaved), and the largest gradient difference to the
    reference form."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, h * w, CHANNELS, generator=gen, requires_grad=True) for _ in range(3))
    table_h = torch.randn(h, h, CHANNELS, generator=gen) * 0.1  # R_h[i − k], already gathered
    table_w = torch.randn(w, w, CHANNELS, generator=gen) * 0.1

    def step(form):
        for t in (q, k, v):
            t.grad = None
        grid = q.reshape(batch, HEADS, h, w, CHANNELS)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, table_h)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, table_w)
        FORMS[form](q, k, v, rel_h, rel_w, CHANNELS ** -0.5).square().sum().backward()
        return torch.cat([t.grad.flatten() for t in (q, k, v)])

    grads = {form: step(form) for form in FORMS}  # also the warm-up
    worst = max((grads[f] - grads["reference"]).abs().max().item() for f in FORMS)
    times = {form: [] for form in FORMS}
    for _ in range(repeats):
        for form in FORMS:
            start = time.perf_counter()
            step(form)
            times[form].append(time.perf_counter() - start)
    return {form: statistics.median(ts) for form, ts in times.items()}, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| shape | reference ms | mask × ref | folded × ref | max grad diff |")
    print("|---|---:|---:|---:|---:|")
    for label, batch, h, w in SHAPES:
        times, worst = time_forms(batch, h, w, args.repeats)
        ref = times["reference"]
        print(f"| {label} | {ref * 1000:.1f} | {times['mask'] / ref:.2f} | {times['folded'] / ref:.2f} "
              f"| {worst:.1e} |")


if __name__ == "__main__":
    main()
