"""Losses against direct formulas, brute-force matching and hand-made examples."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter

from samfit import losses
from samfit.errors import SamfitError
from samfit.losses import (
    LOSSES, balanced_bce_loss, get_loss, hungarian_match, mask_classification_loss, protocol_loss,
    semantic_targets, structure_loss, structure_loss_official,
)
from samfit.model.segmenter import semantic_inference


def np_bce(x, y):
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def binary_example(seed=0, shape=(2, 1, 12, 10)):
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(shape)
    target[..., 3:8, 2:7] = 1
    target[1, ..., 0, 0] = 1
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2, target.double()


def test_structure_loss_equals_the_formula():
    logits, target = binary_example()
    x, y = logits.numpy()[:, 0], target.numpy()[:, 0]
    want = []
    for xi, yi in zip(x, y):
        w = 1 + 5 * np.abs(uniform_filter(yi, size=31, mode="constant", cval=0.0) - yi)  # zeros counted
        wbce = (w * np_bce(xi, yi)).sum() / w.sum()
        p = sigmoid(xi)
        inter, union = (w * p * yi).sum(), (w * (p + yi)).sum()
        want.append(wbce + 1 - (inter + 1) / (union - inter + 1))
    assert structure_loss(logits, target).item() == pytest.approx(np.mean(want), rel=1e-10)


def test_structure_loss_weights_the_bce_unlike_the_official_copy():
    logits, target = binary_example(1)
    x, y = logits.numpy()[:, 0], target.numpy()[:, 0]
    plain = np_bce(x, y).mean()  # what `reduce='none'` silently gives
    wiou = []
    for xi, yi in zip(x, y):
        w = 1 + 5 * np.abs(uniform_filter(yi, size=31, mode="constant") - yi)
        p = sigmoid(xi)
        inter, union = (w * p * yi).sum(), (w * (p + yi)).sum()
        wiou.append(1 - (inter + 1) / (union - inter + 1))
    assert abs(structure_loss(logits, target).item() - (plain + np.mean(wiou))) > 1e-3


def official_structure_formula(x, y):
    """Mean BCE over every pixel of the batch + the mean over images of the weighted IoU term (float64)."""
    wiou = []
    for xi, yi in zip(x, y):
        w = 1 + 5 * np.abs(uniform_filter(yi, size=31, mode="constant", cval=0.0) - yi)
        p = sigmoid(xi)
        inter, union = (w * p * yi).sum(), (w * (p + yi)).sum()
        wiou.append(1 - (inter + 1) / (union - inter + 1))
    return np_bce(x, y).mean() + np.mean(wiou)


@pytest.mark.parametrize("seed, shape", [(0, (2, 1, 12, 10)), (3, (3, 1, 40, 36)), (4, (2, 1, 9, 9))])
def test_official_structure_loss_equals_the_formula(seed, shape):
    logits, target = binary_example(seed, shape)
    want = official_structure_formula(logits.numpy()[:, 0], target.numpy()[:, 0])
    assert structure_loss_official(logits, target).item() == pytest.approx(want, rel=1e-12)
    assert get_loss("structure-official") is structure_loss_official


def test_the_legacy_reduce_argument_is_a_mean():
    """The fact the official loss rests on: `reduce='none'` (legacy, truthy) returns the mean BCE, a scalar."""
    logits, target = binary_example(5)
    with pytest.warns(UserWarning):
        legacy = F.binary_cross_entropy_with_logits(logits, target, reduce="none")
    assert legacy.dim() == 0
    assert legacy.item() == pytest.approx(np_bce(logits.numpy(), target.numpy()).mean(), rel=1e-12)


def test_the_official_protocol_swaps_the_structure_and_mask_classification_losses():
    assert protocol_loss("official", "structure") == "structure-official"
    assert protocol_loss("official", "mask-classification") == "mask-classification-official"
    for loss in ("balanced-bce", "bce", "dice"):
        assert protocol_loss("official", loss) == loss
    for loss in (*LOSSES, "mask-classification"):
        assert protocol_loss("samfit", loss) == loss


def test_structure_loss_prefers_the_right_answer():
    _, target = binary_example()
    perfect = structure_loss((target * 2 - 1) * 12, target).item()
    wrong = structure_loss((1 - target * 2) * 12, target).item()
    unsure = structure_loss(torch.zeros_like(target), target).item()
    assert perfect < 1e-3 < unsure < wrong


def test_three_dim_input_is_read_as_one_channel():
    logits, target = binary_example()
    for name in LOSSES:
        loss = get_loss(name)
        assert loss(logits[:, 0], target[:, 0]).item() == pytest.approx(loss(logits, target).item()), name


def test_balanced_bce_against_the_formula_and_the_pos_weight_form():
    logits, target = binary_example(2)
    x, y = logits.numpy(), target.numpy()
    n_pos, n = y.sum(), y.size
    want = np.mean(-((n - n_pos) / n * y * np.log(sigmoid(x)) + n_pos / n * (1 - y) * np.log(1 - sigmoid(x))))
    got = balanced_bce_loss(logits, target).item()
    assert got == pytest.approx(want, rel=1e-9)
    # EVP / Conv-LoRA write it as w_neg · BCEWithLogits(pos_weight = N_neg / N_pos).
    ratio = torch.tensor((n - n_pos) / n_pos, dtype=torch.float64)
    evp = n_pos / n * F.binary_cross_entropy_with_logits(logits, target, pos_weight=ratio)
    assert got == pytest.approx(evp.item(), rel=1e-9)


def test_bce_and_dice_from_the_registry():
    logits, target = binary_example(3)
    x, y = logits.numpy()[:, 0], target.numpy()[:, 0]
    assert get_loss("bce")(logits, target).item() == pytest.approx(np_bce(x, y).mean())
    p = sigmoid(x)
    dice = [1 - (2 * (pi * yi).sum() + 1e-5) / (pi.sum() + yi.sum() + 1e-5) for pi, yi in zip(p, y)]
    assert get_loss("dice")(logits, target).item() == pytest.approx(np.mean(dice), rel=1e-6)


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(SamfitError) as err:
        get_loss("structre")
    msg = str(err.value)
    assert "'structure'" in msg and all(name in msg for name in LOSSES)


def test_shape_mismatch_raises():
    with pytest.raises(SamfitError):
        structure_loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))
    with pytest.raises(SamfitError):
        balanced_bce_loss(torch.zeros(8, 8), torch.zeros(8, 8))


def pair_costs(class_logits, mask_logits, labels, masks):
    """Mask2Former's matching cost, pair by pair, in numpy."""
    prob = torch.softmax(class_logits.double(), -1).numpy()
    x, m = mask_logits.double().numpy(), masks.double().numpy()
    cost = np.zeros((len(x), len(m)))
    for q, k in itertools.product(range(len(x)), range(len(m))):
        p = sigmoid(x[q])
        dice = 1 - (2 * (p * m[k]).sum() + 1) / (p.sum() + m[k].sum() + 1)
        cost[q, k] = -2 * prob[q, labels[k]] + 5 * np_bce(x[q], m[k]).mean() + 5 * dice
    return cost


@pytest.mark.parametrize("seed", range(12))
def test_hungarian_match_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_q = int(torch.randint(1, 6, (1,), generator=g))
    num_k = int(torch.randint(1, num_q + 1, (1,), generator=g))
    class_logits = torch.randn(num_q, 4, generator=g) * 2
    mask_logits = torch.randn(num_q, 6, 5, generator=g) * 2
    labels = torch.randint(0, 3, (num_k,), generator=g)
    masks = (torch.rand(num_k, 6, 5, generator=g) > 0.5).float()
    cost = pair_costs(class_logits, mask_logits, labels, masks)
    best = min(itertools.permutations(range(num_q), num_k), key=lambda qs: sum(cost[q, k] for k, q in enumerate(qs)))
    pred_idx, gt_idx = hungarian_match(class_logits, mask_logits, labels, masks)
    assert sorted(zip(gt_idx.tolist(), pred_idx.tolist())) == list(enumerate(best))


def test_hungarian_match_without_targets_is_empty():
    pred_idx, gt_idx = hungarian_match(torch.randn(3, 4), torch.randn(3, 5, 5), torch.zeros(0, dtype=torch.long),
                                       torch.zeros(0, 5, 5))
    assert pred_idx.numel() == gt_idx.numel() == 0


def test_mask_classification_loss_by_hand():
    class_logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]]], dtype=torch.float64)  # Q=2, C=2
    mask_logits = torch.tensor([[[[3.0, -2.0]], [[-1.0, 0.5]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    target = {"labels": torch.tensor([0]), "masks": torch.tensor([[[1.0, 0.0]]])}
    cost = pair_costs(class_logits[0], mask_logits[0, :, 0:1], [0], target["masks"])
    q = int(cost[:, 0].argmin())
    assert q == 0
    prob = torch.softmax(class_logits[0], -1).numpy()
    ce = (-1.0 * np.log(prob[0, 0]) - 0.1 * np.log(prob[1, 2])) / (1.0 + 0.1)  # weighted mean, query 1 → no-object
    x, m = mask_logits[0, 0, 0].numpy(), np.array([1.0, 0.0])
    p = sigmoid(x)
    want = 2 * ce + 5 * np_bce(x, m).mean() + 5 * (1 - (2 * (p * m).sum() + 1) / (p.sum() + m.sum() + 1))
    got = mask_classification_loss(class_logits, mask_logits, [target])
    assert got.item() == pytest.approx(want, rel=1e-6)  # the loss runs in float32


def test_mask_classification_loss_is_finite_and_reaches_both_inputs():
    g = torch.Generator().manual_seed(0)
    class_logits = torch.randn(3, 5, 4, generator=g, requires_grad=True)  # B=3, Q=5, C=3
    mask_logits = torch.randn(3, 5, 8, 8, generator=g, requires_grad=True)
    targets = [
        semantic_targets(torch.randint(0, 3, (16, 16), generator=g), 3),  # targets at 2× the mask resolution
        semantic_targets(torch.full((16, 16), 255), 3),  # nothing labelled: every query is no-object
        semantic_targets(np.zeros((8, 8), np.uint8), 3),
    ]
    loss = mask_classification_loss(class_logits, mask_logits, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for grad in (class_logits.grad, mask_logits.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert mask_logits.grad[1].abs().sum() == 0  # no matched mask in the empty image

    empty = [semantic_targets(torch.full((8, 8), 255), 3)] * 3
    assert torch.isfinite(mask_classification_loss(class_logits, mask_logits, empty))


def test_mask_classification_loss_prefers_the_right_answer():
    target = semantic_targets(torch.tensor([[0, 0, 1, 1]] * 4), 2)
    right_masks = (target["masks"] * 2 - 1)[None] * 8
    classes = torch.tensor([[[8.0, 0, 0], [0, 8.0, 0]]])
    right = mask_classification_loss(classes, right_masks, [target])
    wrong = mask_classification_loss(classes, -right_masks, [target])
    assert right < 0.05 < wrong


def test_semantic_targets_keep_every_present_class_and_blank_ignored_pixels():
    t = semantic_targets(np.array([[0, 2], [255, 2]]), num_classes=3)
    assert t["labels"].tolist() == [0, 2] and t["labels"].dtype == torch.int64
    assert t["masks"].tolist() == [[[1, 0], [0, 0]], [[0, 1], [0, 1]]] and t["masks"].dtype == torch.float32
    for bad in (np.array([[0, 3]]), np.array([[-1, 0]]), np.zeros((2, 2)), np.zeros((1, 2, 2), int)):
        with pytest.raises(SamfitError):
            semantic_targets(bad, num_classes=3)


def test_semantic_inference_sums_the_right_classes():
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])  # (B=1, Q=2, C+1=3)
    masks = torch.tensor([[[[0.9, 0.2]], [[0.4, 0.8]]]])  # (1, 2, 1, 2)
    out = semantic_inference(probs.log(), torch.logit(masks))
    want = [[[0.5 * 0.9 + 0.1 * 0.4, 0.5 * 0.2 + 0.1 * 0.8]], [[0.3 * 0.9 + 0.6 * 0.4, 0.3 * 0.2 + 0.6 * 0.8]]]
    assert out.shape == (1, 2, 1, 2)
    assert torch.allclose(out, torch.tensor([want]), atol=1e-6)
    assert not math.isclose(out.sum().item(), masks.sum().item())  # the no-object share is dropped


def test_the_multiclass_segmenter_scores_with_semantic_inference():
    import samfit

    torch.manual_seed(0)
    model = samfit.build_model("tiny", num_classes=3, image_size=64).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    want = F.interpolate(semantic_inference(out["class_logits"], out["mask_logits"]), size=(64, 64),
                         mode="bilinear", align_corners=False)
    assert out["logits"].shape == (2, 3, 64, 64)
    assert torch.allclose(out["logits"], want, atol=1e-6)


def pixel_centres(h, w):
    """(1, H·W, 2) points at every pixel centre, (x, y) in [0, 1]²."""
    ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float64) + 0.5) / h,
                            (torch.arange(w, dtype=torch.float64) + 0.5) / w, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1)[None]


def test_points_at_pixel_centres_read_the_pixels_and_uncertain_points_are_the_least_certain():
    maps = torch.randn(2, 1, 5, 7)
    read = losses.sample_points(maps.double(), pixel_centres(5, 7).expand(2, -1, -1))
    assert torch.allclose(read, maps.double().flatten(1), atol=1e-12), (read - maps.double().flatten(1)).abs().max()
    n, points = 2, 40
    chosen = losses.uncertain_points(maps, points, torch.Generator().manual_seed(3))
    drawn = torch.rand(n, 120, 2, generator=torch.Generator().manual_seed(3))
    keep = int(0.75 * points)
    assert chosen.shape == (n, points, 2)
    for i in range(n):
        certainty = losses.sample_points(maps[i:i + 1], drawn[i:i + 1])[0].abs()
        want = set(map(tuple, drawn[i][certainty.argsort()[:keep]].tolist()))
        assert set(map(tuple, chosen[i, :keep].tolist())) == want


def test_official_multiclass_loss_on_every_pixel_equals_the_unweighted_dense_formula(monkeypatch):
    """With the points patched to every pixel centre, the official loss is the dense one: matching cost 1·class +
    5·BCE + 5·dice (brute force over assignments), loss CE (no-object 0.1) + BCE + dice, unweighted, over the
    number of target masks, on mask logits bilinearly upsampled to the targets' size."""
    g = torch.Generator().manual_seed(7)
    b, q, c, h, w = 2, 4, 3, 6, 6
    class_logits = torch.randn(b, q, c + 1, generator=g, dtype=torch.float64)
    mask_logits = torch.randn(b, q, 3, 3, generator=g, dtype=torch.float64) * 2
    maps = [torch.randint(0, c, (h, w), generator=g) for _ in range(b)]
    targets = [semantic_targets(m, c) for m in maps]
    centres = pixel_centres(h, w)
    monkeypatch.setattr(losses, "uniform_points", lambda n, p, like, generator=None: centres.expand(n, -1, -1))
    monkeypatch.setattr(losses, "uncertain_points", lambda x, p, generator=None: centres.expand(len(x), -1, -1))
    got = losses.mask_classification_loss_official(class_logits, mask_logits, targets, num_points=h * w).item()

    up = F.interpolate(mask_logits, size=(h, w), mode="bilinear", align_corners=False).numpy().reshape(b, q, -1)
    probs = torch.softmax(class_logits, -1).numpy()
    target_classes = np.full((b, q), c)
    bce_sum = dice_sum = 0.0
    for i, t in enumerate(targets):
        labels, masks = t["labels"].numpy(), t["masks"].numpy().reshape(len(t["labels"]), -1)
        x, p = up[i], sigmoid(up[i])
        bce = np.array([[np_bce(x[j], m).mean() for m in masks] for j in range(q)])
        dice = np.array([[1 - (2 * (p[j] * m).sum() + 1) / (p[j].sum() + m.sum() + 1) for m in masks]
                         for j in range(q)])
        cost = -probs[i][:, labels] + 5 * bce + 5 * dice
        best = min(itertools.permutations(range(q), len(labels)),
                   key=lambda perm: sum(cost[perm[k], k] for k in range(len(labels))))
        for k, j in enumerate(best):
            target_classes[i, j] = labels[k]
            bce_sum, dice_sum = bce_sum + bce[j, k], dice_sum + dice[j, k]
    weight = np.ones(c + 1)
    weight[-1] = 0.1
    logp = torch.log_softmax(class_logits, -1).numpy()
    nll = np.array([[-logp[i, j, target_classes[i, j]] for j in range(q)] for i in range(b)])
    w_t = weight[target_classes]
    ce = (w_t * nll).sum() / w_t.sum()
    num_masks = sum(len(t["labels"]) for t in targets)
    assert got == pytest.approx(ce + (bce_sum + dice_sum) / num_masks, rel=1e-9)


def test_official_multiclass_loss_with_random_points_is_finite_seeded_and_trains():
    g = torch.Generator().manual_seed(1)
    class_logits = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    mask_logits = torch.randn(2, 6, 8, 8, generator=g, requires_grad=True)
    targets = [semantic_targets(torch.randint(0, 3, (32, 32), generator=g), 3) for _ in range(2)]
    first = losses.mask_classification_loss_official(class_logits, mask_logits, targets, num_points=500,
                                                     generator=torch.Generator().manual_seed(0))
    again = losses.mask_classification_loss_official(class_logits, mask_logits, targets, num_points=500,
                                                     generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(first) and first.item() == again.item()
    first.backward()
    assert mask_logits.grad.abs().sum() > 0 and class_logits.grad.abs().sum() > 0
