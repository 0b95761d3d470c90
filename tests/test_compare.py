"""`samfit compare` and `samfit table --baseline`: the statistics against scipy.stats and brute force, their
behaviour on simulated scores (coverage, power, false rejections), bad input, and two real tiny runs."""
import itertools
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from samfit.metrics.pooled import recipe, recompute
from samfit.report.compare import Settings, holm, paired_comparison, verdict, wilcoxon_p

COUNTS = ["tp", "fp", "tn", "fn"]


def image_rows(rng, n, quality):
    """Per-image rows of a binary test set: counts and the per-image IoU they give."""
    tp = rng.integers(50, 100, n) * quality
    fp, fn = rng.integers(5, 40, n), rng.integers(5, 40, n)
    rows = pd.DataFrame({"test_set": "test", "image": [f"im{i:03d}.png" for i in range(n)],
                         "tp": tp.astype(int), "fp": fp, "tn": 1000, "fn": fn})
    rows.insert(2, "iou_per_image", rows["tp"] / (rows["tp"] + rows["fp"] + rows["fn"]))
    return rows


def write_run(root, method, seed, rows, dataset="blobs", per_image=True, fraction=1.0):
    folder = root / (f"{dataset}_{method}_tiny_64_s{seed}" + ("" if fraction == 1 else f"_f{fraction:g}"))
    folder.mkdir(parents=True)
    scores = {t: recompute(r.drop(columns=["test_set"])) for t, r in rows.groupby("test_set")}
    (folder / "metrics.json").write_text(json.dumps({
        "method": method, "dataset": dataset, "model": "tiny", "image_size": 64, "seed": seed, "device": "cpu",
        "headline": {"metric": "iou_per_image", "lower_is_better": False, "value": scores["test"]["iou_per_image"],
                     "split": "test"},
        "scores": scores, "params": {"trainable": 10, "encoder_trainable": 1, "percent_of_sam": 1.0},
        "throughput": {"train_img_per_s": 1.0, "step_time_s": 0.1, "eval_img_per_s": 1.0}, "peak_memory_mb": 1.0,
        "train_fraction": fraction}))
    if per_image:
        rows.to_csv(folder / "per_image.csv", index=False)


@pytest.fixture
def fake_runs(tmp_path):
    """lora and a clearly better decoder-only (seeds 0, 1) and an indistinguishable bitfit (seed 0)."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        write_run(root, "lora", seed, image_rows(rng, 40, 1))
        write_run(root, "decoder-only", seed, image_rows(np.random.default_rng(seed), 40, 3))
    write_run(root, "bitfit", 0, image_rows(np.random.default_rng(0), 40, 1))
    return root


# ---------------------------------------------------------------- statistics against independent computations

def stats_of(rows_per_seed, columns):
    return np.stack([r[columns].to_numpy(dtype=np.float64) for r in rows_per_seed])


def test_per_image_mean_matches_scipy_wilcoxon_and_bootstrap():
    rng = np.random.default_rng(3)
    base = [image_rows(rng, 30, 1) for _ in range(2)]
    mine = [image_rows(rng, 30, 1).assign(iou_per_image=lambda f: f["iou_per_image"] + 0.02) for _ in range(2)]
    rec = recipe("iou_per_image", base[0].columns)
    m, b = stats_of(mine, ["iou_per_image"]), stats_of(base, ["iou_per_image"])
    out = paired_comparison(rec, m, b, Settings(resamples=4000, seed=1))
    a_img, b_img = m[..., 0].mean(axis=0), b[..., 0].mean(axis=0)  # per-image scores averaged over seeds
    assert out["difference"] == pytest.approx(np.mean([mi.mean() - bi.mean() for mi, bi in zip(m[..., 0], b[..., 0])]))
    assert out["p_value"] == stats.wilcoxon(a_img, b_img).pvalue
    ref = stats.bootstrap((a_img, b_img), lambda x, y, axis: (x - y).mean(axis=axis), paired=True,
                          vectorized=True, n_resamples=4000, method="percentile", random_state=2).confidence_interval
    width = ref.high - ref.low
    assert abs(out["ci_low"] - ref.low) < 0.1 * width and abs(out["ci_high"] - ref.high) < 0.1 * width


def test_pooled_metric_permutation_p_equals_brute_force_enumeration():
    rng = np.random.default_rng(5)
    base, mine = image_rows(rng, 8, 1), image_rows(rng, 8, 2)
    rec = recipe("iou_dataset", base.columns)
    m, b = stats_of([mine], list(rec.columns)), stats_of([base], list(rec.columns))
    out = paired_comparison(rec, m, b, Settings(resamples=1000))  # 2^8 = 256 swaps: scipy enumerates them all

    def iou(tp, fp, fn):
        return tp.sum() / (tp.sum() + fp.sum() + fn.sum())

    def diff(swap):
        x = np.where(swap[:, None], b[0], m[0])
        y = np.where(swap[:, None], m[0], b[0])
        return iou(*x.T) - iou(*y.T)

    observed = diff(np.zeros(8, bool))
    null = np.array([diff(np.array(s)) for s in itertools.product([False, True], repeat=8)])
    tol = 1e-12
    expected = min(1.0, 2 * min((null >= observed - tol).mean(), (null <= observed + tol).mean()))
    assert out["p_value"] == pytest.approx(expected)
    assert out["difference"] == pytest.approx(observed)
    assert out["ci_low"] <= observed <= out["ci_high"]


def test_holm_against_hand_computation():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # step-down: never below an earlier step
    assert holm([0.04, 0.2]) == pytest.approx([0.08, 0.2])


def test_verdict_knows_lower_is_better():
    assert verdict(0.5, 0.01, False, 0.05) == "better"
    assert verdict(0.5, 0.01, True, 0.05) == "worse"
    assert verdict(-0.5, 0.01, True, 0.05) == "better"
    assert verdict(0.5, 0.2, False, 0.05) == "no detectable difference"


def test_simulated_shift_is_covered_and_detected():
    rng = np.random.default_rng(11)
    base = rng.beta(5, 2, size=(1, 60, 1))
    mine = base + 0.03 + rng.normal(0, 0.03, size=base.shape)
    out = paired_comparison(recipe("iou_per_image", ["iou_per_image"]), mine, base, Settings(resamples=1000))
    assert out["ci_low"] < 0.03 < out["ci_high"]
    assert out["p_value"] < 0.01


def test_no_shift_rejects_at_about_the_nominal_rate():
    rng = np.random.default_rng(12)
    rejections = 0
    for _ in range(200):
        base = rng.beta(5, 2, size=40)
        mine = base + rng.normal(0, 0.05, size=40)  # the same expected score
        rejections += wilcoxon_p(mine - base) < 0.05
    assert 0.01 <= rejections / 200 <= 0.10


# ---------------------------------------------------------------- the commands on hand-made runs

REQUIRED = {"dataset", "test_set", "metric", "method", "baseline", "difference", "ci_low", "ci_high", "p_value",
            "p_holm", "verdict", "n_images", "seeds"}


def test_compare_json_verdicts_and_holm(cli, fake_runs):
    code, out, message = cli("compare", fake_runs, "--baseline", "lora", "--format", "json", "--resamples", "500")
    assert code == 0, message
    records = {r["method"]: r for r in json.loads(out)}
    assert set(records) == {"decoder-only", "bitfit"}
    assert all(REQUIRED <= set(r) for r in records.values())
    dec = records["decoder-only"]
    assert dec["verdict"] == "better" and dec["seeds"] == [0, 1] and dec["n_images"] == 40
    assert records["bitfit"]["verdict"] == "no detectable difference" and records["bitfit"]["difference"] == 0
    assert records["bitfit"]["p_value"] == 1.0 and records["bitfit"]["p_holm"] == 1.0  # identical scores
    assert dec["ci_low"] > 0 and dec["p_holm"] == pytest.approx(2 * dec["p_value"])  # Holm's first step, of 2
    for fmt in ("rich", "markdown", "csv"):
        code, out, message = cli("compare", fake_runs, "--format", fmt, "--resamples", "200")
        assert code == 0 and "nan" not in out.lower(), message
        assert fmt == "rich" or "decoder-only" in out  # rich folds cells to the terminal's width
    code, out, _ = cli("compare", fake_runs, "--metric", "iou_dataset", "--format", "json", "--resamples", "200")
    assert json.loads(out)[0]["metric"] == "iou_dataset" and code == 0


def test_table_marks_significant_cells(cli, fake_runs):
    code, out, message = cli("table", fake_runs, "--baseline", "lora", "--format", "markdown")
    assert code == 0, message
    line = next(row for row in out.splitlines() if row.startswith("| decoder-only"))
    assert "▲" in line and "▲ / ▼" in out
    assert "▲" not in next(row for row in out.splitlines() if row.startswith("| bitfit"))


def test_bad_input_is_a_clear_message(cli, tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    cases["seeds"] = tmp_path / "seeds"
    write_run(cases["seeds"], "lora", 0, image_rows(rng, 10, 1))
    write_run(cases["seeds"], "bitfit", 1, image_rows(rng, 10, 1))
    cases["alone"] = tmp_path / "alone"
    write_run(cases["alone"], "lora", 0, image_rows(rng, 10, 1))
    cases["old"] = tmp_path / "old"
    write_run(cases["old"], "lora", 0, image_rows(rng, 10, 1), per_image=False)
    write_run(cases["old"], "bitfit", 0, image_rows(rng, 10, 1))
    expect = {"seeds": "share no seed", "alone": "nothing to compare", "old": "no per-image rows"}
    for name, text in expect.items():
        code, out, message = cli("compare", cases[name], "--baseline", "lora")
        assert code == 2 and text in message, (name, message)
    write_run(cases["seeds"], "bitfit", 0, image_rows(rng, 10, 1))
    for args, text in [(("--metric", "s_measure"), "not among the scores"), (("--baseline", "vpt"), "no runs of it"),
                       (("--confidence", "1.5"), "between 0 and 1"), (("--format", "pdf"), "choose one of")]:
        code, out, message = cli("compare", cases["seeds"], *args)
        assert code == 2 and text in message, (args, message)
    code, _, message = cli("table", cases["old"], "--baseline", "lora")
    assert code == 2 and "no per-image rows" in message


def test_average_ranks_and_friedman_across_test_sets(cli, tmp_path):
    from samfit.report.collect import collect_runs
    from samfit.report.ranks import friedman_ranks

    root = tmp_path / "runs"
    quality = {"lora": 2, "decoder-only": 1, "bitfit": 3}
    for k, dataset in enumerate(("blobs", "drops", "dots")):
        for method, q in quality.items():
            write_run(root, method, 0, image_rows(np.random.default_rng(k), 12, q + (k == 2) * (method == "lora") * 2),
                      dataset=dataset)
    result, why = friedman_ranks(collect_runs(root))
    assert why is None
    runs = collect_runs(root)
    table = runs.pivot_table(index="dataset", columns="method", values="iou_per_image")[result["methods"]]
    expected = stats.friedmanchisquare(*table.to_numpy().T)
    assert result["statistic"] == pytest.approx(expected.statistic) and result["p_value"] == pytest.approx(expected.pvalue)
    ranks = dict(zip(result["methods"], result["average_rank"]))
    assert ranks == pytest.approx({"bitfit": 4 / 3, "lora": 5 / 3, "decoder-only": 3.0})  # lora wins on dots
    code, out, message = cli("compare", root, "--format", "markdown", "--resamples", "200")
    assert code == 0 and "Friedman test over 3 test sets and 3 methods" in out, message
    none, why = friedman_ranks(collect_runs(root / "blobs_lora_tiny_64_s0"))
    assert none is None and "3 or more methods" in why


# ---------------------------------------------------------------- two real tiny runs

@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    from samfit.config import make_config
    from samfit.engine.train import run

    root = tmp_path_factory.mktemp("real")
    for method, seed in itertools.product(("lora", "decoder-only"), (0, 1)):
        run(make_config(None, method=method, dataset="shapes", model="tiny", device="cpu", image_size=64, epochs=1,
                        limit_train=8, limit_eval=8, seed=seed, out=str(root / "runs"), data_root=str(root / "data")),
            quiet=True)
    return root / "runs"


@pytest.mark.slow
def test_real_runs_per_image_rows_give_metrics_back(real_runs):
    eps = np.finfo(np.float64).eps
    for folder in sorted(real_runs.iterdir()):
        metrics = json.loads((folder / "metrics.json").read_text())
        rows = pd.read_csv(folder / "per_image.csv")
        for test_set, scores in metrics["scores"].items():
            got = recompute(rows[rows["test_set"] == test_set].drop(columns=["test_set"]))
            assert {"iou_per_image", "iou_dataset", "dice_dataset", "ber"} <= set(got)
            for metric, value in got.items():
                assert abs(value - scores[metric]) <= 8 * len(rows) * eps * max(1, abs(value)), metric


@pytest.mark.slow
def test_real_runs_compare_and_table(cli, real_runs):
    code, out, message = cli("compare", real_runs, "--baseline", "lora", "--format", "json", "--resamples", "300")
    assert code == 0, message
    (record,) = json.loads(out)
    assert record["method"] == "decoder-only" and record["seeds"] == [0, 1] and record["n_images"] == 8
    assert record["verdict"] in ("better", "worse", "no detectable difference")
    assert all(np.isfinite(record[k]) for k in ("difference", "ci_low", "ci_high", "p_value", "p_holm"))
    code, out, message = cli("table", real_runs, "--baseline", "lora", "--format", "markdown")
    assert code == 0 and "▲ / ▼" in out, message
