"""Kvasir-SEG (Jha et al., MMM 2020), the original zip from Simula: Kvasir-SEG/{images,masks}/X.jpg (masks are
JPEGs too, thresholded at > 127), plus kavsir_bboxes.json (ignored). The download has no split: samfit's own,
fixed one is a permutation of the sorted stems by numpy's default_rng(SPLIT_SEED), the first 80% train, the
next 10% val, the last 10% test (800 / 100 / 100 of the 1000 images), the same on every machine; `prepare`
records it in split.json beside the split folders."""
from __future__ import annotations

import numpy as np

from samfit.data.layouts.common import DirIndex, Layout, Splits, child, has, pair_folder
from samfit.data.layouts.masks import decode_binary_mask

NAME = "kvasir-seg"
TREE = """
Kvasir-SEG/{images,masks}/X.jpg                    (the original zip; kavsir_bboxes.json is ignored)"""
PARTS = (("images",), ("masks",))
SPLIT_SEED = 0
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def find_kvasir_folder(index: DirIndex):
    """The Kvasir-SEG folder: called Kvasir-SEG with images/ and masks/, or holding kavsir_bboxes.json beside them."""
    return index.named("Kvasir-SEG", "kvasir-seg", having=has(*PARTS)) or index.find(
        lambda d: has(*PARTS)(d) and any(p.name.lower() == "kavsir_bboxes.json" for p in d.iterdir()))


def split_stems(stems: list[str]) -> dict[str, list[str]]:
    """samfit's fixed Kvasir-SEG split of `stems` (see the module docstring)."""
    ordered = sorted(stems)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(ordered))
    n_train = round(SPLIT_FRACTIONS["train"] * len(ordered))
    n_val = round(SPLIT_FRACTIONS["val"] * len(ordered))
    cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {split: sorted(ordered[i] for i in picked) for split, picked in cuts.items()}


def find_kvasir_seg(index: DirIndex) -> Splits | None:
    folder = find_kvasir_folder(index)
    if folder is None:
        return None
    pairs = {p.stem: p for p in pair_folder(child(folder, "images"), child(folder, "masks"))}
    return {split: [pairs[s] for s in stems] for split, stems in split_stems(list(pairs)).items()}


def split_record(splits: Splits) -> dict:
    return {"dataset": NAME, "seed": SPLIT_SEED, "fractions": SPLIT_FRACTIONS,
            "rule": "numpy default_rng(seed).permutation over the sorted stems; train, val, test in that order",
            "splits": {split: [p.stem for p in pairs] for split, pairs in splits.items()}}


LAYOUT = Layout(NAME, TREE, find_kvasir_seg, decode_binary_mask, split_record=split_record)
