"""Paired comparisons against a baseline over test images: `samfit compare RESULTS... --baseline lora`.

For every (dataset, test set, model) and every method besides the baseline, on the metric asked (default: the
dataset's headline), over the seeds both have and the images both scored (runs' per_image.csv):

- difference: method − baseline, the metric averaged over those seeds (in the metric's own units);
- CI: percentile bootstrap over test images, paired (one resample of images serves both methods and every seed),
  the metric recomputed on each resample from the per-image rows (`samfit.metrics.pooled`), so pooled metrics
  (BER, dataset IoU/Dice, mIoU) are resampled as pooled metrics;
- p-value: for a per-image mean, Wilcoxon's signed-rank test (`scipy.stats.wilcoxon`) on the per-image scores
  averaged over seeds; for a pooled metric, a paired permutation test (`scipy.stats.permutation_test`,
  permutation_type='samples': each image's rows swap between the two methods, in every seed alike);
- p_holm: Holm's step-down adjustment over every comparison of the output;
- verdict: "better" / "worse" when p_holm < 1 − confidence (the direction from the difference's sign and whether
  lower is better), otherwise "no detectable difference".

A dataset run at two or more train fractions also gets, per method, the area under its metric-vs-fraction curve
(`<metric>@area`, `samfit.report.efficiency`), compared the same way over the same test images. Ranks across
test sets are in `samfit.report.ranks`, the Bayesian signed-rank test in `samfit.report.bayes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from samfit.errors import SamfitError
from samfit.metrics.pooled import Recipe, recipe
from samfit.report.collect import read_per_image
from samfit.report.efficiency import area_metric, area_weights, split_fraction, stack_fractions
from samfit.report.ranks import GROUP, lower_is_better, method_order
RECORD_KEYS = ("dataset", "test_set", "model", "metric", "method", "baseline", "difference", "ci_low", "ci_high",
               "p_value", "p_holm", "verdict", "n_images", "seeds", "lower_is_better", "test", "fractions")


@dataclass(frozen=True)
class Settings:
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0

    def check(self) -> "Settings":
        if not 0 < self.confidence < 1:
            raise SamfitError(f"--confidence {self.confidence}: give a level between 0 and 1, e.g. 0.95.")
        if self.resamples < 100:
            raise SamfitError(f"--resamples {self.resamples}: use at least 100 (1000 or more for a stable CI).")
        return self


def resample_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n): how often each image is drawn in each bootstrap resample of n images."""
    draws = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(resamples), n), draws.ravel()), 1.0)
    return counts


def seed_difference(rec: Recipe, method: np.ndarray, base: np.ndarray, weights: np.ndarray | None = None):
    """Mean over seeds of metric(method) − metric(baseline); `method`, `base`: (seeds, images, columns) stats.
    `weights` (..., images) reweights images (bootstrap counts); without it, every image once."""
    n = method.shape[1]
    if weights is None:
        sums_m, sums_b, total = method.sum(axis=1), base.sum(axis=1), n
    else:
        sums_m = np.einsum("...n,snk->s...k", weights, method)
        sums_b = np.einsum("...n,snk->s...k", weights, base)
        total = weights.sum(axis=-1)
    return (rec.value(sums_m, total) - rec.value(sums_b, total)).mean(axis=0)


def pooled_permutation_p(rec: Recipe, method: np.ndarray, base: np.ndarray, resamples: int, rng) -> float:
    """Two-sided p of the paired permutation test: image i's rows swap between the methods (all seeds alike)."""
    n = method.shape[1]

    def statistic(x, y, axis):  # x holds image codes: i (method's rows) or n + i (swapped: baseline's)
        own = (np.moveaxis(x, axis, -1) < n).astype(np.float64)
        sums_m = np.einsum("...n,snk->s...k", own, method) + np.einsum("...n,snk->s...k", 1 - own, base)
        sums_b = np.einsum("...n,snk->s...k", own, base) + np.einsum("...n,snk->s...k", 1 - own, method)
        return (rec.value(sums_m, n) - rec.value(sums_b, n)).mean(axis=0)

    codes = np.arange(n)
    res = stats.permutation_test((codes, codes + n), statistic, permutation_type="samples", vectorized=True,
                                 n_resamples=resamples, alternative="two-sided", random_state=rng, batch=256)
    return float(res.pvalue)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Wilcoxon signed-rank p of per-image differences (1 when every difference is 0: nothing to rank)."""
    if not np.any(diffs != 0):
        return 1.0
    return float(stats.wilcoxon(diffs).pvalue)


def paired_comparison(rec: Recipe, method: np.ndarray, base: np.ndarray, settings: Settings) -> dict:
    """difference, ci_low, ci_high, p_value of `method` against `base` ((seeds, images, columns) each)."""
    rng = np.random.default_rng(settings.seed)
    difference = float(seed_difference(rec, method, base))
    boot = seed_difference(rec, method, base, resample_counts(rng, method.shape[1], settings.resamples))
    alpha = 1 - settings.confidence
    with np.errstate(all="ignore"):
        low, high = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)]) \
            if np.isfinite(boot).any() else (math.nan, math.nan)
    if rec.per_image:
        p = wilcoxon_p((method[..., 0] - base[..., 0]).mean(axis=0))
    else:
        p = pooled_permutation_p(rec, method, base, settings.resamples, rng)
    return {"difference": difference, "ci_low": float(low), "ci_high": float(high), "p_value": p,
            "test": "wilcoxon" if rec.per_image else "permutation"}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]).clip(max=1.0)
    out = np.empty(m)
    out[order] = adjusted
    return out


def verdict(difference: float, p_holm: float, lower_is_better: bool, alpha: float) -> str:
    if not (math.isfinite(difference) and math.isfinite(p_holm)):
        raise SamfitError("A comparison gave no finite difference or p-value; check the per-image rows.")
    if p_holm >= alpha or difference == 0:
        return "no detectable difference"
    return "better" if (difference < 0) == lower_is_better else "worse"


def _stats_for(group: pd.DataFrame, seeds: list, rec_of, metric: str, test_set: str, images=None):
    """(seeds, images, columns) statistics of one method's runs, aligned on `images` (default: the first's)."""
    arrays, rec = [], None
    for seed in seeds:
        runs = group[group["seed"] == seed]
        if len(runs) > 1:
            raise SamfitError(f"{runs['method'].iloc[0]} has {len(runs)} runs with seed {seed} on "
                              f"{runs['dataset'].iloc[0]}/{test_set}: {', '.join(runs['path'])}. Keep one.")
        rows = read_per_image(runs["path"].iloc[0], test_set)
        rec = rec or rec_of(metric, rows.columns)
        images = list(rows.index) if images is None else images
        if set(rows.index) != set(images):
            raise SamfitError(f"{runs['path'].iloc[0]} scored other images of '{test_set}' than the baseline "
                              f"({len(rows)} vs {len(images)}; another --limit-eval?). Compare runs on the same "
                              f"test images.")
        arrays.append(rows.loc[images, list(rec.columns)].to_numpy(dtype=np.float64))
    return np.stack(arrays), rec, images


def compare_runs(runs: pd.DataFrame, baseline: str, metric: str | None = None,
                 settings: Settings = Settings()) -> tuple[list[dict], list[str]]:
    """(records, notes): one record per (dataset, test set, model, method) against `baseline`, Holm-adjusted
    over all of them; notes name the groups that could not be compared and why."""
    settings.check()
    methods = set(runs["method"])
    if baseline not in methods:
        raise SamfitError(f"--baseline {baseline}: no runs of it here. Methods found: "
                          f"{', '.join(method_order(methods))}.")
    if len(methods) < 2:
        raise SamfitError(f"Only {baseline} ran here: nothing to compare it with. Add runs of other methods.")
    lacking = runs.loc[~runs["per_image"], "path"].drop_duplicates().tolist()
    if lacking:
        raise SamfitError(f"{len(lacking)} run(s) have no per-image rows (per_image.csv; made before per-image "
                          f"records), so no paired test is possible: {', '.join(lacking[:5])}"
                          f"{' ...' if len(lacking) > 5 else ''}. Re-run them, or leave them out.")
    records, notes = [], []
    for (dataset, test_set, model), group in runs.groupby(GROUP, sort=False):
        name = metric or group["headline"].iloc[0]
        lower = lower_is_better(group, name)
        if metric and metric not in group.columns or group[name].isna().all():
            raise SamfitError(f"Metric '{name}' is not among the scores of {dataset}/{test_set}. Its metrics: "
                              f"{', '.join(_scores(group))}.")
        base = group[group["method"] == baseline]
        if base.empty:
            notes.append(f"{dataset}/{test_set} ({model}): no {baseline} runs, not compared.")
            continue
        for method in method_order(set(group["method"]) - {baseline}):
            mine = group[group["method"] == method]
            seeds = sorted(set(mine["seed"]) & set(base["seed"]))
            if not seeds:
                raise SamfitError(f"{method} and {baseline} share no seed on {dataset}/{test_set} ({model}): "
                                  f"{method} has seeds {sorted(set(mine['seed']))}, {baseline} "
                                  f"{sorted(set(base['seed']))}. A paired comparison needs the same seeds.")
            b, rec, images = _stats_for(base, seeds, recipe, name, test_set)
            m, _, _ = _stats_for(mine, seeds, recipe, name, test_set, images)
            records.append({"dataset": dataset, "test_set": test_set, "model": model, "metric": name,
                            "method": method, "baseline": baseline, **paired_comparison(rec, m, b, settings),
                            "n_images": len(images), "seeds": [int(s) for s in seeds], "lower_is_better": lower,
                            "fractions": [split_fraction(dataset)[1]]})
    records += _area_records(runs, baseline, metric, settings, notes)
    if not records:
        raise SamfitError(f"Nothing to compare: no dataset has runs of {baseline} and another method. "
                          + " ".join(notes))
    alpha = 1 - settings.confidence
    for r, p in zip(records, holm([r["p_value"] for r in records])):
        r["p_holm"] = float(p)
        r["verdict"] = verdict(r["difference"], r["p_holm"], r["lower_is_better"], alpha)
    return [{k: r[k] for k in RECORD_KEYS} for r in records], notes


def _area_records(runs: pd.DataFrame, baseline: str, metric: str | None, settings: Settings,
                  notes: list[str]) -> list[dict]:
    """Per (dataset, test set, model) with runs at two or more train fractions: every method's area under the
    metric-vs-fraction curve (`samfit.report.efficiency`) against the baseline's, over the fractions both ran
    and the seeds both ran at every one of them, paired over the test images."""
    split = [split_fraction(d) for d in runs["dataset"]]
    frame = runs.assign(base=[d for d, _ in split], fraction=[f for _, f in split])
    records = []
    for (dataset, test_set, model), group in frame.groupby(["base", "test_set", "model"], sort=False):
        if group["fraction"].nunique() < 2:
            continue
        name = metric or group["headline"].iloc[0]
        base = group[group["method"] == baseline]
        for method in method_order(set(group["method"]) - {baseline}):
            mine = group[group["method"] == method]
            fractions = sorted(set(mine["fraction"]) & set(base["fraction"]))
            sets = [set(part.loc[part["fraction"] == f, "seed"]) for part in (mine, base) for f in fractions]
            seeds = sorted(set.intersection(*sets)) if sets else []
            if len(fractions) < 2 or not seeds:
                notes.append(f"{dataset}/{test_set} ({model}): {method} and {baseline} share "
                             f"{'no seed at every fraction' if len(fractions) > 1 else 'fewer than two fractions'}"
                             f", so no area under the fraction curve.")
                continue
            per_m, per_b, images = [], [], None
            for f in fractions:
                b, rec, images = _stats_for(base[base["fraction"] == f], seeds, recipe, name, test_set, images)
                per_b.append(b)
                per_m.append(_stats_for(mine[mine["fraction"] == f], seeds, recipe, name, test_set, images)[0])
            weights = area_weights(fractions)
            m, area_rec = stack_fractions(per_m, rec, weights)
            b, _ = stack_fractions(per_b, rec, weights)
            records.append({"dataset": dataset, "test_set": test_set, "model": model, "metric": area_metric(name),
                            "method": method, "baseline": baseline, **paired_comparison(area_rec, m, b, settings),
                            "n_images": len(images), "seeds": [int(s) for s in seeds],
                            "lower_is_better": lower_is_better(group, name), "fractions": fractions})
    return records


def _scores(group: pd.DataFrame) -> list[str]:
    skip = {"trainable", "encoder_trainable", "percent_of_sam", "train_img_per_s", "step_time_s",
            "eval_img_per_s", "peak_memory_mb", "seed", "image_size", "per_image", "lower_is_better"}
    return [c for c in group.columns if c not in skip and group[c].dtype.kind == "f" and group[c].notna().any()]


def verdict_marks(records: list[dict]) -> dict[tuple, str]:
    """(method, model, dataset, test set, metric) -> '▲' (significantly better) or '▼' (worse)."""
    sign = {"better": "▲", "worse": "▼"}
    return {(r["method"], r["model"], r["dataset"], r["test_set"], r["metric"]): sign[r["verdict"]]
            for r in records if r["verdict"] in sign}
