"""Across test sets: each method's average rank, the Friedman test, the Nemenyi post-hoc test and the
critical-difference diagram (Demšar, "Statistical comparisons of classifiers over multiple data sets", JMLR 2006).

A block is one (dataset, test set, model); a method's score in a block is its metric's mean over seeds, turned
so that higher is better. Ranks are 1 = best, ties averaged (`scipy.stats.rankdata`); the average rank is their
mean over the blocks. Friedman: `scipy.stats.friedmanchisquare` over the methods that ran on every block.
Nemenyi: two methods differ when |R_i − R_j| > CD = q_α √(k(k+1) / 6N) (k methods, N blocks; scikit-posthocs'
`posthoc_nemenyi_friedman`), drawn by scikit-posthocs' `critical_difference_diagram`: methods joined by a bar are
not significantly different.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from samfit.methods import ORDER
from samfit.metrics.pooled import LOWER_IS_BETTER

GROUP = ["dataset", "test_set", "model"]


def method_order(methods) -> list[str]:
    """The paper's order (decoder-only, bitfit, ...), a placement (lora@last:3) beside its method."""
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(methods, key=lambda m: (rank.get(m.partition("@")[0], len(rank)), m))


def lower_is_better(group: pd.DataFrame, name: str) -> bool:
    """Whether `name` is lower-is-better in these runs (the headline's own flag, else the metric's kind)."""
    if name == group["headline"].iloc[0]:
        return bool(group["lower_is_better"].iloc[0])
    return name in LOWER_IS_BETTER


def block_means(runs: pd.DataFrame, metric: str | None = None) -> dict[tuple, pd.Series]:
    """(dataset, test set, model) -> per method the metric's mean over seeds, higher is better (negated when
    lower is better). Blocks without the metric are left out."""
    blocks = {}
    for key, group in runs.groupby(GROUP, sort=False):
        name = metric or group["headline"].iloc[0]
        if name not in group.columns or group[name].isna().all():
            continue
        means = group.groupby("method")[name].mean()
        blocks[key] = -means if lower_is_better(group, name) else means
    return blocks


def friedman_ranks(runs: pd.DataFrame, metric: str | None = None) -> tuple[dict | None, str | None]:
    """(result, None), or (None, why not). result: methods (those on every block), average_rank, test_sets,
    the Friedman statistic and p_value, and `table` (blocks × methods, higher is better) and `blocks`."""
    blocks = block_means(runs, metric)
    shared = set.intersection(*(set(b.index) for b in blocks.values())) if blocks else set()
    if len(shared) < 3 or len(blocks) < 2:
        return None, (f"average ranks and the Friedman test need 3 or more methods on 2 or more test sets; here "
                      f"{len(shared)} method(s) ran on all of {len(blocks)} test set(s).")
    methods = method_order(shared)
    table = np.array([[blocks[k][m] for m in methods] for k in blocks], dtype=np.float64)
    ranks = stats.rankdata(-table, axis=1).mean(axis=0)
    result = stats.friedmanchisquare(*table.T)
    return {"methods": methods, "average_rank": [float(r) for r in ranks], "test_sets": len(blocks),
            "statistic": float(result.statistic), "p_value": float(result.pvalue), "table": table,
            "blocks": ["/".join(map(str, k)) for k in blocks]}, None


def nemenyi(result: dict) -> pd.DataFrame:
    """Nemenyi's pairwise p-values (methods × methods) after the Friedman test, by scikit-posthocs."""
    import scikit_posthocs as sp

    frame = pd.DataFrame(result["table"], columns=result["methods"])
    return sp.posthoc_nemenyi_friedman(frame)


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Demšar's CD = q_α √(k(k+1) / 6N), q_α the studentized range quantile over √2."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6 * n)))


def cd_diagram(result: dict, path: str | Path, alpha: float = 0.05) -> Path:
    """Write the critical-difference diagram (PNG): average ranks on an axis, bars joining the methods whose
    Nemenyi p is at least alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scikit_posthocs as sp

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks = pd.Series(result["average_rank"], index=result["methods"])
    k, n = len(ranks), result["test_sets"]
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.3 * k), dpi=110)
    sp.critical_difference_diagram(ranks, nemenyi(result), ax=ax, alpha=alpha)
    ax.set_title(f"average rank over {n} test sets (1 = best), Friedman p = {result['p_value']:.3g}\n"
                 f"bars join methods with no significant difference (Nemenyi, α = {alpha:g}, CD = "
                 f"{critical_difference(k, n, alpha):.2f})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
