"""Trans10K transparent objects (Xie et al., ECCV 2020; v2: Xie et al., IJCAI 2021): <root>/{train,validation,
test} -> train / val / test, with images/ and masks/ (v1) or masks_12/ (v2).

`validation`/`test` hold `easy` and `hard` subfolders; they are merged into one split (as the official
TransLab loader does) and the subset is kept in the stem: `easy_<name>` / `hard_<name>`. The three split
folders are looked for together under one root first; failing that, each on its own anywhere in the sources
(the release as separate train / validation / test zips, passed together or as one folder of zips).

Masks: v1 masks are RGB, channel mean 0 / 85 / 255 = background / things / stuff (the official TransLab
loader's rule); samfit takes the nearest of the three (cut points 42.5 and 170) so anti-aliased edges cannot
produce other values. v2 masks are palette PNGs of 12 classes (`palette_mask_decoder`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from samfit.data.layouts.common import (DirIndex, Layout, Pair, Splits, child, has, layout_error, pair_folder,
                                        strip_suffix)
from samfit.data.layouts.masks import open_image, palette_mask_decoder

TRANS10K_SPLITS = {"train": "train", "validation": "val", "test": "test"}
TRANS10K_V1_LEVELS = (0, 85, 255)  # channel-mean value of background, things, stuff
V1_TREE = """
Trans10K/train/{images,masks}/X.jpg, X_mask.png
Trans10K/{validation,test}/{easy,hard}/{images,masks}/"""
V2_TREE = """
Trans10K_cls12/{train,validation,test}/{images,masks_12}/X.jpg, X_mask.png (palette PNG)"""


def decode_trans10k_v1_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 class indices 0/1/2 from a Trans10K-v1 RGB mask: nearest of channel means 0/85/255."""
    mean = np.asarray(open_image(path).convert("RGB"), dtype=np.float32).mean(axis=-1)
    out = np.zeros(mean.shape, np.uint8)
    out[mean >= (TRANS10K_V1_LEVELS[0] + TRANS10K_V1_LEVELS[1]) / 2] = 1
    out[mean >= (TRANS10K_V1_LEVELS[1] + TRANS10K_V1_LEVELS[2]) / 2] = 2
    return out


def trans10k_finder(dataset: str, tree: str, masks: str) -> Callable[[DirIndex], Splits | None]:
    """The finder of a Trans10K release whose mask folders are called `masks`."""

    def split_pairs(folder: Path) -> list[Pair]:
        subsets = [(s, child(folder, s)) for s in ("easy", "hard")]
        subsets = [(s, d) for s, d in subsets if d is not None and has(("images",), (masks,))(d)]
        if not subsets:
            if not has(("images",), (masks,))(folder):
                raise layout_error(dataset, tree, f"{folder} has neither images/ and {masks}/ nor easy/ and "
                                                  f"hard/ subfolders holding them.")
            subsets = [("", folder)]
        pairs = []
        for subset, d in subsets:
            pairs += pair_folder(child(d, "images"), child(d, masks), mask_to_stem=strip_suffix("_mask"),
                                 prefix=f"{subset}_" if subset else "")
        return pairs

    def is_split(d: Path) -> bool:
        return has(("images",), (masks,))(d) or any(
            child(d, s) is not None and has(("images",), (masks,))(child(d, s)) for s in ("easy", "hard"))

    def find(index: DirIndex) -> Splits | None:
        root = index.find(lambda d: all(child(d, s) is not None and is_split(child(d, s)) for s in TRANS10K_SPLITS))
        if root is not None:
            found = {official: child(root, official) for official in TRANS10K_SPLITS}
        else:  # separate archives: each split folder wherever it is
            found = {official: index.named(official, having=is_split) for official in TRANS10K_SPLITS}
            if found["train"] is None or not has(("images",), (masks,))(found["train"]):
                return None
            missing = [s for s, d in found.items() if d is None]
            if missing:
                raise layout_error(dataset, tree, f"Found {found['train']} but no {' or '.join(missing)} folder "
                                                  f"with images/ and {masks}/ (or easy/ and hard/ holding them) "
                                                  f"in {index.where()}; {index.nearest(*missing)}. Pass every "
                                                  f"part of the download (e.g. all three zips).")
        return {split: split_pairs(found[official]) for official, split in TRANS10K_SPLITS.items()}

    return find


V1_LAYOUT = Layout("trans10k-v1", V1_TREE, trans10k_finder("trans10k-v1", V1_TREE, "masks"), decode_trans10k_v1_mask)
V2_LAYOUT = Layout("trans10k-v2", V2_TREE, trans10k_finder("trans10k-v2", V2_TREE, "masks_12"),
                   palette_mask_decoder(12))
