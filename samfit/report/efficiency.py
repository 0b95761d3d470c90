"""Data efficiency: the area under the metric-vs-training-fraction curve (runs differing in `--train-fraction`).

For fractions f_0 < ... < f_K and the metric's values y_k at each, the area is the trapezoid rule on a linear
fraction axis divided by the fraction range, i.e. the curve's mean value over [f_0, f_K]:

    A = Σ_k (f_{k+1} − f_k) (y_k + y_{k+1}) / 2 / (f_K − f_0) = Σ_k w_k y_k,
    w_0 = (f_1 − f_0) / 2R, w_k = (f_{k+1} − f_{k−1}) / 2R, w_K = (f_K − f_{K−1}) / 2R, R = f_K − f_0,

in the metric's own units (so an area compares like the metric; higher or lower is better as for the metric).
The test images do not change with the fraction, so `samfit compare` pairs areas over them like any metric: a
per-image mean's area is the mean of per-image areas Σ_k w_k s_{k,i} (Wilcoxon applies); a pooled metric's area
is recomputed from the summed statistics at every fraction (`AreaRecipe`: bootstrap and permutation apply).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

FRACTION = re.compile(r"^(?P<dataset>.*)@f(?P<fraction>[0-9.e-]+)$")  # collect's 'polyp@f0.25'
AREA = "@area"  # a metric's area under the fraction curve: 'iou_per_image@area'


def split_fraction(dataset: str) -> tuple[str, float]:
    """'polyp@f0.25' -> ('polyp', 0.25); 'polyp' -> ('polyp', 1.0)."""
    m = FRACTION.match(dataset)
    return (m.group("dataset"), float(m.group("fraction"))) if m else (dataset, 1.0)


def area_weights(fractions) -> np.ndarray:
    """w with Σ_k w_k y_k = the trapezoid area under y over `fractions` (increasing) ÷ their range."""
    f = np.asarray(fractions, dtype=np.float64)
    if len(f) < 2 or np.any(np.diff(f) <= 0):
        raise ValueError(f"area_weights needs two or more increasing fractions, got {f.tolist()}")
    w = np.zeros_like(f)
    w[:-1] += np.diff(f) / 2
    w[1:] += np.diff(f) / 2
    return w / (f[-1] - f[0])


def area(fractions, values) -> float:
    """The area under `values` over `fractions` ÷ the fraction range (the curve's mean value)."""
    return float(area_weights(fractions) @ np.asarray(values, dtype=np.float64))


def area_metric(metric: str) -> str:
    return f"{metric}{AREA}"


def base_metric(metric: str) -> str:
    """'iou_per_image@area' -> 'iou_per_image' (a plain metric is itself)."""
    return metric[:-len(AREA)] if metric.endswith(AREA) else metric


@dataclass(frozen=True)
class AreaRecipe:
    """A pooled metric's area: the statistics of every fraction side by side (fraction k's columns are
    `width` wide from k * width); `value` recomputes the metric at each fraction and weighs them."""

    recipe: object  # samfit.metrics.pooled.Recipe of the metric
    weights: tuple[float, ...]
    per_image: bool = False

    @property
    def width(self) -> int:
        return len(self.recipe.columns)

    def value(self, sums: np.ndarray, n) -> np.ndarray:
        sums = np.asarray(sums, dtype=np.float64)
        return sum(w * self.recipe.value(sums[..., k * self.width:(k + 1) * self.width], n)
                   for k, w in enumerate(self.weights))


def stack_fractions(per_fraction: list[np.ndarray], recipe, weights: np.ndarray):
    """(stats, recipe) for the area from each fraction's (seeds, images, columns) statistics: a per-image
    mean's area as one per-image column (Σ_k w_k s_k, its own recipe), a pooled one's as AreaRecipe."""
    if recipe.per_image:
        return sum(w * s[..., :1] for w, s in zip(weights, per_fraction)), recipe
    return np.concatenate(per_fraction, axis=-1), AreaRecipe(recipe, tuple(float(w) for w in weights))
