"""Inference at plain SAM's cost: evaluation images/s of a LoRA run merged into SAM's weights (what `samfit
predict` and `samfit evaluate` run), of a decoder-only run (plain SAM's encoder: the baseline) and of the same
LoRA run unmerged (its LoRALinear layers kept: the contrast), side by side in one process.

Two short runs are trained through the real engine (`samfit.engine.train.run`, one step each) from a randomly
initialised SAM checkpoint written once into --out (SAM's weights do not change the cost of a forward pass), then
loaded with `samfit.load_run`. Each repeat times --batches forward passes of every model on the same batch, the
models interleaved (so a change in machine load hits all three alike); the report gives each model's median
images/s over the repeats and the median over the repeats of each repeat's ratio to decoder-only, by the wall
clock and by the process's CPU time.

    python benchmarks/bench_merged_inference.py --out results/perf/merged --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from random_sam import random_checkpoint  # benchmarks/random_sam.py (scripts run from their folder)



def train(method: str, args, checkpoint: Path) -> Path:
    from samfit.config import make_config
    from samfit.engine.train import run

    return run(make_config(method=method, dataset="shapes", model=args.model, checkpoint=str(checkpoint),
                           image_size=args.image_size, epochs=1, limit_train=2, limit_eval=1, batch_size=2,
                           effective_batch=2, lr=1e-2, device="cpu", out=str(Path(args.out) / "runs"),
                           data_root=str(Path(args.out) / "data")), quiet=True)


@torch.no_grad()
def images_per_second(model, batch: torch.Tensor, batches: int) -> tuple[float, float]:
    """(images/s by the wall clock, images/s by this process's CPU time: with one thread, what a shared machine's
    other load changes least)."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        model(batch)
    images = batches * batch.shape[0]
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def main() -> None:
    import samfit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/perf/merged")
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=3, help="forward passes per model per repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    checkpoint = random_checkpoint(Path(args.out) / f"sam_{args.model}_random.pth", args.model)
    lora, decoder_only = train("lora", args, checkpoint), train("decoder-only", args, checkpoint)
    models = {"lora_merged": samfit.load_run(lora, device="cpu", merge=True),
              "decoder_only": samfit.load_run(decoder_only, device="cpu"),
              "lora_unmerged": samfit.load_run(lora, device="cpu")}
    batch = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the merge changes no output beyond fp32 rounding
        reference = models["lora_unmerged"](batch)["logits"]
        drift = ((models["lora_merged"](batch)["logits"] - reference).norm() / reference.norm()).item()
    for model in models.values():  # warm-up: first-call allocations out of the timings
        images_per_second(model, batch, 1)
    names = list(models)
    samples = {clock: {name: [] for name in names} for clock in ("wall", "cpu")}
    for repeat in range(args.repeats):  # the order rotates, so no model always runs first after another
        for name in names[repeat % 3:] + names[:repeat % 3]:
            wall, cpu = images_per_second(models[name], batch, args.batches)
            samples["wall"][name].append(wall)
            samples["cpu"][name].append(cpu)
    median = {clock: {name: statistics.median(v) for name, v in by_name.items()} for clock, by_name in samples.items()}
    ratios = {clock: {  # per repeat, then the median: robust to load drift
        f"{name}_vs_decoder_only": statistics.median(a / b for a, b in zip(by_name[name], by_name["decoder_only"]))
        for name in ("lora_merged", "lora_unmerged")} for clock, by_name in samples.items()}
    result = {
        "model": args.model, "image_size": args.image_size, "batch": args.batch, "batches": args.batches,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "eval_img_per_s_median": median, "median_ratio_per_repeat": ratios, "eval_img_per_s": samples,
        "merged_logits_relative_change": drift,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    (Path(args.out) / "merged_inference.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
