"""`mask-classification-official` against the class the official code calls: HF transformers' `Mask2FormerLoss`
(a test-only dependency, the `dev` extra), on the same logits and targets, point sampling included.

Neither API takes the sample points, so both draw them from torch's global generator, seeded identically before
each call: the matcher draws one (1, P, 2) set per image, then the mask terms one (N, 3P, 2) oversampled set and one
(N, P/4, 2) uniform set, in that order in both. HF draws in torch's default dtype, samfit in the logits' dtype, so
the comparison runs in float64 with float64 as the default dtype: the very same points, and a tolerance derived
from float64's machine epsilon. transformers is imported by the `hf_loss_class` fixture, when one of these tests runs:
collecting the test suite never pays for it (several seconds per process).
"""
import pytest
import torch
import torch.nn.functional as F
from samfit.losses import (IMPORTANCE_RATIO, NUM_POINTS, OFFICIAL_MATCH_WEIGHTS, OVERSAMPLE_RATIO,
                           mask_classification_loss_official, semantic_targets)

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e4 * torch.finfo(torch.float64).eps  # ~2e-12: sums over 12,544 points in another order


@pytest.fixture(scope="module")
def hf_loss_class():
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    return Mask2FormerConfig, Mask2FormerLoss


@pytest.fixture(autouse=True)
def float64_default():
    """HF's torch.rand follows the default dtype: float64 makes its draws the same numbers as samfit's."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def hf_loss(classes, class_logits, mask_logits, targets, num_points=NUM_POINTS):
    """The official code's loss: AutoGluon's sam.py upsamples the mask logits bilinearly to the input size, its
    losses/utils.py builds Mask2FormerLoss(Mask2FormerConfig(num_labels=C)), its lit_semantic_seg.py casts the target
    masks to the logits' dtype and sums the terms.
    The matcher's costs are the paper-era ones (class 1, mask 5, dice 5: transformers then fixed the class cost at 1;
    this release reads it from `class_weight`, so it is set)."""
    Mask2FormerConfig, Mask2FormerLoss = classes
    w_class, w_mask, w_dice = OFFICIAL_MATCH_WEIGHTS
    config = Mask2FormerConfig(num_labels=class_logits.shape[-1] - 1, class_weight=w_class, mask_weight=w_mask,
                               dice_weight=w_dice, no_object_weight=0.1, train_num_points=num_points,
                               oversample_ratio=OVERSAMPLE_RATIO, importance_sample_ratio=IMPORTANCE_RATIO)
    criterion = Mask2FormerLoss(config, weight_dict={}).double()
    size = targets[0]["masks"].shape[-2:]
    upsampled = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    terms = criterion(masks_queries_logits=upsampled, class_queries_logits=class_logits,
                      mask_labels=[t["masks"].to(upsampled) for t in targets],
                      class_labels=[t["labels"] for t in targets])
    assert set(terms) == {"loss_cross_entropy", "loss_mask", "loss_dice"}
    return sum(terms.values())


def both(hf, class_logits, mask_logits, targets, seed, **kw):
    """(samfit's loss, HF's loss) and their gradients on the logits, each after torch.manual_seed(seed)."""
    out = []
    for fn in (mask_classification_loss_official, lambda *a, **k: hf_loss(hf, *a, **k)):
        c, m = class_logits.clone().requires_grad_(), mask_logits.clone().requires_grad_()
        torch.manual_seed(seed)
        loss = fn(c, m, targets, **kw)
        loss.backward()
        out.append((loss.detach(), c.grad, m.grad))
    return out


def case(batch, queries, classes, low, high, seed=0, ignore=False):
    """Random logits at the decoder's resolution `low` and semantic targets of random class maps at `high`
    (blocks of classes, so masks have areas and borders; `ignore` paints a 255 band)."""
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, classes + 1, generator=g)
    mask_logits = 3 * torch.randn(batch, queries, low, low, generator=g)
    targets = []
    for _ in range(batch):
        coarse = torch.randint(0, classes, (1, 1, 4, 4), generator=g).double()
        class_map = F.interpolate(coarse, size=(high, high), mode="nearest")[0, 0].long()
        if ignore:
            class_map[: high // 4] = 255
        targets.append(semantic_targets(class_map, classes))
    return class_logits, mask_logits, targets


@pytest.mark.parametrize("batch, queries, classes, low, high, ignore", [
    (2, 6, 3, 16, 64, False),  # samfit's 2 queries per class
    (2, 10, 12, 16, 48, True),  # the official unit tests' 10 queries for 12 classes; ignored pixels
    (3, 2, 4, 8, 32, False),  # fewer queries than target masks: some targets stay unmatched
])
def test_official_loss_equals_hf_mask2former_loss(hf_loss_class, batch, queries, classes, low, high, ignore):
    class_logits, mask_logits, targets = case(batch, queries, classes, low, high, ignore=ignore)
    assert any(len(t["labels"]) > 1 for t in targets)
    (ours, our_c, our_m), (ref, ref_c, ref_m) = both(hf_loss_class, class_logits, mask_logits, targets, seed=7)
    torch.testing.assert_close(ours, ref, rtol=TOL, atol=TOL)
    torch.testing.assert_close(our_c, ref_c, rtol=TOL, atol=TOL)
    torch.testing.assert_close(our_m, ref_m, rtol=TOL, atol=TOL)


def test_the_comparison_sees_the_points(hf_loss_class):
    """Another seed moves the loss by far more than the tolerance: equal losses above mean equal points."""
    class_logits, mask_logits, targets = case(2, 6, 3, 16, 64)
    (a, _, _), _ = both(hf_loss_class, class_logits, mask_logits, targets, seed=7)
    (b, _, _), _ = both(hf_loss_class, class_logits, mask_logits, targets, seed=8)
    assert (a - b).abs() > 1e3 * TOL


def test_an_image_without_target_masks_draws_its_matching_points_as_hf_does(hf_loss_class):
    """An image whose pixels are all ignored has no target masks; HF still draws its matching points, and so must
    samfit, or every later point differs."""
    class_logits, mask_logits, targets = case(3, 6, 3, 16, 32, seed=3)
    targets[1] = semantic_targets(torch.full((32, 32), 255), 3)
    assert targets[1]["labels"].numel() == 0
    (ours, _, our_m), (ref, _, ref_m) = both(hf_loss_class, class_logits, mask_logits, targets, seed=5,
                                             num_points=2000)
    torch.testing.assert_close(ours, ref, rtol=TOL, atol=TOL)
    torch.testing.assert_close(our_m, ref_m, rtol=TOL, atol=TOL)
