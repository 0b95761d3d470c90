"""Image/mask pairs from a canonical split folder or a CSV, resized and normalised for SAM.

Images: RGB, resized to S×S bicubic, normalised as the model's backbone wants (samfit/model/backbones.py: SAM's
and SAM 2's pixel mean/std on the 0-255 scale, MedSAM's min-max scaling to [0, 1]).
Masks: resized nearest; binary -> float {0,1} (1, S, S); multi-class -> long class map (S, S), 255 = ignore.
Augmentation (horizontal flip) is applied by the engine on the batch, from a seeded generator, so that
it is reproducible across workers, resumes and ranks.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from samfit.data.registry import IMAGE_SUFFIXES
from samfit.errors import SamfitError
from samfit.model.backbones import normalisation


def list_pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """Pair <split>/images/<stem>.* with <split>/masks/<stem>.png; a lone image or mask is an error."""
    images = {p.stem: p for p in sorted((split_dir / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in sorted((split_dir / "masks").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    for stem in sorted(set(images) - set(masks)):
        raise SamfitError(f"Image without mask: {images[stem]} (expected {split_dir / 'masks' / (stem + '.png')}).")
    for stem in sorted(set(masks) - set(images)):
        raise SamfitError(f"Mask without image: {masks[stem]} (expected an image {split_dir / 'images' / stem}.*).")
    if not images:
        raise SamfitError(f"No images in {split_dir / 'images'}.")
    return [(images[s], masks[s]) for s in sorted(images)]


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise SamfitError(f"Unreadable image: {path}. Replace or delete it, or pass --skip-bad to skip it.")
    return image[..., ::-1]


def read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise SamfitError(f"Unreadable mask: {path}. Replace or delete it (with its image), or pass --skip-bad.")
    if mask.ndim == 3:
        raise SamfitError(f"Mask {path} has {mask.shape[2]} channels; samfit masks are single-channel PNGs "
                          f"(run `samfit data prepare` to convert official masks).")
    return mask


class SegmentationFolder(Dataset):
    """(image, mask) pairs for one split, validated on first read of each item."""

    def __init__(self, pairs: list[tuple[Path, Path]], image_size: int, task: str, num_classes: int,
                 limit: int | None = None, skip_bad: bool = False, model: str = "vit_b"):
        self.image_size, self.task, self.num_classes = image_size, task, num_classes
        self.normalise = normalisation(model)  # the backbone's (SAM's mean/std, MedSAM's [0, 1] scaling)
        self.skipped: list[str] = []
        pairs = pairs[:limit] if limit else pairs
        if skip_bad:
            good = []
            for image, mask in pairs:
                try:
                    self._validate(read_image(image), read_mask(mask), image, mask)
                    good.append((image, mask))
                except SamfitError as exc:
                    self.skipped.append(str(exc))
            pairs = good
            if not pairs:
                raise SamfitError("Every image of the split was skipped as bad; see `samfit data check`.")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def _validate(self, image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
        if image.shape[:2] != mask.shape[:2]:
            raise SamfitError(f"Mask size {mask.shape[1]}x{mask.shape[0]} of {mask_path} differs from image size "
                              f"{image.shape[1]}x{image.shape[0]} of {image_path}.")
        values = np.unique(mask)
        if self.task == "binary":
            bad = values[(values != 0) & (values != 255)]
        else:
            bad = values[(values >= self.num_classes) & (values != 255)]
        if bad.size:
            allowed = "0 and 255" if self.task == "binary" else f"0..{self.num_classes - 1} and 255 (ignore)"
            raise SamfitError(f"Illegal mask values {bad[:5].tolist()} in {mask_path}; allowed: {allowed}. "
                              f"Run `samfit data prepare` to decode official masks.")

    def gt(self, index: int) -> np.ndarray:
        """The ground truth at its original resolution (bool for binary, class map otherwise)."""
        mask = read_mask(self.pairs[index][1])
        return mask > 127 if self.task == "binary" else mask

    def __getitem__(self, index: int):
        image_path, mask_path = self.pairs[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        self._validate(image, mask, image_path, mask_path)
        s = self.image_size
        image = cv2.resize(image, (s, s), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        image = torch.from_numpy(self.normalise(image).transpose(2, 0, 1).copy())
        mask = cv2.resize(mask, (s, s), interpolation=cv2.INTER_NEAREST)
        if self.task == "binary":
            target = torch.from_numpy((mask > 127).astype(np.float32))[None]
        else:
            target = torch.from_numpy(mask.astype(np.int64))
        return image, target, index


def split_pairs(spec, folder: Path, split: str) -> list[tuple[Path, Path]]:
    if spec.csv:
        from samfit.data.csvpairs import read_pairs_csv

        return read_pairs_csv(spec.csv[split])
    return list_pairs(folder / split)


def selection_pairs(spec, folder: Path) -> tuple[list, list, dict]:
    """(training pairs, model-selection pairs, what the selection set is) for one run.

    The dataset's val split when it has one (declared, or a val/ folder its preparation wrote); otherwise a
    fixed share of train (`val_fraction`, default 0.1, at least one image) is held out: the same images for every method and seed
    (a permutation seeded with 0 over the sorted pairs), and never a test set, so test scores stay unbiased."""
    prepared_val = not spec.csv and "val" not in spec.test and (folder / "val" / "images").is_dir()
    val = spec.val or ("val" if prepared_val else None)
    train = split_pairs(spec, folder, spec.train)
    if val:
        return train, split_pairs(spec, folder, val), {"split": val}
    held = max(1, round(spec.val_fraction * len(train)))
    if held >= len(train):
        raise SamfitError(
            f"Dataset '{spec.name}' has no val split and {len(train)} training image(s): too few to hold out "
            f"val_fraction={spec.val_fraction} of them to pick the best epoch on. Add a val split "
            f"(<dataset>/val/images and masks) or more training images.")
    by_name = sorted(train, key=lambda pair: pair[0].name)
    picked = set(np.random.default_rng(0).permutation(len(by_name))[:held].tolist())
    keep = [pair for i, pair in enumerate(by_name) if i not in picked]
    holdout = [pair for i, pair in enumerate(by_name) if i in picked]
    return keep, holdout, {"split": f"{spec.train} (held out)", "held_out": held,
                           "val_fraction": spec.val_fraction}


FRACTION_SEED = 1  # the one permutation every --train-fraction subset is a prefix of


def fraction_pairs(pairs: list, fraction: float) -> list:
    """The training pairs of `--train-fraction`: a prefix (round(F * n), at least one image) of one fixed
    permutation (seeded with FRACTION_SEED, not the run's seed) of the pairs sorted by image name, so every method
    and seed trains on the same images and a smaller fraction's images are inside a larger one's. Given the pairs
    left for training after `selection_pairs`, the selection split stays the same whatever the fraction.
    Returned in image-name order; fraction 1 returns `pairs` unchanged."""
    if fraction >= 1:
        return pairs
    by_name = sorted(pairs, key=lambda pair: pair[0].name)
    keep = max(1, round(fraction * len(by_name)))
    picked = set(np.random.default_rng(FRACTION_SEED).permutation(len(by_name))[:keep].tolist())
    return [pair for i, pair in enumerate(by_name) if i in picked]
