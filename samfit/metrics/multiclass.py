"""Multi-class semantic segmentation: dataset-level mIoU from a confusion matrix (Trans10K protocol).

IoU_c = CM[c, c] / (sum_j CM[c, j] + sum_i CM[i, c] − CM[c, c]), the counts summed over the whole set
(rows: GT, columns: prediction; pixels whose GT is `ignore_index` are left out). Background (class 0)
counts like any other class. A class absent from both the GT and the predictions of the whole set has no
IoU: it is left out of the mean, and `iou_per_class` holds None at its index (a list of `num_classes`
entries, JSON-friendly, never NaN).

`miou_trans2seg`: the convention of Trans2Seg's segmentron/utils/score.py, which the official Conv-LoRA code
copies, computed alongside: with 255 as the ignore label, a prediction at an ignored pixel still counts in
its class's union (the script masks only label -1), and IoU_c = inter_c / (union_c + 2^-52) is averaged over
all classes, so a class absent from GT and predictions counts as 0.

`per_image(classes)` gives each image's `inter_<c>`, `union_<c>` and `ignored_<c>` (predictions of c at ignored
pixels) per class c: their sums over any subset of images give that subset's mIoU (`samfit.metrics.pooled`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from samfit.errors import SamfitError
from samfit.metrics.binary import to_numpy

TRANS2SEG_EPS = 2.220446049250313e-16  # the script's eps (numpy's spacing(1))


def _as_class_map(pred, gt_shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """An (H, W) int class map, or a (C, H, W) score map reduced by argmax over C."""
    pred = to_numpy(pred)
    if pred.ndim == 3:
        if pred.shape[0] != num_classes:
            raise SamfitError(f"A (C, H, W) score map must have C = {num_classes} channels, got {pred.shape[0]}.")
        if not np.isfinite(pred).all():
            raise SamfitError("A multi-class score map holds NaN or infinite values.")
        pred = pred.argmax(axis=0)
    elif pred.ndim != 2 or not (np.issubdtype(pred.dtype, np.integer) or pred.dtype == bool):
        raise SamfitError(
            f"A multi-class prediction must be an (H, W) integer class map or a (C, H, W) score map, "
            f"got shape {pred.shape} and dtype {pred.dtype}."
        )
    if pred.shape != tuple(gt_shape):
        raise SamfitError(f"Prediction shape {pred.shape} does not match ground-truth shape {tuple(gt_shape)}.")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise SamfitError(f"Predicted classes must lie in 0..{num_classes - 1}, got [{pred.min()}, {pred.max()}].")
    return pred.astype(np.int64)


def _as_gt_map(gt, num_classes: int, ignore_index: int) -> np.ndarray:
    gt = to_numpy(gt)
    if gt.ndim != 2 or not np.issubdtype(gt.dtype, np.integer) or gt.size == 0:
        raise SamfitError(f"A multi-class ground truth must be a non-empty (H, W) integer map, got "
                          f"shape {gt.shape} and dtype {gt.dtype}.")
    bad = (gt < 0) | ((gt >= num_classes) & (gt != ignore_index))
    if bad.any():
        raise SamfitError(f"Ground-truth classes must lie in 0..{num_classes - 1} or be {ignore_index} (ignored), "
                          f"found {int(gt[bad][0])}.")
    return gt.astype(np.int64)


class MulticlassEvaluator:
    """Accumulates a (num_classes × num_classes) confusion matrix; `compute()` gives mIoU and per-class IoU.

    `state()` is the confusion matrix; `from_states` sums them (distributed evaluation).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 2:
            raise SamfitError(f"Multi-class evaluation needs num_classes >= 2, got {num_classes}.")
        if 0 <= ignore_index < num_classes:
            raise SamfitError(f"ignore_index {ignore_index} is a valid class index (0..{num_classes - 1}).")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.ignored_predictions = np.zeros(num_classes, dtype=np.int64)  # per class, at GT = ignore_index
        self.image_stats: list[np.ndarray] = []  # per image, (3, C): intersection, union, ignored predictions

    def update(self, pred, gt) -> None:
        gt = _as_gt_map(gt, self.num_classes, self.ignore_index)
        pred = _as_class_map(pred, gt.shape, self.num_classes)
        cm = multiclass_confusion_matrix(
            torch.from_numpy(pred), torch.from_numpy(gt), self.num_classes,
            ignore_index=self.ignore_index, validate_args=False,
        )
        cm = cm.numpy().astype(np.int64)
        ignored = np.bincount(pred[gt == self.ignore_index], minlength=self.num_classes).astype(np.int64)
        self.confusion += cm
        self.ignored_predictions += ignored
        inter = np.diag(cm)
        self.image_stats.append(np.stack([inter, cm.sum(axis=0) + cm.sum(axis=1) - inter, ignored]))

    def state(self) -> dict:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "confusion": self.confusion.copy(), "ignored_predictions": self.ignored_predictions.copy(),
                "image_stats": [a.copy() for a in self.image_stats]}

    @classmethod
    def from_states(cls, states: Sequence[dict]) -> "MulticlassEvaluator":
        if not states:
            raise SamfitError("MulticlassEvaluator.from_states needs at least one state.")
        merged = cls(states[0]["num_classes"], states[0]["ignore_index"])
        for s in states:
            if s["num_classes"] != merged.num_classes:
                raise SamfitError("Cannot merge MulticlassEvaluator states with different num_classes.")
            merged.confusion += s["confusion"]
            merged.ignored_predictions += s["ignored_predictions"]
            merged.image_stats += list(s["image_stats"])
        return merged

    def __len__(self) -> int:
        return len(self.image_stats)

    def per_image(self, classes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Columns with one entry per image, in the order scored: `inter_<c>`, `union_<c>`, `ignored_<c>` per
        class c (named by `classes`, else by index)."""
        names = list(classes) if classes is not None else [str(c) for c in range(self.num_classes)]
        stats = np.array(self.image_stats, dtype=np.int64).reshape(-1, 3, self.num_classes)
        return {f"{kind}_{name}": stats[:, k, c] for k, kind in enumerate(("inter", "union", "ignored"))
                for c, name in enumerate(names)}

    def compute(self) -> dict:
        cm = self.confusion
        if cm.sum() == 0:
            raise SamfitError("No labelled pixels were evaluated: the multi-class evaluator is empty.")
        inter = np.diag(cm)
        union = cm.sum(axis=0) + cm.sum(axis=1) - inter
        iou = [float(i / u) if u else None for i, u in zip(inter, union)]
        present = [v for v in iou if v is not None]
        trans2seg = inter / (union + self.ignored_predictions + TRANS2SEG_EPS)
        return {"miou": float(np.mean(present)), "miou_trans2seg": float(trans2seg.mean()), "iou_per_class": iou}


def evaluate_multiclass(preds: Sequence, gts: Sequence, num_classes: int, ignore_index: int = 255) -> dict:
    """Dataset-level mIoU (and per-class IoU) of class maps or score maps; see the module docstring."""
    if len(preds) != len(gts):
        raise SamfitError(f"evaluate_multiclass got {len(preds)} predictions but {len(gts)} ground truths.")
    evaluator = MulticlassEvaluator(num_classes, ignore_index)
    for pred, gt in zip(preds, gts):
        evaluator.update(pred, gt)
    return evaluator.compute()
