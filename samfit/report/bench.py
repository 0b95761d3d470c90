"""`samfit bench`'s outputs: bench.json, bench_meta.json, data.json and the markdown table bench.md."""
from __future__ import annotations

from pathlib import Path

from samfit.engine import rundir


def _fmt(value, digits=2) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _cache_cell(cache: dict | None) -> str:
    """off; the kind of cache trained from (prefix: how many blocks are stored); or "none" when the model allows
    none."""
    if not cache:
        return "off"
    if cache["kind"] is None:
        return "none"
    return f"prefix ({cache['blocks_cached']} blocks)" if cache["kind"] == "prefix" else cache["kind"]


def markdown(records: list[dict], meta: dict, data: dict | None = None) -> str:
    lines = []
    if records:
        m, base = meta["machine"], meta["baseline"]
        accum = f", {meta['effective_batch']} per optimiser step" if meta.get("effective_batch") else ""
        classes = f", {meta['num_classes']} classes" if meta.get("num_classes", 1) > 1 else ""
        lines += [f"# samfit bench: {meta['model']}, {meta['image_size']} px, batch {meta['batch']}{accum}{classes}, "
                  f"{meta['device']}",
                  "", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread(s))"
                  + (f", GPU {m['gpu']}" if "gpu" in m else "") + f". Load average (1, 5, 15 min) before "
                  f"{meta['load_before']}, after {meta['load_after']}. {meta['steps']} timed steps after "
                  f"{meta['warmup']} warm-up steps, round-robin; step time is the median of whole optimiser "
                  f"steps. Peak memory: {meta['peak_memory_kind']}, a fresh process per row, "
                  f"{meta['memory_steps']} steps. Ratios are to {base}.", ""]
        head = ["method", "attention", "precision", "grad ckpt", "cache", "step s", f"step × {base}", "train img/s",
                "eval img/s", f"eval × {base}", "peak MB", f"peak × {base}", "trainable", f"trainable × {base}"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 5 + "---:|" * (len(head) - 5)]
        for r in records:
            cells = [r["method"], r["attention"], r["precision"], "on" if r["grad_checkpoint"] else "off",
                     _cache_cell(r.get("cache")),
                     _fmt(r["step_time_s"], 3), _fmt(r["step_time_s_vs_baseline"]), _fmt(r["train_img_per_s"]),
                     _fmt(r["eval_img_per_s"]), _fmt(r["eval_img_per_s_vs_baseline"]), _fmt(r["peak_memory_mb"], 0),
                     _fmt(r["peak_memory_mb_vs_baseline"]), _fmt(r["trainable_params"]),
                     _fmt(r["trainable_params_vs_baseline"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if data:
        lines += [f"Data loading ({data['dataset']}, split {data['split']}, {data['image_size']} px): "
                  f"{data['img_per_s']:.1f} images/s with {data['num_workers']} workers (read, decode, resize, "
                  f"normalise, flip; batch {data['batch']}, {data['images']} images timed).", ""]
    return "\n".join(lines)


def write_bench(out: str | Path, records: list[dict], meta: dict, data: dict | None) -> Path:
    """Write the JSON records and bench.md into `out`; returns bench.md's path."""
    out = Path(out)
    if records:
        rundir.write_json(out / "bench.json", records)
        rundir.write_json(out / "bench_meta.json", meta)
    if data:
        rundir.write_json(out / "data.json", data)
    rundir.write_text(out / "bench.md", markdown(records, meta, data) + "\n")
    return out / "bench.md"
