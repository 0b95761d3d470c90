"""Where a training step's time goes: torch.profiler over one step (after a warm-up step) of one or more
configurations, grouped into linear layers, attention matrix products, softmax, SDPA kernels, element-wise
and copies, as a markdown table per configuration.

    python benchmarks/bench_profile.py --method lora --image-size 512 --batch 1 --attention sdpa,reference
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from samfit.engine.bench import Bench, Setting, Shape

GROUPS = {
    "linear layers (mm, addmm)": ("aten::mm", "aten::addmm"),
    "attention products (bmm)": ("aten::bmm",),
    "softmax fwd + bwd": ("aten::_softmax", "aten::_softmax_backward_data", "aten::_safe_softmax"),
    "fused SDPA kernels": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                           "aten::_scaled_dot_product_efficient_attention",
                           "aten::_scaled_dot_product_efficient_attention_backward"),
    "element-wise (add, mul, …)": ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub", "aten::div",
                                   "aten::sum", "aten::gelu", "aten::gelu_backward", "aten::fill_", "aten::sqrt"),
    "copies (copy_, cat, index)": ("aten::copy_", "aten::cat", "aten::index", "aten::constant_pad_nd"),
    "layer norm fwd + bwd": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
}


def profile_step(setting: Setting, shape: Shape) -> dict[str, float]:
    bench = Bench(setting, shape)
    bench.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bench.train_step()
    self_ms = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    grouped = defaultdict(float)
    for group, ops in GROUPS.items():
        grouped[group] = sum(self_ms.get(op, 0.0) for op in ops)
    total = sum(self_ms.values())
    grouped["other"] = total - sum(grouped.values())
    grouped["total"] = total
    return grouped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="lora")
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--attention", default="sdpa,reference")
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape(args.model, args.image_size, args.batch, "cpu")
    results = {a: profile_step(Setting(args.method, a, "fp32", args.grad_checkpoint), shape)
               for a in args.attention.split(",")}
    kinds = list(results)
    print(f"{args.method}, {args.model}, {args.image_size} px, batch {args.batch}, {torch.get_num_threads()} "
          f"thread(s): self CPU time of one training step, ms")
    print("| op group | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for group in list(GROUPS) + ["other", "total"]:
        print(f"| {group} | " + " | ".join(f"{results[k][group]:.0f}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
