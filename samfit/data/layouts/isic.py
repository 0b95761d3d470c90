"""ISIC 2017 (Codella et al. 2018), Part 1 "Lesion Segmentation": the six official zips
ISIC-2017_{Training,Validation,Test_v2}_{Data,Part1_GroundTruth} -> train / val / test.

Also read: mirrors that nest each folder in one of the same name (the common Kaggle copy:
`ISIC-2017_Training_Data/ISIC-2017_Training_Data/...`; the folder that holds the images is taken), and the
AutoGluon test fixture's short names (`train/ISIC-2017_Train`, `val/ISIC-2017_Val`, `test/ISIC-2017_Test`, masks
in `..._GroundTruth` or `..._Part1_GroundTruth` beside them). Masks are `<stem>_segmentation.png` (or `<stem>.png`).
"""
from __future__ import annotations

from pathlib import Path

from samfit.data.layouts.common import (DirIndex, Layout, Splits, holds_images, layout_error, pair_folder,
                                        strip_suffix)
from samfit.data.layouts.masks import decode_binary_mask

NAME = "isic2017"
TREE = """
ISIC-2017_Training_Data/ISIC_0000000.jpg            (*_superpixels.png and *_metadata.csv are skipped)
ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png
ISIC-2017_Validation_Data/  ISIC-2017_Validation_Part1_GroundTruth/
ISIC-2017_Test_v2_Data/     ISIC-2017_Test_v2_Part1_GroundTruth/
(the six zips themselves, or the folders they unpack to; X/X/ nesting is fine; also the short names
ISIC-2017_{Train,Val,Test}/ with ISIC-2017_{Train,Val,Test}_GroundTruth/)"""
ISIC_SPLITS = {"train": ("Training", "Train"), "val": ("Validation", "Val"), "test": ("Test_v2", "Test")}


def _names(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    aliases = ISIC_SPLITS[split]
    images = tuple(n for a in aliases for n in (f"ISIC-2017_{a}_Data", f"ISIC-2017_{a}"))
    masks = tuple(n for a in aliases for n in (f"ISIC-2017_{a}_Part1_GroundTruth", f"ISIC-2017_{a}_GroundTruth"))
    return images, masks


def _folder(index: DirIndex, names: tuple[str, ...]) -> Path | None:
    for name in names:  # the official name first
        found = index.named(name, having=holds_images)
        if found is not None:
            return found
    return None


def find_isic2017(index: DirIndex) -> Splits | None:
    folders = {split: (_folder(index, _names(split)[0]), _folder(index, _names(split)[1])) for split in ISIC_SPLITS}
    if all(data is None and gt is None for data, gt in folders.values()):
        empty = index.named(*(n for s in ISIC_SPLITS for group in _names(s) for n in group))
        if empty is not None:
            raise layout_error(NAME, TREE, f"Found {empty} but it holds no image files (looked in {index.where()}).")
        return None
    missing = [_names(split)[k][0] for split, pair in folders.items() for k in (0, 1) if pair[k] is None]
    if missing:
        raise layout_error(NAME, TREE, f"Found part of the ISIC 2017 download in {index.where()} but no folder "
                                       f"holding the images of: {', '.join(missing)}; "
                                       f"{index.nearest(*missing)}. Unpack all six zips of the 'Part 1' task "
                                       f"into the source.")
    skip = lambda name: name.lower().endswith("_superpixels.png") or not name.lower().startswith("isic_")  # noqa: E731
    return {split: pair_folder(data, gt, mask_to_stem=strip_suffix("_segmentation", optional=True), skip=skip)
            for split, (data, gt) in folders.items()}


LAYOUT = Layout(NAME, TREE, find_isic2017, decode_binary_mask)
