"""Turn the outputs of benchmarks/run_benchmarks.sh into the performance table (ratios against the targets
in docs/performance.md, Summary), as markdown on stdout and in OUT/summary.md.

    python benchmarks/bench_summary.py results/perf
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _find(records, **match):
    for r in records or []:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ratio(a, b, key):
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def rows(out: Path) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, measured ratio, target, met) for every target."""
    b256 = _load(out / "vitb256" / "bench.json")
    b512 = _load(out / "vitb512" / "bench.json")
    cache = _load(out / "cache" / "cache.json")
    lora = _find(b256, method="lora")
    sdpa = _find(b512, method="lora", attention="sdpa", grad_checkpoint=False)
    ref = _find(b512, method="lora", attention="reference", grad_checkpoint=False)
    ckpt = _find(b512, method="lora", attention="sdpa", grad_checkpoint=True)
    table = [
        ("ViT-B 256 px b2: Conv-LoRA step time / LoRA", _ratio(_find(b256, method="conv-lora"), lora, "step_time_s"),
         "≤ 1.10", lambda x: x <= 1.10),
        ("ViT-B 256 px b2: LST peak memory / LoRA", _ratio(_find(b256, method="lst"), lora, "peak_memory_mb"),
         "≤ 0.60", lambda x: x <= 0.60),
        ("ViT-B 256 px b2: decoder-only step time / LoRA",
         _ratio(_find(b256, method="decoder-only"), lora, "step_time_s"), "≤ 0.70", lambda x: x <= 0.70),
        ("ViT-B 256 px b2: decoder-only epoch, uncached / cached (epochs after the first)",
         cache and cache["speedup_after_first"], "≥ 10", lambda x: x >= 10),
        ("ViT-B 512 px b1: LoRA step time, sdpa / reference", _ratio(sdpa, ref, "step_time_s"), "≤ 0.85",
         lambda x: x <= 0.85),
        ("ViT-B 512 px b1: LoRA peak memory, sdpa / reference", _ratio(sdpa, ref, "peak_memory_mb"), "≤ 1.00",
         lambda x: x <= 1.0),
        ("ViT-B 512 px b1: LoRA eval throughput, sdpa / reference (no target)",
         _ratio(sdpa, ref, "eval_img_per_s"), "—", None),
        ("ViT-B 512 px b1: LoRA peak memory, grad-checkpoint / without", _ratio(ckpt, sdpa, "peak_memory_mb"),
         "≤ 0.60", lambda x: x <= 0.60),
        ("ViT-B 512 px b1: LoRA step time, grad-checkpoint / without", _ratio(ckpt, sdpa, "step_time_s"), "≤ 1.50",
         lambda x: x <= 1.50),
    ]
    table += issue_targets(out, b256)
    return [(what, value, target, None if value is None or test is None else bool(test(value)))
            for what, value, target, test in table]


NEW_METHODS = ("ln-tune", "adaptformer", "fact", "dora", "ia3")


def _cached(records, method: str, kind):
    """The record of `method` trained from a cache of `kind` (None: without a cache)."""
    for r in records or []:
        if r["method"] == method and ((r.get("cache") or {}).get("kind") if r.get("cache") else None) == kind:
            return r
    return None


def issue_targets(out: Path, b256) -> list:
    """Late placement with the prefix cache, full with activation checkpointing, the new methods' step times."""
    prefix = _load(out / "vitb256_prefix" / "bench.json")
    full = _load(out / "vitb256_full_ckpt" / "bench.json")
    late, lora = _cached(prefix, "lora@last:3", "prefix"), _cached(prefix, "lora", None)
    plain, ckpt = _find(full, grad_checkpoint=False), _find(full, grad_checkpoint=True)
    rows = [
        ("ViT-B 256 px b2: lora@last:3 + prefix cache step time / lora", _ratio(late, lora, "step_time_s"),
         "≤ 0.35", lambda x: x <= 0.35),
        ("ViT-B 256 px b2: lora@last:3 + prefix cache peak memory / lora", _ratio(late, lora, "peak_memory_mb"),
         "≤ 0.40", lambda x: x <= 0.40),
        ("ViT-B 256 px b2: full peak memory, grad-checkpoint / without", _ratio(ckpt, plain, "peak_memory_mb"),
         "≤ 0.60", lambda x: x <= 0.60),
    ]
    lora256 = _find(b256, method="lora")
    for name in NEW_METHODS:
        rows.append((f"ViT-B 256 px b2: {name} step time / LoRA", _ratio(_find(b256, method=name), lora256,
                                                                         "step_time_s"), "≤ 1.15",
                     lambda x: x <= 1.15))
    return rows


def summary(out: Path) -> str:
    lines = ["| measurement | ratio | target | met |", "|---|---:|---:|---|"]
    for what, value, target, met in rows(out):
        lines.append(f"| {what} | {'—' if value is None else f'{value:.2f}'} | {target} | "
                     f"{'—' if met is None else ('yes' if met else '**no**')} |")
    for name in ("vitb256", "vitb512", "vitb256_prefix", "vitb256_full_ckpt"):
        meta = _load(out / name / "bench_meta.json")
        if meta:
            m = meta["machine"]
            lines.append(f"\n{name}: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} "
                         f"thread(s); load average before {meta['load_before']}, after {meta['load_after']}; "
                         f"started {meta['started']}.")
    cache = _load(out / "cache" / "cache.json")
    if cache:
        lines.append(f"\ncache: epochs uncached {[round(t, 2) for t in cache['uncached_epoch_s']]} s, cached "
                     f"{[round(t, 2) for t in cache['cached_epoch_s']]} s (+ {cache['cache']['build_time_s']} s to "
                     f"build {cache['cache']['size_mb']} MB); same scores: {cache['same_scores']}; load average "
                     f"{cache['load_average']}.")
    data = _load(out / "vitb256" / "data.json")
    if data:
        lines.append(f"\ndata loading ({data['dataset']}, {data['image_size']} px, {data['num_workers']} workers): "
                     f"{data['img_per_s']:.1f} images/s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/perf")
    text = summary(out)
    (out / "summary.md").write_text(text)
    sys.stdout.write(text)
