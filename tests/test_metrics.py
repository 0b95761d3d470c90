"""Metrics against PySODMetrics called directly and against pixel counts done by hand."""
import math
import pickle

import numpy as np
import py_sod_metrics as pysod
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from samfit.errors import SamfitError
from samfit.metrics import BinaryEvaluator, MulticlassEvaluator, evaluate_binary, evaluate_multiclass

SOD_KEYS = ["s_measure", "e_measure_mean", "e_measure_adaptive", "e_measure_max", "weighted_f",
            "weighted_f_beta2_0.3", "mae"]


def blob_case(rng, h, w):
    """A GT with a rectangle and a noisy prediction spanning exactly [0, 1]."""
    gt = np.zeros((h, w), np.uint8)
    gt[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 255
    pred = np.clip(gt / 255 * 0.7 + rng.random((h, w)) * 0.4, 0, 1)
    pred[0, 0], pred[-1, -1] = 0.0, 1.0
    return pred, gt


def reference_sod(preds, gts):
    """PySODMetrics called directly, the way its users call it: the 8-bit prediction map, 0/255 GT."""
    s, e, wf, mae = pysod.Smeasure(), pysod.Emeasure(), pysod.WeightedFmeasure(), pysod.MAE()
    wf3 = pysod.WeightedFmeasure(beta=0.3)
    for p, g in zip(preds, gts):
        u8 = p if p.dtype == np.uint8 else np.rint(p * 255).astype(np.uint8)
        for m in (s, e, wf, wf3, mae):
            m.step(pred=u8, gt=g)
    curve = e.get_results()["em"]["curve"]
    assert curve.shape == (256,)
    return {
        "s_measure": s.get_results()["sm"], "e_measure_mean": curve.mean(), "e_measure_max": curve.max(),
        "e_measure_adaptive": e.get_results()["em"]["adp"], "weighted_f": wf.get_results()["wfm"],
        "weighted_f_beta2_0.3": wf3.get_results()["wfm"], "mae": mae.get_results()["mae"],
    }


def test_sod_metrics_equal_pysodmetrics_on_images_of_different_sizes():
    rng = np.random.default_rng(0)
    cases = [blob_case(rng, h, w) for h, w in [(40, 60), (33, 17), (64, 64)]]
    preds, gts = zip(*cases)
    got = evaluate_binary(preds, gts)
    want = reference_sod(preds, gts)
    for key in SOD_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0.5 < got["s_measure"] < 1 and got["e_measure_max"] >= got["e_measure_mean"]


def pysod_style_maps(rng):
    """8-bit prediction maps as saved PNGs hold them (not spanning 0..255), one with an empty GT."""
    cases = []
    for h, w, lo, hi, empty in [(40, 60, 37, 201, False), (33, 17, 5, 180, True), (48, 48, 60, 255, False)]:
        _, gt = blob_case(rng, h, w)
        gt = np.zeros_like(gt) if empty else gt
        smooth = (gt / 255.0) * 0.6 + rng.random((h, w)) * 0.4
        cases.append((np.rint(lo + (hi - lo) * smooth).astype(np.uint8), gt))
    return cases


def test_8bit_maps_reach_pysodmetrics_unchanged():
    """p = u/255 in float32 (the model's dtype) gives PySODMetrics u itself: E_φ in all three forms, and
    every other SOD score, within 1e-6 of PySODMetrics on the 8-bit maps (measured: 0)."""
    cases = pysod_style_maps(np.random.default_rng(7))
    u8s, gts = zip(*cases)
    want = reference_sod(u8s, gts)
    got = evaluate_binary([(u / np.float32(255)).astype(np.float32) for u in u8s], gts)
    for key in SOD_KEYS:
        assert abs(got[key] - want[key]) <= 1e-6, key
    # the old input, the map min-max normalised before rounding, is not what PySODMetrics' users give it:
    # on these maps it moves the adaptive E-measure by far more than 1e-6
    renormalised = [np.rint(255 * (u - float(u.min())) / float(u.max() - u.min())).astype(np.uint8) for u in u8s]
    assert abs(reference_sod(renormalised, gts)["e_measure_adaptive"] - want["e_measure_adaptive"]) > 1e-4


def test_sod_metrics_normalise_each_map_inside_pysodmetrics():
    rng = np.random.default_rng(1)
    pred, gt = blob_case(rng, 30, 40)
    squeezed = (0.3 + 0.4 * pred).astype(np.float32)  # PySODMetrics min-max normalises round(255·p)
    got = evaluate_binary([squeezed], [gt])
    want = reference_sod([np.rint(255 * squeezed.astype(np.float64)).astype(np.uint8)], [gt])
    for key in SOD_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["s_measure"] == pytest.approx(evaluate_binary([pred], [gt])["s_measure"], abs=5e-3)


def ber_compute_on_set(preds, gts):
    """ComputeBERonSet.m transcribed: 8-bit maps, tsFor1 = 125, pooled counts."""
    stats = np.zeros(4)
    for p, g in zip(preds, gts):
        g = np.asarray(g).astype(np.uint8) * (255 if np.asarray(g).dtype == bool else 1)
        u = np.rint(np.asarray(p, np.float64) * 255)
        pos, neg = g > 125, g <= 125
        stats += [np.sum(pos & (u > 125)), np.sum(neg & (u <= 125)), pos.sum(), neg.sum()]
    return 100 * 0.5 * (2 - stats[0] / stats[2] - stats[1] / stats[3])


def ber_official_per_image(preds, gts):
    """The official Conv-LoRA code's Balanced_Error_Rate transcribed (torchmetrics macro accuracy per
    image), times 100."""
    import torch
    import torchmetrics

    labels = torch.stack([torch.from_numpy(np.asarray(g, np.float64) / 255) for g in gts])
    logits = torch.stack([torch.from_numpy(np.asarray(p, np.float64)) for p in preds])
    labels, logits = (labels * 255) > 125, (logits * 255) > 125
    ber = 1 - torchmetrics.Accuracy(task="multiclass", num_classes=2, average="macro",
                                    multidim_average="samplewise")(logits.long(), labels.long())
    return 100 * float(torch.mean(ber))


def test_iou_dice_ber_against_hand_counts():
    gt1 = np.array([[255, 0, 0], [255, 255, 0]], np.uint8)
    pred1 = np.array([[0.9, 0.6, 0.1], [0.4, 0.8, 0.2]])  # TP 2, FP 1, FN 1, TN 2
    gt2 = np.zeros((2, 2), np.uint8)  # empty GT, empty prediction: TN 4
    pred2 = np.zeros((2, 2), np.float32)
    gt3 = np.array([[False, True, False]])  # one-pixel object; 0.5 is not > 0.5: TP 1, TN 2
    pred3 = np.array([[0.5, 0.51, 0.0]])
    out = evaluate_binary([pred1, pred2, pred3], [gt1, gt2, gt3], sod=False)
    assert out["iou_per_image"] == pytest.approx((2 / 4 + 1 + 1) / 3)
    assert out["dice_per_image"] == pytest.approx((4 / 6 + 1 + 1) / 3)
    assert out["iou_dataset"] == pytest.approx(3 / 5)
    assert out["dice_dataset"] == pytest.approx(6 / 8)
    # BER: round(255·0.5) = 128 > 125, so pixel (0, 0) of image 3 is a false positive: TP 3/4, TN 7/9
    assert out["ber"] == pytest.approx(100 * (1 - 0.5 * (3 / 4 + 7 / 9)))
    assert out["ber"] == pytest.approx(ber_compute_on_set([pred1, pred2, pred3], [gt1, gt2, gt3]))
    # per image: (1 − (2/3 + 2/3)/2), empty GT with no positive predicted: 0, (1 − (1 + 1/2)/2)
    assert out["ber_per_image"] == pytest.approx(100 * (1 / 3 + 0 + 1 / 4) / 3)
    assert set(out) == {"ber", "ber_per_image", "iou_per_image", "iou_dataset", "dice_per_image",
                        "dice_dataset"}


def test_ber_thresholds_gt_and_prediction_above_125_of_255():
    gt = np.array([[100, 125, 126, 255], [0, 200, 130, 60]], np.uint8)
    # 8-bit prediction round(255·p): 125 (negative), 126 (positive), 125.5 rounds to 126 (positive)
    pred = np.array([[125.4, 125.6, 125.5, 255], [0, 125.0, 0, 126]]) / 255
    out = evaluate_binary([pred], [gt], sod=False)
    # GT positive: 126, 255, 200, 130 (P = 4); predicted positive: (0,1), (0,2), (0,3), (1,3)
    assert out["ber"] == pytest.approx(100 * (1 - 0.5 * (2 / 4 + 2 / 4)))
    assert out["ber"] == pytest.approx(ber_compute_on_set([pred], [gt]))
    assert out["iou_dataset"] == pytest.approx(2 / 6)  # IoU keeps GT > 128 and p > 0.5 (130 is positive)


def test_ber_per_image_equals_the_official_code_on_random_maps():
    rng = np.random.default_rng(11)
    preds, gts = [], []
    for k in range(6):
        gt = (cv2_blur(rng.random((16, 16))) * 255).astype(np.uint8)  # soft edges: values around 125
        if k == 4:
            gt[:] = 0  # an empty GT (the shadow class counts only where predicted)
        pred = np.clip(gt / 255 + rng.normal(0, 0.2, gt.shape), 0, 1)
        if k == 5:
            gt[:], pred[:] = 0, 0.1  # empty GT, nothing predicted: the shadow class drops out
        preds.append(pred)
        gts.append(gt)
    out = evaluate_binary(preds, gts, sod=False)
    # torchmetrics divides in float32: 100 x a few float32 eps (measured 4.6e-6)
    assert abs(out["ber_per_image"] - ber_official_per_image(preds, gts)) < 100 * 2 ** -20
    assert abs(out["ber"] - ber_compute_on_set(preds, gts)) < 1e-9
    assert abs(out["ber"] - out["ber_per_image"]) > 0.1  # two different quantities


def cv2_blur(field):
    import cv2

    return cv2.GaussianBlur(field.astype(np.float32), (0, 0), 2.0).clip(0, 1) * 1.6 - 0.3


def test_full_gt_with_constant_one_prediction_is_perfect():
    out = evaluate_binary([np.ones((5, 7))], [np.full((5, 7), 255, np.uint8)])
    assert out["ber"] == 0.0  # N = 0: BER = 100·(1 − TP/P)
    assert out["iou_per_image"] == out["dice_dataset"] == 1.0
    assert out["s_measure"] == pytest.approx(1.0) and out["mae"] == pytest.approx(0.0)


def test_empty_gt_follows_pysodmetrics_and_ber_drops_the_positive_term():
    gt = np.zeros((6, 6), np.uint8)
    pred = np.zeros((6, 6))
    pred[0, :3] = 0.9  # 3 false positives out of N = 36
    out = evaluate_binary([pred], [gt])
    assert out["ber"] == pytest.approx(100 * 3 / 36)
    assert out["iou_per_image"] == 0.0 and out["dice_per_image"] == 0.0
    want = reference_sod([pred], [gt])
    assert out["weighted_f"] == want["weighted_f"] == 0.0
    assert out["s_measure"] == pytest.approx(want["s_measure"])
    assert out["mae"] == pytest.approx(want["mae"], abs=1e-12)


def test_s_measure_is_finite_where_pysodmetrics_gives_nan():
    gt = np.zeros((10, 10), np.uint8)
    gt[2:8, 9] = 255  # centroid on the last column: the right quadrants are empty, with weight 0
    pred = np.zeros((10, 10))
    pred[3:8, 8:] = 1.0
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        assert math.isnan(reference_sod([pred], [gt])["s_measure"])
    assert 0 < evaluate_binary([pred], [gt])["s_measure"] < 1


def test_constant_prediction_against_partial_gt():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 255
    out = evaluate_binary([np.full((4, 4), 0.3)], [gt])
    assert out["iou_per_image"] == 0.0 and out["ber"] == pytest.approx(50.0)
    assert out["mae"] == pytest.approx(np.mean(np.abs(np.rint(0.3 * 255) / 255 - gt / 255)))


def test_prediction_is_resized_bilinearly_to_its_gt():
    pred = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)  # bilinear 2→4: top-left 2×2 block is > 0.5
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2] = 255
    assert evaluate_binary([pred], [gt], sod=False)["iou_dataset"] == 1.0


def test_tensors_are_accepted_like_arrays():
    import torch

    rng = np.random.default_rng(4)
    pred, gt = blob_case(rng, 12, 14)
    as_arrays = evaluate_binary([pred], [gt])
    as_tensors = evaluate_binary([torch.from_numpy(pred).half()[None]], [torch.from_numpy(gt > 0)])
    assert as_tensors == pytest.approx(as_arrays, abs=2e-3)
    labels = rng.integers(0, 3, (5, 6))
    scores = torch.nn.functional.one_hot(torch.from_numpy(labels), 3).permute(2, 0, 1).bfloat16()
    assert evaluate_multiclass([scores], [torch.from_numpy(labels)], 3)["miou"] == 1.0


def test_streaming_states_merge_to_the_one_shot_result():
    rng = np.random.default_rng(2)
    cases = [blob_case(rng, h, w) for h, w in [(20, 30), (25, 25), (16, 40), (30, 12)]]
    preds, gts = zip(*cases)
    whole = evaluate_binary(preds, gts)
    parts = []
    for lo, hi in [(0, 1), (1, 4)]:
        ev = BinaryEvaluator()
        for p, g in zip(preds[lo:hi], gts[lo:hi]):
            ev.update(p, g)
        parts.append(pickle.loads(pickle.dumps(ev.state())))
    merged = BinaryEvaluator.from_states(parts).compute()
    assert merged == pytest.approx(whole, abs=1e-12)


@pytest.mark.parametrize("pred, gt", [
    (np.full((3, 3), -0.1), np.zeros((3, 3), np.uint8)),
    (np.full((3, 3), 1.5), np.zeros((3, 3), np.uint8)),
    (np.full((3, 3), np.nan), np.zeros((3, 3), np.uint8)),
    (np.ones((3, 3), np.uint8), np.zeros((3, 3), np.uint8)),
    (np.ones((3, 3)), np.ones((3, 3), np.uint8)),  # a 0/1 GT: ambiguous, refused
    (np.ones((3, 3)), np.full((3, 3), 0.5)),
    (np.ones((2, 3, 3)), np.zeros((3, 3), np.uint8)),
])
def test_bad_binary_input_raises_samfit_error(pred, gt):
    with pytest.raises(SamfitError):
        evaluate_binary([pred], [gt])


def test_empty_inputs_raise():
    with pytest.raises(SamfitError):
        evaluate_binary([], [])
    with pytest.raises(SamfitError):
        evaluate_binary([np.ones((2, 2))], [])


def test_miou_against_hand_computed_confusion_matrix():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    gt2 = np.array([[0, 0], [0, 0]])
    pred2 = np.stack([np.ones((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2))])  # argmax → 0
    # Rows GT, columns prediction, the ignored pixel left out: class 3 is absent everywhere.
    cm = np.array([[5, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    out = evaluate_multiclass([pred, pred2], [gt, gt2], num_classes=4)
    want = [5 / 6, 2 / 3, 1.0, None]
    assert out["iou_per_class"][:3] == pytest.approx(want[:3]) and out["iou_per_class"][3] is None
    assert out["miou"] == pytest.approx((5 / 6 + 2 / 3 + 1) / 3)
    ev = MulticlassEvaluator(4)
    ev.update(pred, gt)
    ev.update(pred2, gt2)
    assert (ev.confusion == cm).all()


def trans2seg_miou(preds, gts, num_classes):
    """Trans2Seg's segmentron/utils/score.py batch_intersection_union, as the official Conv-LoRA code copies
    it (labels with 255 = ignore, class maps as predictions), summed over the set; mean of inter/(eps+union)."""
    import torch

    inter_total, union_total = torch.zeros(num_classes), torch.zeros(num_classes)
    for pred, gt in zip(preds, gts):
        predict = torch.from_numpy(np.asarray(pred)).float() + 1
        target = torch.from_numpy(np.asarray(gt)).float() + 1
        predict = predict * (target > 0).float()
        intersection = predict * (predict == target).float()
        area_inter = torch.histc(intersection, bins=num_classes, min=1, max=num_classes)
        area_pred = torch.histc(predict, bins=num_classes, min=1, max=num_classes)
        area_lab = torch.histc(target, bins=num_classes, min=1, max=num_classes)
        inter_total += area_inter
        union_total += area_pred + area_lab - area_inter
    return float((inter_total.double() / (2.220446049250313e-16 + union_total.double())).mean())


def test_miou_trans2seg_equals_the_script_it_copies():
    rng = np.random.default_rng(5)
    preds = [rng.integers(0, 4, (9, 11)) for _ in range(3)]
    gts = [rng.choice([0, 1, 2, 255], (9, 11), p=[0.4, 0.3, 0.1, 0.2]) for _ in range(3)]  # class 3 never in GT
    out = evaluate_multiclass(preds, gts, num_classes=5)  # class 4: in neither GT nor predictions
    assert abs(out["miou_trans2seg"] - trans2seg_miou(preds, gts, 5)) < 1e-12
    assert out["iou_per_class"][4] is None and out["miou"] > out["miou_trans2seg"] + 0.01


def test_class_only_predicted_counts_with_zero_iou():
    out = evaluate_multiclass([np.array([[0, 2]])], [np.array([[0, 0]])], num_classes=3)
    assert out["iou_per_class"] == [0.5, None, 0.0] and out["miou"] == pytest.approx(0.25)


def test_multiclass_states_merge():
    rng = np.random.default_rng(3)
    preds = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    gts = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    states = []
    for lo, hi in [(0, 2), (2, 4)]:
        ev = MulticlassEvaluator(5)
        for p, g in zip(preds[lo:hi], gts[lo:hi]):
            ev.update(p, g)
        states.append(pickle.loads(pickle.dumps(ev.state())))
    assert MulticlassEvaluator.from_states(states).compute() == evaluate_multiclass(preds, gts, 5)


@pytest.mark.parametrize("pred, gt", [
    (np.zeros((2, 3), int), np.zeros((3, 2), int)),  # shape mismatch
    (np.full((2, 2), -1), np.zeros((2, 2), int)),  # negative class
    (np.full((2, 2), 3), np.zeros((2, 2), int)),  # class out of range
    (np.zeros((2, 2), int), np.full((2, 2), 7)),  # GT class out of range, not ignore
    (np.zeros((2, 2)), np.zeros((2, 2), int)),  # float (H, W) is not a class map
    (np.zeros((2, 2, 2)), np.zeros((2, 2), int)),  # 2 score channels for 3 classes
    (np.zeros((2, 2), int), np.full((2, 2), 255)),  # every pixel ignored
])
def test_bad_multiclass_input_raises_samfit_error(pred, gt):
    with pytest.raises(SamfitError):
        evaluate_multiclass([pred], [gt], num_classes=3)


masks = st.integers(1, 12).flatmap(lambda h: st.integers(1, 12).flatmap(lambda w: st.tuples(
    st.sampled_from(["empty", "full", "random"]),
    st.sampled_from([np.bool_, np.uint8]),
    hnp.arrays(np.float64, (h, w), elements=st.floats(0, 1)),
    st.sampled_from(["same", "other", "constant"]),
    st.sampled_from([np.float32, np.float64]),
)))


@settings(max_examples=40, deadline=None)
@given(st.lists(masks, min_size=1, max_size=3))
def test_evaluate_binary_never_crashes_or_returns_nan(cases):
    preds, gts = [], []
    for kind, dtype, field, pred_kind, pred_dtype in cases:
        gt = {"empty": field < -1, "full": field >= 0, "random": field > 0.5}[kind]
        gts.append(gt if dtype is np.bool_ else gt.astype(np.uint8) * 255)
        pred = {"same": field, "other": np.resize(field, (field.shape[1] + 1, 3)),
                "constant": np.full_like(field, field.flat[0])}[pred_kind]
        preds.append(pred.astype(pred_dtype))
    out = evaluate_binary(preds, gts)
    assert all(math.isfinite(v) for v in out.values())
    assert 0 <= out["ber"] <= 100 and 0 <= out["ber_per_image"] <= 100
    assert all(0 <= v <= 1 for k, v in out.items() if not k.startswith(("ber", "e_measure")))
    assert all(v >= 0 for k, v in out.items() if k.startswith("e_measure"))  # E may exceed 1: n/(n − 1)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.data())
def test_evaluate_multiclass_never_crashes_or_returns_nan(num_classes, data):
    preds, gts = [], []
    for _ in range(data.draw(st.integers(1, 3))):
        shape = data.draw(st.tuples(st.integers(1, 8), st.integers(1, 8)))
        gt = data.draw(hnp.arrays(np.int64, shape, elements=st.sampled_from([*range(num_classes), 255])))
        gt.flat[0] = 0  # at least one labelled pixel
        scores = data.draw(st.booleans())
        pred = (data.draw(hnp.arrays(np.float32, (num_classes, *shape), elements=st.floats(-5, 5, width=32)))
                if scores else data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, num_classes - 1))))
        preds.append(pred)
        gts.append(gt)
    out = evaluate_multiclass(preds, gts, num_classes)
    assert 0 <= out["miou"] <= 1 and len(out["iou_per_class"]) == num_classes
    assert all(v is None or 0 <= v <= 1 for v in out["iou_per_class"])
