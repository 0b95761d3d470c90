"""Binary segmentation metrics: IoU, Dice, BER, and the SOD set (S, E, weighted F, MAE).

Inputs, per image (numpy arrays or tensors): `pred` a float map in [0, 1] (probabilities; bool is read as
0/1) and `gt` a bool or 0..255 integer mask (a 0/1 integer mask is refused as ambiguous). A pred whose size
differs from its GT's is first resized to it bilinearly (cv2), so scores are at the GT's resolution.
Every score is a fraction in [0, 1] (E-measure: see `sod`) except `ber` and `ber_per_image`, in percent.

- IoU = TP / (TP + FP + FN), Dice = 2·TP / (2·TP + FP + FN), prediction > 0.5, GT > 128.
  `*_per_image` is the mean over images (an image with empty GT and empty prediction scores 1);
  `*_dataset` pools TP/FP/FN over all images (1 when every image is empty in both).
- BER (shadow detection) by the rule of ComputeBERonSet.m, the shadow literature's MATLAB script (Vicente et
  al., ECCV 2016): pooled over the whole set, both maps on the 0-255 scale, GT positive where GT > 125 and
  predicted positive where the 8-bit prediction round(255·p) > 125 (i.e. p >= 125.5/255; the 8-bit map is the
  one a saved prediction PNG holds, `sod.to_uint8_map`): BER = 100·(1 − ½·(TP/P + TN/N)). When the set has no
  positive pixel (P = 0) the undefined TP/P term is dropped, BER = 100·(1 − TN/N); likewise BER = 100·(1 −
  TP/P) when N = 0.
- `ber_per_image`: the official Conv-LoRA code's form, 100·(1 − mean per-class accuracy) per image, averaged
  over images, with its thresholds 255·p > 125 and GT > 125; a class absent from an image's GT counts only if
  it is predicted there (accuracy 0), as torchmetrics' macro accuracy does.
- SOD metrics: see `samfit.metrics.sod`.

`BinaryEvaluator.per_image()` gives, per image, every per-image score and the counts the pooled metrics sum
(`tp`, `fp`, `tn`, `fn` at the IoU/Dice thresholds; `ber_tp`, `ber_fp`, `ber_tn`, `ber_fn` at BER's; with SOD,
E_φ's 256-point curve as `e_curve_000`..`e_curve_255`), so `samfit.metrics.pooled` recomputes any pooled metric
on any subset of images.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from torchmetrics.functional.classification import binary_stat_scores

from samfit.errors import SamfitError
from samfit.metrics.sod import SODAccumulator, to_uint8_map

BER_THRESHOLD = 125  # ComputeBERonSet.m's tsFor1, on the 0-255 scale, for GT and prediction alike
COUNT_COLUMNS = ("tp", "fp", "tn", "fn", "ber_tp", "ber_fp", "ber_tn", "ber_fn")  # per-image counts, see per_image


def to_numpy(x) -> np.ndarray:
    """A numpy array from an array-like or a tensor (any device; half precision read as float32)."""
    if torch.is_tensor(x):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _squeeze_2d(x: np.ndarray, what: str) -> np.ndarray:
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2 or x.size == 0:
        raise SamfitError(f"{what} must be a non-empty (H, W) map, got shape {x.shape}.")
    return x


def as_probability_map(pred) -> np.ndarray:
    """Check a prediction is a finite float map in [0, 1] (bool allowed) and return it as float32."""
    pred = _squeeze_2d(to_numpy(pred), "A binary prediction")
    if pred.dtype == bool:
        return pred.astype(np.float32)
    if not np.issubdtype(pred.dtype, np.floating):
        raise SamfitError(
            f"A binary prediction must be float probabilities in [0, 1] (or bool), got dtype {pred.dtype}."
        )
    pred = pred.astype(np.float32)
    if not np.isfinite(pred).all():
        raise SamfitError("A binary prediction holds NaN or infinite values.")
    if pred.min() < 0 or pred.max() > 1:
        raise SamfitError(
            f"A binary prediction must hold probabilities in [0, 1], got values in "
            f"[{pred.min():.4g}, {pred.max():.4g}] (apply a sigmoid to logits first)."
        )
    return pred


def as_gt_mask(gt) -> np.ndarray:
    """Check a GT mask (bool, or integers in 0..255) and return it as uint8 0..255."""
    gt = _squeeze_2d(to_numpy(gt), "A binary ground truth")
    if gt.dtype == bool:
        return gt.astype(np.uint8) * 255
    if not np.issubdtype(gt.dtype, np.integer):
        raise SamfitError(f"A binary ground truth must be bool or 0/255 integers, got dtype {gt.dtype}.")
    lo, hi = int(gt.min()), int(gt.max())
    if lo < 0 or hi > 255:
        raise SamfitError(f"A binary ground truth must hold values in 0..255, got [{lo}, {hi}].")
    if hi == 1:
        raise SamfitError("A binary ground truth looks like a 0/1 mask; pass it as bool or as 0/255.")
    return gt.astype(np.uint8)


def resize_to(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (H, W) = `shape` (cv2), clipped back to [0, 1]."""
    if pred.shape == tuple(shape):
        return pred
    out = cv2.resize(pred, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def _stat_scores(pred: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """[TP, FP, TN, FN] of `pred > 0.5` against the bool map `positive` (torchmetrics)."""
    stats = binary_stat_scores(
        torch.from_numpy(pred), torch.from_numpy(positive.astype(np.int64)), threshold=0.5, validate_args=False
    )
    return stats[:4].numpy().astype(np.int64)


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else float(num) / float(den)


def balanced_error_rate(tp: int, fp: int, tn: int, fn: int) -> float:
    """BER in percent from pooled counts; a class with no pixels drops out (see the module docstring)."""
    pos, neg = tp + fn, tn + fp
    rates = [tp / pos] if pos else []
    rates += [tn / neg] if neg else []
    if not rates:
        raise SamfitError("BER needs at least one pixel.")
    return 100.0 * (1.0 - sum(rates) / len(rates))


def per_image_ber(pred: np.ndarray, gt: np.ndarray) -> float:
    """The official code's BER of one image, in percent: 100·(1 − mean per-class accuracy), thresholds
    255·p > 125 and GT > 125; a class with no GT pixel and no prediction has no accuracy and drops out."""
    positive, predicted = gt > BER_THRESHOLD, pred * 255.0 > BER_THRESHOLD
    tp = int(np.count_nonzero(positive & predicted))
    fp = int(np.count_nonzero(~positive & predicted))
    fn = int(np.count_nonzero(positive & ~predicted))
    tn = positive.size - tp - fp - fn
    scores = []
    for hit, miss, false in ((tp, fn, fp), (tn, fp, fn)):  # (correct, missed, wrongly claimed) per class
        if hit + miss + false:
            scores.append(hit / (hit + miss) if hit + miss else 0.0)
    return 100.0 * (1.0 - sum(scores) / len(scores))


class BinaryEvaluator:
    """Accumulates binary metrics image by image; `compute()` returns the dict `evaluate_binary` does.

    `sod=False` skips the (slower) S/E/F^w/MAE metrics. For distributed evaluation, gather each process's
    `state()` and rebuild with `BinaryEvaluator.from_states(states)`.
    """

    def __init__(self, sod: bool = True, weighted_f_beta: float = 1.0):
        self.sod = SODAccumulator(weighted_f_beta) if sod else None
        self.iou: list[float] = []
        self.dice: list[float] = []
        self.counts = np.zeros(4, dtype=np.int64)  # TP, FP, TN, FN with GT > 128
        self.ber_counts = np.zeros(4, dtype=np.int64)  # TP, FP, TN, FN, GT > 125, round(255·p) > 125
        self.ber_images: list[float] = []
        self.image_counts: list[np.ndarray] = []  # per image: the 4 counts at GT > 128, then BER's 4

    def update(self, pred, gt) -> None:
        gt = as_gt_mask(gt)
        pred = resize_to(as_probability_map(pred), gt.shape)
        positive = gt > 128
        tp, fp, tn, fn = _stat_scores(pred, positive)
        self.iou.append(_ratio(tp, tp + fp + fn))
        self.dice.append(_ratio(2 * tp, 2 * tp + fp + fn))
        self.counts += (tp, fp, tn, fn)
        ber_counts = _stat_scores((to_uint8_map(pred) > BER_THRESHOLD).astype(np.float32), gt > BER_THRESHOLD)
        self.ber_counts += ber_counts
        self.image_counts.append(np.concatenate([(tp, fp, tn, fn), ber_counts]).astype(np.int64))
        self.ber_images.append(per_image_ber(pred, gt))
        if self.sod is not None:
            self.sod.update(pred, positive)

    def __len__(self) -> int:
        return len(self.iou)

    def state(self) -> dict:
        """Everything `compute` needs, as a picklable dict."""
        return {
            "sod": None if self.sod is None else self.sod.state(),
            "iou": list(self.iou),
            "dice": list(self.dice),
            "counts": self.counts.copy(),
            "ber_counts": self.ber_counts.copy(),
            "ber_images": list(self.ber_images),
            "image_counts": [c.copy() for c in self.image_counts],
        }

    @classmethod
    def from_states(cls, states: Sequence[dict]) -> "BinaryEvaluator":
        """Merge the states of several evaluators (e.g. one per process) into one."""
        if not states:
            raise SamfitError("BinaryEvaluator.from_states needs at least one state.")
        with_sod = [s["sod"] is not None for s in states]
        if len(set(with_sod)) != 1:
            raise SamfitError("Cannot merge BinaryEvaluator states with and without SOD metrics.")
        merged = cls(sod=False)
        if with_sod[0]:
            merged.sod = SODAccumulator.from_states([s["sod"] for s in states])
        for s in states:
            merged.iou += s["iou"]
            merged.dice += s["dice"]
            merged.counts += s["counts"]
            merged.ber_counts += s["ber_counts"]
            merged.ber_images += s["ber_images"]
            merged.image_counts += list(s["image_counts"])
        return merged

    def per_image(self) -> dict[str, np.ndarray]:
        """Columns with one entry per image, in the order scored: every per-image score and the pooled
        metrics' sufficient statistics (see the module docstring)."""
        counts = np.array(self.image_counts, dtype=np.int64).reshape(-1, 8)
        cols = {"iou_per_image": np.array(self.iou, dtype=np.float64),
                "dice_per_image": np.array(self.dice, dtype=np.float64),
                "ber_per_image": np.array(self.ber_images, dtype=np.float64)}
        if self.sod is not None:
            cols.update(self.sod.per_image())
        cols.update({name: counts[:, j] for j, name in enumerate(COUNT_COLUMNS)})
        if self.sod is not None:
            cols.update(self.sod.curve_columns())
        return cols

    def compute(self) -> dict[str, float]:
        if not self.iou:
            raise SamfitError("No images were evaluated: the binary evaluator is empty.")
        tp, fp, _, fn = (int(v) for v in self.counts)
        out = {} if self.sod is None else self.sod.compute()
        out.update(
            ber=balanced_error_rate(*(int(v) for v in self.ber_counts)),
            ber_per_image=float(np.mean(self.ber_images)),
            iou_per_image=float(np.mean(self.iou)),
            iou_dataset=_ratio(tp, tp + fp + fn),
            dice_per_image=float(np.mean(self.dice)),
            dice_dataset=_ratio(2 * tp, 2 * tp + fp + fn),
        )
        return out


def evaluate_binary(preds: Sequence, gts: Sequence, **options) -> dict[str, float]:
    """Score probability maps against binary GT masks (images may differ in size); see the module docstring.

    `options` go to `BinaryEvaluator` (`sod`, `weighted_f_beta`).
    """
    if len(preds) != len(gts):
        raise SamfitError(f"evaluate_binary got {len(preds)} predictions but {len(gts)} ground truths.")
    evaluator = BinaryEvaluator(**options)
    for pred, gt in zip(preds, gts):
        evaluator.update(pred, gt)
    return evaluator.compute()
