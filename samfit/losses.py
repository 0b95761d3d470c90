"""Training losses: binary (structure loss, class-balanced BCE, BCE, Dice) and Mask2Former-style mask classification.

Binary losses take logits and a float target in [0, 1] of the same shape, (B, 1, H, W) or (B, H, W), and
return a scalar. `get_loss(name)` picks one by name.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from samfit.errors import SamfitError, unknown_name

# Mask2Former's weights (Cheng et al., CVPR 2022), used both as matching costs and as loss weights.
CLASS_WEIGHT = 2.0
MASK_BCE_WEIGHT = 5.0
MASK_DICE_WEIGHT = 5.0


def _as_nchw(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape != target.shape:
        raise SamfitError(f"Loss inputs differ in shape: logits {tuple(logits.shape)}, target {tuple(target.shape)}.")
    if logits.dim() == 3:
        logits, target = logits.unsqueeze(1), target.unsqueeze(1)
    if logits.dim() != 4:
        raise SamfitError(f"Binary losses take (B, 1, H, W) or (B, H, W) tensors, got {tuple(logits.shape)}.")
    return logits, target.to(logits.dtype)


def structure_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PraNet's structure loss (Fan et al., "PraNet", MICCAI 2020; used by Conv-LoRA for binary tasks).

    w = 1 + 5·|avgpool_31(y) − y|  (31×31 box filter, stride 1, zero padding 15 counted in the average),
    L_wbce = Σ w·BCE(x, y) / Σ w,   p = σ(x),
    L_wiou = 1 − (Σ w·p·y + 1) / (Σ w·(p + y) − Σ w·p·y + 1),
    sums per image over pixels; the loss is mean over the batch of L_wbce + L_wiou.

    This is the intended weighted BCE. The official PraNet code (and Conv-LoRA's copy) calls
    `binary_cross_entropy_with_logits(..., reduce='none')`; the deprecated `reduce` argument makes that an
    already-averaged scalar, so its "weighted" BCE is in effect the plain mean BCE.
    """
    logits, target = _as_nchw(logits, target)
    weight = 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * target * weight).sum(dim=(2, 3))
    union = ((prob + target) * weight).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def structure_loss_official(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The structure loss as the official PraNet-derived code runs it (`--loss structure-official`).

    Its `binary_cross_entropy_with_logits(..., reduce='none')` is PyTorch's legacy `reduce` argument: a truthy
    value means reduction to the mean, so the BCE term is one scalar, the plain mean BCE over every pixel of the
    batch, and weighting that scalar by w and dividing by Σw leaves it unchanged. The weighted IoU is as written:
    L = mean BCE(x, y) + mean over the batch of 1 − (Σw·p·y + 1) / (Σw·(p + y) − Σw·p·y + 1),
    w = 1 + 5·|avgpool_31(y) − y|, p = σ(x), sums per image over pixels.
    """
    logits, target = _as_nchw(logits, target)
    weight = 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target * weight).sum(dim=(2, 3))
    union = ((prob + target) * weight).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return bce + wiou.mean()


def balanced_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE (HED, Xie & Tu, ICCV 2015), as used for SBU shadows by EVP (Liu et al., CVPR 2023)
    and Conv-LoRA.

    With N_pos, N_neg the positive/negative pixel counts of the whole batch and N = N_pos + N_neg:
    L = mean over pixels of −[ (N_neg/N)·y·log σ(x) + (N_pos/N)·(1 − y)·log(1 − σ(x)) ].
    (A batch with no negative pixels thus gets zero weight on its positives, and vice versa.)
    """
    logits, target = _as_nchw(logits, target)
    n_pos = target.detach().sum()
    n_total = target.numel()
    w_pos, w_neg = (n_total - n_pos) / n_total, n_pos / n_total
    loss = -(w_pos * target * F.logsigmoid(logits) + w_neg * (1 - target) * F.logsigmoid(-logits))
    return loss.mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain binary cross-entropy on logits, mean over pixels."""
    logits, target = _as_nchw(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss on σ(logits), per image, mean over the batch (MONAI `DiceLoss(sigmoid=True)`)."""
    from monai.losses import DiceLoss  # imported here: monai's import takes seconds (and imports transformers)

    logits, target = _as_nchw(logits, target)
    return DiceLoss(sigmoid=True)(logits, target)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "structure": structure_loss,
    "structure-official": structure_loss_official,
    "balanced-bce": balanced_bce_loss,
    "bce": bce_loss,
    "dice": dice_loss,
}


MASK_CLASSIFICATION = "mask-classification"  # the loss of multi-class tasks (`mask_classification_loss`)
MASK_CLASSIFICATION_OFFICIAL = "mask-classification-official"  # `mask_classification_loss_official`
MULTICLASS_LOSSES = (MASK_CLASSIFICATION, MASK_CLASSIFICATION_OFFICIAL)

# The loss `--protocol official` trains with in place of a dataset's default (the others are the official ones).
OFFICIAL_LOSSES = {"structure": "structure-official", MASK_CLASSIFICATION: MASK_CLASSIFICATION_OFFICIAL}


def protocol_loss(protocol: str, loss: str) -> str:
    """The loss a run of `protocol` uses where the dataset's default is `loss`."""
    return OFFICIAL_LOSSES.get(loss, loss) if protocol == "official" else loss


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The binary loss called `name` (one of `LOSSES`)."""
    if name not in LOSSES:
        raise unknown_name("loss", name, LOSSES)
    return LOSSES[name]


def _resize_masks(masks: torch.Tensor, size) -> torch.Tensor:
    """(K, H, W) target masks → (K, *size) float, by area averaging (soft values at the borders)."""
    masks = masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks[None], size=tuple(size), mode="area")[0]
    return masks


@torch.no_grad()
def hungarian_match(class_logits: torch.Tensor, mask_logits: torch.Tensor, gt_classes: torch.Tensor,
                    gt_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Match one image's Q predictions to its K ground-truth masks (Mask2Former, Cheng et al., CVPR 2022).

    Inputs: class_logits (Q, C+1), mask_logits (Q, h, w), gt_classes (K,), gt_masks (K, H, W) (resized to
    (h, w) by area averaging). Cost(q, k) = 2·(−softmax(class_logits)[q, c_k]) + 5·BCE(x_q, m_k)
    + 5·(1 − (2·Σσ(x_q)·m_k + 1) / (Σσ(x_q) + Σm_k + 1)), BCE averaged over pixels; minimised with
    `scipy.optimize.linear_sum_assignment`. Returns (pred_idx, gt_idx), int64, min(Q, K) pairs.
    """
    gt_masks = _resize_masks(gt_masks, mask_logits.shape[-2:])
    if gt_classes.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    prob = class_logits.float().softmax(-1)
    cost_class = -prob[:, gt_classes.long()]
    x = mask_logits.float().flatten(1)
    t = gt_masks.flatten(1).to(x)
    cost_bce = (F.softplus(-x) @ t.T + F.softplus(x) @ (1 - t).T) / x.shape[1]
    p = x.sigmoid()
    cost_dice = 1 - (2 * p @ t.T + 1) / (p.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    cost = CLASS_WEIGHT * cost_class + MASK_BCE_WEIGHT * cost_bce + MASK_DICE_WEIGHT * cost_dice
    pred_idx, gt_idx = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(gt_idx, dtype=torch.int64)


def mask_classification_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[dict],
                             no_object_weight: float = 0.1) -> torch.Tensor:
    """Mask2Former's set loss (Cheng et al., CVPR 2022) after `hungarian_match` per image.

    class_logits (B, Q, C+1), the last class being "no object"; mask_logits (B, Q, h, w); targets: one dict
    per image, {"labels": LongTensor (K,), "masks": FloatTensor (K, H, W)}. With M = total matched masks:
    L = 2·CE(all B·Q queries; unmatched ones → class C; class weights 1, no-object `no_object_weight`)
      + 5·(1/M)·Σ_matched mean-pixel BCE + 5·(1/M)·Σ_matched (1 − (2·Σp·m + 1) / (Σp + Σm + 1)).
    Mask terms are computed at the predicted masks' resolution (targets area-resized), a dense stand-in for
    Mask2Former's point sampling.
    """
    if class_logits.dim() != 3 or mask_logits.dim() != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise SamfitError(f"Expected class_logits (B, Q, C+1) and mask_logits (B, Q, H, W), got "
                          f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}.")
    if len(targets) != class_logits.shape[0]:
        raise SamfitError(f"Got {len(targets)} targets for a batch of {class_logits.shape[0]}.")
    num_classes = class_logits.shape[-1] - 1
    size, device = mask_logits.shape[-2:], mask_logits.device
    target_classes = torch.full(class_logits.shape[:2], num_classes, dtype=torch.int64, device=device)
    matched_logits, matched_masks = [], []
    for b, target in enumerate(targets):
        labels = target["labels"].long().to(device)
        masks = _resize_masks(target["masks"].to(device), size)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise SamfitError(f"Target labels must lie in 0..{num_classes - 1}, got {labels.tolist()}.")
        if masks.shape[0] != labels.shape[0]:
            raise SamfitError(f"Target has {labels.shape[0]} labels but {masks.shape[0]} masks.")
        pred_idx, gt_idx = hungarian_match(class_logits[b], mask_logits[b], labels, masks)
        pred_idx, gt_idx = pred_idx.to(device), gt_idx.to(device)
        target_classes[b, pred_idx] = labels[gt_idx]
        matched_logits.append(mask_logits[b, pred_idx])
        matched_masks.append(masks[gt_idx])

    class_weight = torch.ones(num_classes + 1, device=device)
    class_weight[-1] = no_object_weight
    loss_ce = F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, weight=class_weight)

    x = torch.cat(matched_logits).float().flatten(1)
    m = torch.cat(matched_masks).float().flatten(1)
    num_masks = max(x.shape[0], 1)
    loss_bce = F.binary_cross_entropy_with_logits(x, m, reduction="none").mean(1).sum() / num_masks
    p = x.sigmoid()
    loss_dice = (1 - (2 * (p * m).sum(1) + 1) / (p.sum(1) + m.sum(1) + 1)).sum() / num_masks
    return CLASS_WEIGHT * loss_ce + MASK_BCE_WEIGHT * loss_bce + MASK_DICE_WEIGHT * loss_dice


def semantic_targets(class_map, num_classes: int, ignore_index: int = 255) -> dict:
    """Turn an (H, W) class-index map into a mask-classification target.

    Every class present in the map becomes one (label, binary mask) pair, background (class 0) included, as
    Mask2Former does for semantic segmentation: background is a class to segment like the others, and
    `samfit.model.segmenter.semantic_inference` then scores it. Pixels equal to `ignore_index` are 0 in every mask.
    Returns {"labels": LongTensor (K,), "masks": FloatTensor (K, H, W)}, labels sorted.
    """
    class_map = class_map if torch.is_tensor(class_map) else torch.as_tensor(np.asarray(class_map))
    if class_map.dim() != 2 or class_map.is_floating_point() or class_map.dtype == torch.bool:
        raise SamfitError(f"A class map must be an (H, W) integer map, got shape {tuple(class_map.shape)} "
                          f"and dtype {class_map.dtype}.")
    class_map = class_map.long()
    labels = torch.unique(class_map)
    labels = labels[labels != ignore_index]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise SamfitError(f"Class map values must lie in 0..{num_classes - 1} or be {ignore_index} (ignored), "
                          f"got {labels.tolist()}.")
    masks = (class_map[None] == labels[:, None, None]).float()
    return {"labels": labels, "masks": masks}


# The official code's multi-class loss: HF transformers' Mask2FormerLoss as AutoGluon calls it (docs/reference.md,
# Differences from the official code). Its terms are summed unweighted; the matcher weighs class 1, mask 5, dice 5.
OFFICIAL_MATCH_WEIGHTS = (1.0, 5.0, 5.0)  # class, mask BCE, dice
NUM_POINTS, OVERSAMPLE_RATIO, IMPORTANCE_RATIO = 12544, 3.0, 0.75


def sample_points(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """maps (N, 1, H, W), coords (N, P, 2) in [0, 1]² as (x, y) → (N, P): bilinear values, align_corners=False, zero
    outside (so a point at a pixel centre reads that pixel exactly)."""
    return F.grid_sample(maps, 2 * coords[:, :, None] - 1, align_corners=False)[:, 0, :, 0]


def uniform_points(n: int, num_points: int, like: torch.Tensor, generator=None) -> torch.Tensor:
    """(n, P, 2) points drawn uniformly from [0, 1]², on the device and in the dtype of `like`."""
    return torch.rand(n, num_points, 2, device=like.device, dtype=like.dtype, generator=generator)


def uncertain_points(logits: torch.Tensor, num_points: int, generator=None) -> torch.Tensor:
    """Mask2Former's importance sampling: of OVERSAMPLE_RATIO·P uniform points keep the IMPORTANCE_RATIO·P with the
    smallest |logit|, add uniform points to P. logits (N, 1, H, W) → coords (N, P, 2)."""
    n = logits.shape[0]
    drawn = uniform_points(n, int(num_points * OVERSAMPLE_RATIO), logits, generator)
    uncertainty = -sample_points(logits, drawn).abs()
    keep = int(IMPORTANCE_RATIO * num_points)
    index = uncertainty.topk(keep, dim=1).indices
    chosen = torch.gather(drawn, 1, index[..., None].expand(-1, -1, 2))
    extra = uniform_points(n, num_points - keep, logits, generator)
    return torch.cat([chosen, extra], dim=1)


@torch.no_grad()
def official_match(class_logits, mask_logits, labels, masks, num_points, generator=None):
    """One image's matching on P uniform points shared by predictions and targets: cost = 1·(−p_class)
    + 5·mean-point BCE + 5·dice, minimised by `linear_sum_assignment`. The points are drawn even for an image
    without target masks, as HF's matcher does, so every later draw is the same as the official code's."""
    coords = uniform_points(1, num_points, mask_logits, generator)
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    t = sample_points(masks[:, None].to(mask_logits), coords.expand(masks.shape[0], -1, -1))
    x = sample_points(mask_logits[:, None], coords.expand(mask_logits.shape[0], -1, -1))
    cost_class = -class_logits.softmax(-1)[:, labels]
    cost_bce = (F.softplus(-x) @ t.T + F.softplus(x) @ (1 - t).T) / num_points
    p = x.sigmoid()
    cost_dice = 1 - (2 * p @ t.T + 1) / (p.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    w_class, w_mask, w_dice = OFFICIAL_MATCH_WEIGHTS
    cost = (w_mask * cost_bce + w_class * cost_class + w_dice * cost_dice).clamp(-1e10, 1e10).nan_to_num(0)
    pred_idx, gt_idx = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(gt_idx, dtype=torch.int64)


def mask_classification_loss_official(class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[dict],
                                      no_object_weight: float = 0.1, num_points: int = NUM_POINTS,
                                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The multi-class loss as the official code runs it: mask logits upsampled bilinearly to the targets' size,
    matched by `official_match`, then L = CE (no-object weight 0.1) + (1/M)·Σ mean-point BCE + (1/M)·Σ dice on
    `uncertain_points` of each matched pair, M the number of target masks (at least 1); the terms unweighted.
    `generator` fixes the random points (default: torch's global generator, as the official code)."""
    size = targets[0]["masks"].shape[-2:] if targets else mask_logits.shape[-2:]
    dtype = torch.promote_types(mask_logits.dtype, torch.float32)  # 16-bit logits computed in float32
    logits = F.interpolate(mask_logits.to(dtype), size=tuple(size), mode="bilinear", align_corners=False)
    num_classes, device = class_logits.shape[-1] - 1, logits.device
    target_classes = torch.full(class_logits.shape[:2], num_classes, dtype=torch.int64, device=device)
    matched_logits, matched_masks = [], []
    for b, target in enumerate(targets):
        labels, masks = target["labels"].long().to(device), target["masks"].to(device, dtype)
        pred_idx, gt_idx = official_match(class_logits[b].to(dtype), logits[b], labels, masks, num_points, generator)
        pred_idx, gt_idx = pred_idx.to(device), gt_idx.to(device)
        target_classes[b, pred_idx] = labels[gt_idx]
        matched_logits.append(logits[b, pred_idx])
        matched_masks.append(masks[gt_idx])
    class_weight = torch.ones(num_classes + 1, device=device)
    class_weight[-1] = no_object_weight
    loss_ce = F.cross_entropy(class_logits.to(dtype).transpose(1, 2), target_classes, weight=class_weight.to(dtype))
    num_masks = max(sum(t["labels"].numel() for t in targets), 1)
    x, m = torch.cat(matched_logits)[:, None], torch.cat(matched_masks)[:, None]
    with torch.no_grad():
        coords = uncertain_points(x, num_points, generator)
        point_labels = sample_points(m, coords)
    point_logits = sample_points(x, coords)
    loss_bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1).sum()
    p = point_logits.sigmoid()
    loss_dice = (1 - (2 * (p * point_labels).sum(1) + 1) / (p.sum(1) + point_labels.sum(1) + 1)).sum()
    return loss_ce + (loss_bce + loss_dice) / num_masks
