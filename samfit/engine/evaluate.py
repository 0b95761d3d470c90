"""Evaluation: predictions scored at the ground truth's own resolution (default) or at the model's input
resolution (`eval_resolution="model"`, the official Conv-LoRA code's protocol).

`evaluate(..., per_image=rows)` also appends one row per image (`image`, every per-image score and the pooled
metrics' sufficient statistics, see `samfit.metrics.pooled`) in dataset order, under DDP too (each rank's rows
are gathered with the evaluator states); a run writes them to per_image.csv (`per_image_csv`)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch.utils.data import DataLoader

from samfit.engine.profile import Timer
from samfit.metrics import BinaryEvaluator, MulticlassEvaluator


def make_evaluator(spec):
    if spec.task == "binary":
        sod = any(m in spec.metrics for m in ("s_measure", "e_measure_mean", "weighted_f", "mae"))
        return BinaryEvaluator(sod=sod)
    return MulticlassEvaluator(spec.num_classes)


@torch.no_grad()
def predict_batches(model, dataset, indices, batch_size, device, autocast, num_workers=0):
    """Yield (index, probability or class-score map (C, S, S) on CPU) for the given dataset indices."""
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                        num_workers=num_workers)
    for images, _, idx in loader:
        with autocast():
            logits = model(images.to(device, non_blocking=True))["logits"]
        scores = logits.float().sigmoid() if logits.shape[1] == 1 else logits.float()
        for i, s in zip(idx.tolist(), scores.cpu()):
            yield i, s


def score_at(scores: torch.Tensor, gt: np.ndarray, resolution: str, image_size: int):
    """Bring a prediction and its GT to one resolution: the GT's (upsample the prediction, bilinear) or the
    model's (resize the GT, nearest)."""
    if resolution == "gt":
        scores = F.interpolate(scores[None], size=gt.shape[:2], mode="bilinear", align_corners=False)[0]
    else:
        import cv2

        gt = cv2.resize(gt.astype(np.uint8), (image_size, image_size), interpolation=cv2.INTER_NEAREST)
    if scores.shape[0] == 1:
        return scores[0].numpy(), gt.astype(bool)
    return scores.argmax(0).numpy().astype(np.int64), gt


def evaluate(model, dataset, spec, cfg, device, autocast=contextlib.nullcontext, indices=None,
             progress: Progress | None = None, label: str = "eval", gather=None,
             per_image: list | None = None) -> tuple[dict, Timer]:
    """Score `dataset` (all indices, or this rank's share) and return (metrics, timer).

    `gather(obj) -> list[obj]` merges evaluator states across processes under DDP. `per_image`: a list to
    extend with the per-image rows (see the module docstring)."""
    was_training = model.training
    model.eval()
    evaluator = make_evaluator(spec)
    indices = list(range(len(dataset))) if indices is None else indices
    timer = Timer(device)
    task = progress.add_task(label, total=len(indices), info="") if progress else None
    scored = []  # dataset indices, in the evaluator's order
    stream = predict_batches(model, dataset, indices, cfg.batch_size, device, autocast, cfg.num_workers)
    while True:
        with timer:
            item = next(stream, None)
        if item is None:
            timer.durations.pop()
            break
        index, scores = item
        timer.add_images(1)
        scored.append(index)
        evaluator.update(*score_at(scores, dataset.gt(index), cfg.eval_resolution, cfg.image_size))
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    model.train(was_training)
    if gather is not None:
        parts = gather({"state": evaluator.state(), "indices": scored})
        evaluator = type(evaluator).from_states([part["state"] for part in parts])
        scored = [i for part in parts for i in part["indices"]]
    result = evaluator.compute()
    if "iou_per_class" in result:
        result["iou_per_class"] = dict(zip(spec.classes, result["iou_per_class"]))
    if per_image is not None:
        per_image.extend(per_image_rows(evaluator, spec, dataset, scored))
    return result, timer


def image_name(dataset, index: int) -> str:
    """How per_image.csv names an image: its file name (the same for every run on the dataset)."""
    pairs = getattr(dataset, "pairs", None)
    return Path(pairs[index][0]).name if pairs is not None else str(index)


def per_image_rows(evaluator, spec, dataset, indices: list[int]) -> list[dict]:
    """One dict per image (`image` first), sorted by dataset index, from a filled evaluator."""
    cols = evaluator.per_image(spec.classes) if spec.task != "binary" else evaluator.per_image()
    rows = [{"image": image_name(dataset, i), **{k: v[j].item() for k, v in cols.items()}}
            for j, i in enumerate(indices)]
    order = sorted(range(len(indices)), key=indices.__getitem__)
    return [rows[j] for j in order]


def per_image_csv(rows: list[dict]) -> str:
    """per_image.csv's text (floats as their shortest repr, which `pandas.read_csv` reads back bit for bit)."""
    import pandas as pd

    return pd.DataFrame(rows).to_csv(index=False)
