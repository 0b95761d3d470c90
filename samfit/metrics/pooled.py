"""Every metric recomputed from per-image rows (per_image.csv), on any subset or resample of the images.

A metric is either a per-image mean (IoU/Dice per image, S_α, E_φ mean and adaptive, F^w_β, MAE, the official
per-image BER: the column of that name, averaged) or pooled from summed statistics: `iou_dataset` and
`dice_dataset` from `tp`, `fp`, `fn`; `ber` from `ber_tp`, `ber_fp`, `ber_tn`, `ber_fn`; `e_measure_max` from the
E_φ curve columns `e_curve_000`..; `miou` from `inter_<c>` and `union_<c>`; `miou_trans2seg` also from
`ignored_<c>`. The formulas are the evaluators' (samfit.metrics.binary, .multiclass), vectorised: `value`
takes statistics summed over images with any leading batch axes, e.g. one row per bootstrap resample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from samfit.errors import SamfitError
from samfit.metrics.multiclass import TRANS2SEG_EPS

MEAN_METRICS = ("iou_per_image", "dice_per_image", "ber_per_image", "s_measure", "e_measure_mean",
                "e_measure_adaptive", "weighted_f", "weighted_f_beta2_0.3", "mae")
POOLED_METRICS = ("iou_dataset", "dice_dataset", "ber", "e_measure_max", "miou", "miou_trans2seg")
LOWER_IS_BETTER = frozenset({"mae", "ber", "ber_per_image"})


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den == 0, 1.0, num / np.where(den == 0, 1, den))


def _ber(s: np.ndarray) -> np.ndarray:
    tp, fp, tn, fn = (s[..., j] for j in range(4))
    pos, neg = tp + fn, tn + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(pos > 0, tp / np.where(pos > 0, pos, 1), 0.0) + \
            np.where(neg > 0, tn / np.where(neg > 0, neg, 1), 0.0)
        return 100.0 * (1.0 - rates / ((pos > 0).astype(int) + (neg > 0)))


def _miou(s: np.ndarray, classes: int) -> np.ndarray:
    inter, union = s[..., :classes], s[..., classes:2 * classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
        present = (union > 0).sum(axis=-1)
        return np.where(present > 0, np.nansum(iou, axis=-1) / np.maximum(present, 1), np.nan)


def _trans2seg(s: np.ndarray, classes: int) -> np.ndarray:
    inter, union, ignored = (s[..., k * classes:(k + 1) * classes] for k in range(3))
    return (inter / (union + ignored + TRANS2SEG_EPS)).mean(axis=-1)


@dataclass(frozen=True)
class Recipe:
    """How to get `metric` from per-image rows: sum `columns` over the images, then `value(sums, n)`."""

    metric: str
    columns: tuple[str, ...]
    per_image: bool  # a mean of one per-image score (a paired test on those scores applies)

    def value(self, sums: np.ndarray, n) -> np.ndarray:
        """The metric from `sums` (..., len(columns)), the statistics summed over `n` images."""
        sums = np.asarray(sums, dtype=np.float64)
        m = self.metric
        if self.per_image:
            return sums[..., 0] / n
        if m == "iou_dataset":
            tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
            return _ratio(tp, tp + fp + fn)
        if m == "dice_dataset":
            tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
            return _ratio(2 * tp, 2 * tp + fp + fn)
        if m == "ber":
            return _ber(sums)
        if m == "e_measure_max":
            return (sums / np.expand_dims(np.asarray(n, dtype=np.float64), -1)).max(axis=-1)
        if m == "miou":
            return _miou(sums, len(self.columns) // 2)
        return _trans2seg(sums, len(self.columns) // 3)

    def from_rows(self, stats: np.ndarray) -> float:
        """The metric over all rows of `stats` (images × columns)."""
        return float(self.value(stats.sum(axis=0), len(stats)))


def recipe(metric: str, columns: Sequence[str]) -> Recipe:
    """The recipe of `metric` for per-image rows with these `columns`; a SamfitError when they lack it."""
    columns = list(columns)
    if metric in MEAN_METRICS:
        needed = [metric]
    elif metric in ("iou_dataset", "dice_dataset"):
        needed = ["tp", "fp", "fn"]
    elif metric == "ber":
        needed = ["ber_tp", "ber_fp", "ber_tn", "ber_fn"]
    elif metric == "e_measure_max":
        needed = [c for c in columns if c.startswith("e_curve_")] or ["e_curve_000"]
    elif metric in ("miou", "miou_trans2seg"):
        classes = [c[len("inter_"):] for c in columns if c.startswith("inter_")] or ["<class>"]
        kinds = ("inter", "union") + (("ignored",) if metric == "miou_trans2seg" else ())
        needed = [f"{k}_{c}" for k in kinds for c in classes]
    else:
        raise SamfitError(f"Metric '{metric}' cannot be recomputed from per-image rows. Known: "
                          f"{', '.join(MEAN_METRICS + POOLED_METRICS)}.")
    missing = [c for c in needed if c not in columns]
    if missing:
        raise SamfitError(f"Metric '{metric}' needs the per-image column(s) {', '.join(missing[:4])}, which these "
                          f"rows lack (a metric of another task, or of SOD metrics not computed).")
    return Recipe(metric, tuple(needed), metric in MEAN_METRICS)


def recompute(rows, metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Every metric (or those asked) recomputable from these rows (a DataFrame of one test set's images)."""
    names = metrics or [m for m in MEAN_METRICS + POOLED_METRICS if _has(m, rows.columns)]
    out = {}
    for m in names:
        r = recipe(m, rows.columns)
        out[m] = r.from_rows(rows[list(r.columns)].to_numpy(dtype=np.float64))
    return out


def _has(metric: str, columns) -> bool:
    try:
        recipe(metric, columns)
    except SamfitError:
        return False
    return True
