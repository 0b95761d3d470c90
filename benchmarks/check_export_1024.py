"""The export check at full strength for every method it names (the test suite runs it for LoRA and checks SSF and
BitFit on their weights, since a ViT-B forward at 1024 px costs ~14 s of CPU): for each method, a ViT-B run from a
randomly initialised checkpoint in the official key layout, trained two steps at 256 px, is exported with `samfit
export --format sam`; segment_anything loads the file strictly; SamPredictor embeds a test image with it and
segments one box per ground-truth object; the embedding is compared with `load_run(run, image_size=1024)`'s
encoder (unmerged: the run's own layers) on the same preprocessed input, as a relative L2 error (the issue's bound:
1e-4 in fp32), and with plain SAM's, to show the trained change is far larger. Optionally (--box-eval) a
decoder-only run's `samfit evaluate --prompts box`: its encoder is SAM's, so the change must be ~0.

    python benchmarks/check_export_1024.py --out results/perf/export_check --threads 1
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from random_sam import random_checkpoint  # benchmarks/random_sam.py (scripts run from their folder)



def train(method: str, out: Path, checkpoint: Path) -> Path:
    from samfit.config import make_config
    from samfit.engine.train import run

    return run(make_config(method=method, dataset="shapes", model="vit_b", checkpoint=str(checkpoint),
                           image_size=256, epochs=1, limit_train=4, limit_eval=1, batch_size=2, effective_batch=2,
                           lr=1e-2, device="cpu", out=str(out / "runs"), data_root=str(out / "data")), quiet=True)


def check(method: str, folder: Path, out: Path, checkpoint: Path) -> dict:
    from segment_anything import SamPredictor, sam_model_registry

    import samfit
    from samfit.use.export import export_run
    from samfit.use.promptable import component_boxes

    start = time.process_time()
    sam = sam_model_registry["vit_b"](checkpoint=str(export_run(folder, out / f"{method}_sam.pth"))).eval()
    data = folder.parents[1] / "data" / "shapes" / "test"
    image_path = sorted((data / "images").iterdir())[0]
    image = np.ascontiguousarray(cv2.imread(str(image_path))[..., ::-1])
    gt = cv2.imread(str(data / "masks" / f"{image_path.stem}.png"), cv2.IMREAD_UNCHANGED) > 127
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    x = sam.preprocess(torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None].float())
    loaded = samfit.load_run(folder, device="cpu", image_size=1024)
    plain = sam_model_registry["vit_b"](checkpoint=str(checkpoint)).eval()
    with torch.no_grad():
        expected, untrained = loaded.image_encoder(x), plain.image_encoder(x)
    masks = [predictor.predict(box=box, multimask_output=False)[0][0] for box in component_boxes(gt)]
    union = np.any(masks, axis=0)
    relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"method": method, "relative_l2_exported_vs_load_run": relative(predictor.features, expected),
            "relative_l2_plain_sam_vs_load_run": relative(untrained, expected),
            "within_1e-4": relative(predictor.features, expected) <= 1e-4,
            "box_iou_exported": float((union & gt).sum() / (union | gt).sum()), "boxes": len(masks),
            "cpu_s": time.process_time() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/perf/export_check")
    ap.add_argument("--methods", default="lora,ssf,bitfit")
    ap.add_argument("--box-eval", action="store_true", help="also a decoder-only run's --prompts box evaluation")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    checkpoint = random_checkpoint(out / "sam_vit_b_random.pth", "vit_b", draw_positions=True)
    results = []
    for method in args.methods.split(","):
        results.append(check(method, train(method, out, checkpoint), out, checkpoint))
        print(json.dumps(results[-1]), flush=True)
    if args.box_eval:
        from samfit.engine.rundir import read_json
        from samfit.use.evaluate import evaluate_run

        folder = train("decoder-only", out, checkpoint)
        path = evaluate_run(folder, str(out / "data" / "shapes"), limit=1, device="cpu", prompts="box")
        results.append({"method": "decoder-only", "box_eval": read_json(path)["scores"]["test"]})
        print(json.dumps(results[-1]), flush=True)
    (out / "export_check.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
