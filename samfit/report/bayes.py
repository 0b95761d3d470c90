"""The Bayesian signed-rank test across test sets (Benavoli et al., "Time for a change: a tutorial for comparing
multiple classifiers through Bayesian analysis", JMLR 2017), by baycomp: `samfit compare --rope 0.5`.

For every method against the baseline, over the test sets (dataset, test set, model) both ran: d_j = method −
baseline, the metric's mean over seeds in the table's units (`display_scale`: IoU, Dice, S_α ... ×100, BER in
%), turned so that d_j > 0 means the method is better. A Dirichlet process posterior on the distribution of d
(prior strength 0.5 at d = 0) gives the probabilities that a difference falls below −rope (the method is
worse), inside [−rope, rope] (practically equivalent) or above rope (better): `baycomp.SignedRankTest`,
whose left / rope / right are P(better) / P(equivalent) / P(worse) with the method as its first argument.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from samfit.errors import SamfitError
from samfit.report.ranks import GROUP, block_means, method_order

SAMPLES = 50000


def check_rope(rope: float) -> float:
    if not (rope >= 0 and np.isfinite(rope)):
        raise SamfitError(f"--rope {rope:g}: give the half-width of practical equivalence in the table's units "
                          f"(points: 0.5 = half an IoU point), 0 or more.")
    return rope


def block_differences(runs: pd.DataFrame, baseline: str, metric: str | None = None) -> dict[str, pd.DataFrame]:
    """method -> a frame indexed by test set with the method's and the baseline's means (columns `method`,
    `baseline`) in table units, higher is better."""
    from samfit.report.table import display_scale

    out: dict[str, list] = {}
    names = {key: metric or group["headline"].iloc[0] for key, group in runs.groupby(GROUP, sort=False)}
    for key, means in block_means(runs, metric).items():
        if baseline not in means.index:
            continue
        factor = display_scale(names[key])[0]
        for method in means.index.drop(baseline):
            out.setdefault(method, []).append(("/".join(map(str, key)), means[method] * factor,
                                               means[baseline] * factor))
    return {m: pd.DataFrame(rows, columns=["test set", "method", "baseline"]).set_index("test set")
            for m, rows in out.items()}


def signed_rank(runs: pd.DataFrame, baseline: str, rope: float, metric: str | None = None,
                seed: int = 0, samples: int = SAMPLES) -> tuple[list[dict], list[str]]:
    """(records, notes): per method with 2 or more test sets shared with the baseline: p_better,
    p_equivalent, p_worse, the test sets and the rope (table units)."""
    import baycomp

    check_rope(rope)
    records, notes = [], []
    diffs = block_differences(runs, baseline, metric)
    for method in method_order(diffs):
        frame = diffs[method]
        if len(frame) < 2:
            notes.append(f"{method}: shares {len(frame)} test set with {baseline}; the Bayesian signed-rank test "
                         f"across test sets needs 2 or more.")
            continue
        x, y = frame["method"].to_numpy(np.float64), frame["baseline"].to_numpy(np.float64)
        probs = baycomp.SignedRankTest.probs(x, y, rope, nsamples=samples, random_state=seed)
        if rope == 0:  # baycomp gives (left, right) without a rope
            probs = (probs[0], 0.0, probs[1])
        records.append({"method": method, "baseline": baseline, "rope": rope, "test_sets": len(frame),
                        "mean_difference": float((x - y).mean()), "p_better": float(probs[0]),
                        "p_equivalent": float(probs[1]), "p_worse": float(probs[2])})
    return records, notes
