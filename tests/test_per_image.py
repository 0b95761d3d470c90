"""Per-image rows: every pooled metric recomputed from them equals the evaluator's, on the whole set and after
merging states (DDP); the rows of `evaluate` come in dataset order and name the images."""
import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from samfit.engine.evaluate import per_image_csv, per_image_rows
from samfit.errors import SamfitError
from samfit.metrics import BinaryEvaluator, MulticlassEvaluator
from samfit.metrics.pooled import MEAN_METRICS, POOLED_METRICS, recipe, recompute

EPS = np.finfo(np.float64).eps


def binary_cases(rng, n=7):
    cases = []
    for k in range(n):
        h, w = 20 + 3 * k, 24 + 2 * k
        gt = np.zeros((h, w), np.uint8)
        if k != 2:  # one image with an empty GT
            gt[h // 4: 3 * h // 4 + k, w // 3: 2 * w // 3] = 255
        pred = np.clip(gt / 255 * 0.6 + rng.random((h, w)) * 0.5, 0, 1).astype(np.float32)
        cases.append((pred, gt))
    return cases


def as_frame(rows) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(per_image_csv(rows)))


def assert_same(recomputed: dict, expected: dict, n: int):
    for metric, value in recomputed.items():
        tol = 4 * n * EPS * max(1.0, abs(expected[metric]))  # summation order only
        assert abs(value - expected[metric]) <= tol, (metric, value, expected[metric])


def test_binary_rows_give_every_metric_back():
    cases = binary_cases(np.random.default_rng(0))
    evaluator = BinaryEvaluator(sod=True)
    for pred, gt in cases:
        evaluator.update(pred, gt)
    expected = evaluator.compute()
    spec = SimpleNamespace(task="binary", classes=["background", "fg"])
    data = SimpleNamespace(pairs=[(f"/x/img{i}.png", None) for i in range(len(cases))])
    rows = as_frame(per_image_rows(evaluator, spec, data, list(range(len(cases)))))
    assert list(rows["image"]) == [f"img{i}.png" for i in range(len(cases))]
    for col in ("tp", "fp", "fn", "tn", "ber_tp", "ber_fp", "ber_fn", "ber_tn", "e_curve_255"):
        assert col in rows.columns
    got = recompute(rows)
    assert set(got) == set(MEAN_METRICS + POOLED_METRICS) - {"miou", "miou_trans2seg"}
    assert set(got) <= set(expected)
    assert_same(got, expected, len(cases))
    for m in ("iou_dataset", "dice_dataset", "ber"):  # integer counts: exactly
        assert got[m] == expected[m]
    # a subset of images: the metrics of an evaluator fed only those
    sub = BinaryEvaluator(sod=True)
    for pred, gt in cases[2:5]:
        sub.update(pred, gt)
    assert_same(recompute(rows.iloc[2:5]), sub.compute(), 3)


def test_ber_counts_use_bers_own_thresholds():
    gt = np.array([[0, 126, 200, 255]], np.uint8)  # 126 is positive for BER (> 125), not for IoU (> 128)
    pred = np.array([[0.491, 0.492, 0.6, 0.2]], np.float32)  # 0.492·255 = 125.46 -> 125 (not > 125)
    ev = BinaryEvaluator(sod=False)
    ev.update(pred, gt)
    cols = ev.per_image()
    assert (cols["tp"][0], cols["fp"][0], cols["fn"][0], cols["tn"][0]) == (1, 0, 1, 2)
    assert (cols["ber_tp"][0], cols["ber_fp"][0], cols["ber_fn"][0], cols["ber_tn"][0]) == (1, 0, 2, 1)


def test_multiclass_rows_give_miou_back_and_states_merge_in_order():
    rng = np.random.default_rng(1)
    gts = [rng.integers(0, 4, (9, 11)) for _ in range(6)]
    gts[1][0, :5] = 255  # ignored pixels
    gts[3][gts[3] == 3] = 0  # a class absent from one image
    preds = [np.where(rng.random(g.shape) < 0.7, np.where(g == 255, 1, g), rng.integers(0, 4, g.shape)) for g in gts]
    whole = MulticlassEvaluator(4)
    for p, g in zip(preds, gts):
        whole.update(p, g)
    expected = whole.compute()
    spec = SimpleNamespace(task="multiclass", classes=["bg", "a", "b", "c"])
    data = SimpleNamespace(pairs=[(f"i{i}.png", None) for i in range(6)])
    ranks = [MulticlassEvaluator(4), MulticlassEvaluator(4)]  # rank r scores images r, r + 2, ...
    for i, (p, g) in enumerate(zip(preds, gts)):
        ranks[i % 2].update(p, g)
    merged = MulticlassEvaluator.from_states([r.state() for r in ranks])
    rows = as_frame(per_image_rows(merged, spec, data, [0, 2, 4, 1, 3, 5]))
    assert list(rows["image"]) == [f"i{i}.png" for i in range(6)]
    assert {"inter_bg", "union_c", "ignored_a"} <= set(rows.columns)
    got = recompute(rows)
    assert set(got) == {"miou", "miou_trans2seg"}
    assert_same(got, expected, 6)
    assert merged.compute() == expected


def test_recipe_names_what_the_rows_lack():
    with pytest.raises(SamfitError, match="per-image column"):
        recipe("s_measure", ["image", "iou_per_image", "tp"])
    with pytest.raises(SamfitError, match="cannot be recomputed"):
        recipe("iou_per_class", ["tp"])
