"""Where a forward pass spends its time, part by part: SAM 2's Hiera-T (stem, each of its four stages, FPN neck,
decoder) beside SAM ViT-B (stem, the twelve blocks, neck, decoder); random weights, fp32, one image, no grad,
one thread, the two models interleaved in one process (median of 5 rounds).

    .venv/bin/python benchmarks/bench_backbone_parts.py 256      # input size (a multiple of 32)
"""
import sys
import time

import torch

import samfit


def timed(parts: dict, name: str, fn):
    start = time.perf_counter()
    out = fn()
    parts[name] = parts.get(name, 0.0) + time.perf_counter() - start
    return out


def hiera_parts(model, x) -> dict:
    e, parts, stages = model.image_encoder, {}, []
    y = timed(parts, "stem", lambda: e.patch_embed(x) + e.position_embedding(x.shape[-2] // 4, x.shape[-1] // 4))
    for i, block in enumerate(e.blocks):
        y = timed(parts, f"stage {len(stages) + 1}", lambda: block(y))
        if i in e.stage_ends:
            stages.append(y.permute(0, 3, 1, 2))
    (s4, s8, s16, _), _ = timed(parts, "neck", lambda: e.neck(stages))
    timed(parts, "decoder", lambda: model.decode((s16 + e.no_mem_embed.reshape(1, -1, 1, 1), s4, s8)))
    return parts


def vit_parts(model, x) -> dict:
    e, parts = model.image_encoder, {}
    y = timed(parts, "stem", lambda: e.patch_embed(x) + e.pos_embed)
    for block in e.blocks:
        y = timed(parts, "blocks", lambda: block(y))
    embedding = timed(parts, "neck", lambda: e.neck(y.permute(0, 3, 1, 2)))
    timed(parts, "decoder", lambda: model.decode(embedding))
    return parts


def main(size: int) -> None:
    torch.set_num_threads(1)
    x = torch.randn(1, 3, size, size)
    runs = {"sam2_hiera_t": (samfit.build_model("sam2_hiera_t", image_size=size).eval(), hiera_parts),
            "vit_b": (samfit.build_model("vit_b", image_size=size).eval(), vit_parts)}
    results = {name: [] for name in runs}
    with torch.no_grad():
        for model, fn in runs.values():
            fn(model, x)  # warm-up
        for _ in range(5):
            for name, (model, fn) in runs.items():
                results[name].append(fn(model, x))
    for name, rounds in results.items():
        median = {p: sorted(r[p] for r in rounds)[len(rounds) // 2] for p in rounds[0]}
        total = sum(median.values())
        print(f"{name} {size} px: {total:.3f} s; " + ", ".join(f"{p} {v:.3f} s ({100 * v / total:.0f}%)"
                                                               for p, v in median.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
