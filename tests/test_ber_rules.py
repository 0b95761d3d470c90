"""The two BER columns threshold the prediction each by its own reference's rule, pinned at the probabilities where
the rules part: `ber` (ComputeBERonSet.m, which reads 8-bit maps) on round(255·p) > 125, so shadow from
p = 125.5/255; `ber_per_image` (the official Conv-LoRA code, which thresholds the float map) on 255·p > 125."""
import numpy as np
import pytest

from samfit.metrics import evaluate_binary


@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # float32: what a model's probabilities are
def test_a_pixel_between_the_two_rules_is_shadow_for_ber_per_image_only(dtype):
    gt = np.array([[255, 255, 0, 0]], np.uint8)
    pred = (np.array([[125.3, 125.7, 0.0, 124.9]]) / 255).astype(dtype)  # 255·p: between, above both, below both
    out = evaluate_binary([pred], [gt], sod=False)
    # ber: round(125.3) = 125 is not > 125: TP 1 of 2, TN 2 of 2 -> 100·(1 − (1/2 + 1)/2)
    assert out["ber"] == pytest.approx(100 * (1 - (1 / 2 + 1) / 2))
    # ber_per_image: 125.3 > 125 is shadow: both classes fully right -> 0
    assert out["ber_per_image"] == pytest.approx(0.0)


def test_both_rules_agree_off_the_band_between_them():
    """Outside 255·p in (125, 125.5) the rules agree, so the two columns differ only by pooling."""
    rng = np.random.default_rng(5)
    gt = np.where(rng.random((1, 16, 16)) > 0.5, 255, 0).astype(np.uint8)[0]
    pred = rng.random((16, 16))
    pred[(pred * 255 > 125) & (pred * 255 < 125.5)] = 0.9  # nothing in the band
    out = evaluate_binary([pred], [gt], sod=False)
    assert out["ber"] == pytest.approx(out["ber_per_image"], abs=1e-9)  # one image: pooled = per image
