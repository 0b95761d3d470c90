"""Across test sets and fractions: average ranks, Friedman and Nemenyi against scipy and Demšar's formulas, the
critical-difference diagram, baycomp's Bayesian signed-rank, and the area under the fraction curve against
numpy.trapezoid and scipy."""
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from samfit.errors import SamfitError
from samfit.report.collect import collect_runs
from samfit.report.efficiency import area, area_weights
from samfit.report.ranks import block_means, critical_difference, friedman_ranks, nemenyi
from test_compare import image_rows, write_run

# Mean scores (×100) of four methods on six datasets: conv-lora ahead, decoder-only behind, lora and bitfit
# swapping, one tie (blobs4: lora = bitfit).
SCORES = {"blobs0": (60, 70, 71, 80), "blobs1": (61, 72, 70, 79), "blobs2": (58, 69, 73, 81),
          "blobs3": (62, 74, 72, 78), "blobs4": (59, 71, 71, 82), "blobs5": (63, 70, 75, 77)}
METHODS = ("decoder-only", "bitfit", "lora", "conv-lora")


@pytest.fixture
def ranked(tmp_path):
    root = tmp_path / "ranked"
    rng = np.random.default_rng(0)
    for dataset, scores in SCORES.items():
        for method, score in zip(METHODS, scores):
            write_run(root, method, 0, image_rows(rng, 6, 1).assign(iou_per_image=score / 100), dataset=dataset)
    return root


def test_ranks_friedman_and_nemenyi_against_independent_formulas(ranked):
    result, why = friedman_ranks(collect_runs(ranked))
    assert why is None and result["methods"] == list(METHODS) and result["test_sets"] == 6
    table = np.array(list(SCORES.values()), dtype=np.float64)
    ranks = np.array([stats.rankdata(-row) for row in table])  # 1 = best, ties averaged
    assert result["average_rank"] == pytest.approx(ranks.mean(axis=0).tolist())
    assert result["average_rank"][1] == pytest.approx((3 + 2 + 3 + 2 + 2.5 + 3) / 6)  # bitfit, tie at blobs4
    expected = stats.friedmanchisquare(*table.T)
    assert result["statistic"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    # Friedman's statistic by its formula, with the tie correction (one tie of two at blobs4)
    k, n = 4, 6
    sums = ranks.sum(axis=0)
    chi2 = (12 / (n * k * (k + 1)) * (sums ** 2).sum() - 3 * n * (k + 1)) / (1 - (2 ** 3 - 2) / (n * k * (k ** 2 - 1)))
    assert result["statistic"] == pytest.approx(chi2, rel=1e-12)
    assert result["p_value"] == pytest.approx(stats.chi2.sf(chi2, k - 1), rel=1e-12)
    # Demšar (2006), Table 5: q_0.05 = 2.569 for k = 4; CD = q √(k(k+1) / 6N)
    cd = 2.569 * np.sqrt(k * (k + 1) / (6 * n))
    assert critical_difference(k, n) == pytest.approx(cd, abs=1e-3)
    p = nemenyi(result)
    mean = dict(zip(METHODS, result["average_rank"]))
    for a in METHODS:
        for b in METHODS:
            if a != b:
                assert (p.loc[a, b] < 0.05) == (abs(mean[a] - mean[b]) > cd), (a, b)
    assert p.loc["decoder-only", "conv-lora"] < 0.05 and p.loc["lora", "bitfit"] > 0.05


def test_cd_diagram_png_from_compare(cli, ranked, tmp_path):
    import matplotlib
    import matplotlib.image

    png = tmp_path / "cd" / "cd.png"
    code, out, message = cli("compare", ranked, "--format", "markdown", "--resamples", "100", "--cd-diagram", png)
    assert code == 0, message
    assert matplotlib.get_backend().lower() == "agg"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 50 and image.shape[1] > 300 and image[..., :3].std() > 0.05  # drawn, not blank
    assert "Friedman test over 6 test sets and 4 methods" in out
    alone = tmp_path / "alone"
    write_run(alone, "lora", 0, image_rows(np.random.default_rng(1), 6, 1))
    write_run(alone, "bitfit", 0, image_rows(np.random.default_rng(2), 6, 1))
    code, _, message = cli("compare", alone, "--cd-diagram", tmp_path / "x.png", "--resamples", "100")
    assert code == 2 and "3 or more methods on 2 or more test sets" in message


def test_bayesian_signed_rank_equals_baycomp(cli, ranked):
    import baycomp

    from samfit.report.bayes import signed_rank

    # rope 0.3: no pairwise sum of these whole-point differences lands on 2 × rope, where float rounding of
    # score / 100 × 100 would decide baycomp's tie rule
    records, notes = signed_rank(collect_runs(ranked), "lora", 0.3, seed=3, samples=5000)
    assert notes == [] and [r["method"] for r in records] == ["decoder-only", "bitfit", "conv-lora"]
    table = pd.DataFrame(SCORES, index=METHODS).T.astype(np.float64)
    for r in records:
        expected = baycomp.two_on_multiple(table[r["method"]].to_numpy(), table["lora"].to_numpy(), 0.3,
                                           nsamples=5000, random_state=3)
        assert (r["p_better"], r["p_equivalent"], r["p_worse"]) == pytest.approx(expected, abs=1e-12)
        assert r["p_better"] + r["p_equivalent"] + r["p_worse"] == pytest.approx(1)
        assert r["test_sets"] == 6
    by = {r["method"]: r for r in records}
    assert by["conv-lora"]["p_better"] > 0.9 and by["decoder-only"]["p_worse"] > 0.9
    code, out, message = cli("compare", ranked, "--format", "markdown", "--resamples", "100", "--rope", "0.5")
    assert code == 0 and "P(equivalent)" in out and "rope ±0.5" in out, message
    code, _, message = cli("compare", ranked, "--rope", "-1", "--resamples", "100")
    assert code == 2 and "--rope -1" in message
    few, notes = signed_rank(collect_runs(ranked / "blobs0_lora_tiny_64_s0").pipe(
        lambda f: pd.concat([f, collect_runs(ranked / "blobs0_bitfit_tiny_64_s0")])), "lora", 0.5)
    assert few == [] and "needs 2 or more" in notes[0]


def test_lower_is_better_turns_the_sign():
    runs = pd.DataFrame({"dataset": "sbu", "test_set": "test", "model": "tiny", "method": ["lora", "ssf"],
                         "seed": 0, "headline": "ber", "lower_is_better": True, "ber": [3.0, 2.0]})
    (means,) = block_means(runs).values()
    assert means["ssf"] > means["lora"]  # the lower BER is the better score


def test_area_weights_against_numpy_trapezoid():
    rng = np.random.default_rng(4)
    for fractions in ([0.05, 0.1, 0.25, 0.5, 1.0], [0.5, 1.0], sorted(rng.uniform(0, 1, 7))):
        y = rng.normal(size=len(fractions))
        expected = np.trapezoid(y, fractions) / (fractions[-1] - fractions[0])
        assert area(fractions, y) == pytest.approx(expected, rel=1e-12)
    assert area([0.1, 0.5, 1.0], [0.5, 0.7, 0.8]) == pytest.approx((0.4 * 0.6 + 0.5 * 0.75) / 0.9)  # by hand
    with pytest.raises(ValueError):
        area_weights([0.5, 0.5])


@pytest.fixture
def fractions(tmp_path):
    """lora and bitfit at train fractions 0.25, 0.5, 1 (seeds 0, 1); bitfit learns faster from little data."""
    root = tmp_path / "fractions"
    for seed in (0, 1):
        for fraction in (0.25, 0.5, 1.0):
            for method, quality in (("lora", 1 + 2 * fraction), ("bitfit", 2 + fraction)):
                rows = image_rows(np.random.default_rng(seed), 30, 1)
                rows["tp"] = (rows["tp"] * quality).astype(int)
                rows["iou_per_image"] = rows["tp"] / (rows["tp"] + rows["fp"] + rows["fn"])
                write_run(root, method, seed, rows, fraction=fraction)
    return root


def test_area_under_the_fraction_curve_is_compared_like_a_metric(cli, fractions):
    f = [0.25, 0.5, 1.0]
    for metric in ("iou_per_image", "iou_dataset"):
        code, out, message = cli("compare", fractions, "--format", "json", "--resamples", "300", "--metric", metric)
        assert code == 0, message
        records = json.loads(out)
        (rec,) = [r for r in records if r["metric"] == f"{metric}@area"]
        assert rec["fractions"] == f and rec["seeds"] == [0, 1] and rec["dataset"] == "blobs"
        assert len(records) == 4 and {r["fractions"][0] for r in records if r is not rec} == set(f)
        scores = {}  # (method, seed) -> the metric at each fraction, from metrics.json
        for path in sorted(fractions.iterdir()):
            m = json.loads((path / "metrics.json").read_text())
            scores.setdefault((m["method"], m["seed"]), {})[m["train_fraction"]] = m["scores"]["test"][metric]
        expected = np.mean([np.trapezoid([scores["bitfit", s][x] for x in f], f) / 0.75
                            - np.trapezoid([scores["lora", s][x] for x in f], f) / 0.75 for s in (0, 1)])
        assert rec["difference"] == pytest.approx(expected, rel=1e-12)
        assert rec["ci_low"] <= rec["difference"] <= rec["ci_high"] and rec["verdict"] == "better"
    # per-image: Wilcoxon on the per-image areas (averaged over seeds), by hand
    rows = {(p.name.split("_")[1], int(p.name.split("_s")[1][0]), json.loads((p / "metrics.json").read_text())
             ["train_fraction"]): pd.read_csv(p / "per_image.csv").set_index("image")["iou_per_image"]
            for p in fractions.iterdir()}
    per_image = {m: np.mean([np.trapezoid(np.stack([rows[m, s, x] for x in f]), f, axis=0) / 0.75
                             for s in (0, 1)], axis=0) for m in ("lora", "bitfit")}
    code, out, _ = cli("compare", fractions, "--format", "json", "--resamples", "300")
    (rec,) = [r for r in json.loads(out) if r["metric"].endswith("@area")]
    assert rec["test"] == "wilcoxon" and rec["p_value"] == pytest.approx(
        stats.wilcoxon(per_image["bitfit"], per_image["lora"]).pvalue, rel=1e-9)


def test_area_needs_common_fractions_and_seeds(cli, fractions):
    import shutil

    for path in fractions.glob("blobs_bitfit_tiny_64_s1*"):
        if not path.name.endswith("_f0.5"):
            shutil.rmtree(path)  # bitfit seed 1 only at 0.5: seed 0 is common at every fraction
    code, out, message = cli("compare", fractions, "--format", "json", "--resamples", "200")
    assert code == 0, message
    (rec,) = [r for r in json.loads(out) if r["metric"].endswith("@area")]
    assert rec["seeds"] == [0]
    for path in fractions.glob("blobs_bitfit_*"):
        if not path.name.endswith("_f0.5"):
            shutil.rmtree(path)
    code, out, message = cli("compare", fractions, "--format", "json", "--resamples", "200")
    assert code == 0 and not [r for r in json.loads(out) if r["metric"].endswith("@area")], message


def test_a_nan_never_becomes_a_verdict():
    from samfit.report.compare import verdict

    for difference, p in ((float("nan"), 0.01), (0.1, float("nan"))):
        with pytest.raises(SamfitError, match="no finite difference"):
            verdict(difference, p, False, 0.05)
