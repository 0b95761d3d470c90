"""Training with and without the cache, through `samfit run` (the real engine path): decoder-only's embedding
cache by default, the prefix cache with a late placement (`--method lora --blocks last:3`).

SAM's weights do not change the cost of a step, so a randomly initialised SAM checkpoint (written once into
--out) stands in for the official file. Both runs use the same settings; the script reports every epoch's
wall time (history.csv), the cache's build time and size (metrics.json), the speed-up of the epochs after
the first (median uncached / median cached), and whether the two runs ended with the same scores.

    python benchmarks/bench_cache.py --out results/perf/cache --threads 1
    python benchmarks/bench_cache.py --out results/perf/prefix --method lora --blocks last:3 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from random_sam import random_checkpoint  # benchmarks/random_sam.py (scripts run from their folder)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/perf/cache")
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--limit-train", type=int, default=16)
    ap.add_argument("--limit-eval", type=int, default=8)
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--method", default="decoder-only")
    ap.add_argument("--blocks", default=None, help="placement, e.g. last:3 (the prefix cache)")
    args = ap.parse_args()

    out = Path(args.out)
    checkpoint = random_checkpoint(out / f"sam_{args.model}_random.pth", args.model)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    runs = {}
    for cache in ("off", "on"):
        placement = ["--method-arg", f"blocks={args.blocks}"] if args.blocks else []
        cmd = [sys.executable, "-m", "samfit", "run", "--method", args.method, *placement, "--model", args.model,
               "--checkpoint", str(checkpoint), "--dataset", args.dataset, "--image-size", str(args.image_size),
               "--epochs", str(args.epochs), "--limit-train", str(args.limit_train), "--limit-eval",
               str(args.limit_eval), "--batch-size", str(args.batch), "--effective-batch", str(2 * args.batch),
               "--device", "cpu", "--cache-embeddings", cache, "--out", str(out), "--name", f"cache-{cache}"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        folder = out / f"cache-{cache}"
        runs[cache] = {"epochs": pd.read_csv(folder / "history.csv")["epoch_time_s"].tolist(),
                       "metrics": json.loads((folder / "metrics.json").read_text())}
    off, on = runs["off"]["epochs"], runs["on"]["epochs"]
    report = runs["on"]["metrics"]["embedding_cache"]
    result = {
        "method": args.method, "blocks": args.blocks, "model": args.model, "image_size": args.image_size, "batch": args.batch, "dataset": args.dataset,
        "train_images": args.limit_train, "val_images": args.limit_eval, "threads": args.threads,
        "uncached_epoch_s": off, "cached_epoch_s": on, "cache": report,
        "speedup_after_first": statistics.median(off[1:]) / statistics.median(on[1:]),
        "speedup_first_with_build": off[0] / (on[0] + report["build_time_s"]),
        "same_scores": runs["off"]["metrics"]["scores"] == runs["on"]["metrics"]["scores"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    (out / "cache.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
