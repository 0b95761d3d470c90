"""What a training forward keeps for the backward pass, per encoder block: counted with autograd's saved-tensor
hooks on CPU (fp32, batch 1), split into attention-sized tensors (…, n, n) and token-sized ones. Token-sized
bytes are also given in units of one block input (tokens × d × 4 bytes), the number that carries over to other
input sizes and devices; the attention-sized ones depend on the attention kernel (docs/performance.md does
the arithmetic for a GPU at 1024 px).

    python benchmarks/bench_activations.py --method lora --image-size 512 --out results/perf/activations.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import samfit
from samfit.model.attention import set_attention
from samfit.model.sam import PATCH, get_variant


def saved_per_block(method: str, variant: str, image_size: int, attention: str) -> dict[int, dict[str, int]]:
    """{block: {"attention": bytes, "tokens": bytes}} saved for backward during each encoder block (batch 1)."""
    model = samfit.get_method(method).apply(samfit.build_model(variant, image_size=image_size))
    set_attention(model, attention)
    encoder = model.image_encoder
    current: dict[str, int | None] = {"block": None}
    seen: set[int] = set()
    totals = {i: {"attention": 0, "tokens": 0} for i in range(len(encoder.blocks))}
    for i, block in enumerate(encoder.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__("block", i))
    encoder.neck.register_forward_pre_hook(lambda m, a: current.__setitem__("block", None))

    def pack(t: torch.Tensor):
        i, storage = current["block"], t.untyped_storage()
        if i is not None and storage.data_ptr() not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(storage.data_ptr())
            square = t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] > 64
            totals[i]["attention" if square else "tokens"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(torch.randn(1, 3, image_size, image_size))
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="lora")
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    v = get_variant(args.model)
    grid = args.image_size // PATCH
    padded = math.ceil(grid / v.window) * v.window
    result = {"method": args.method, "model": args.model, "image_size": args.image_size, "dtype": "float32"}
    for attention in ("reference", "sdpa"):
        totals = saved_per_block(args.method, args.model, args.image_size, attention)
        summary = {}
        for kind, blocks in (("global", v.global_blocks), ("windowed", [i for i in totals if i not in v.global_blocks])):
            tokens = (grid if kind == "global" else padded) ** 2
            per_block = {k: sum(totals[i][k] for i in blocks) / len(blocks) for k in ("attention", "tokens")}
            summary[kind] = {"attention_mb": round(per_block["attention"] / 2**20, 1),
                             "tokens_mb": round(per_block["tokens"] / 2**20, 1),
                             "tokens_in_block_inputs": round(per_block["tokens"] / (tokens * v.embed_dim * 4), 1)}
        summary["total_mb"] = round(sum(sum(t.values()) for t in totals.values()) / 2**20, 1)
        result[attention] = summary
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
