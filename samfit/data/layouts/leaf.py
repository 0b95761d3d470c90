"""Leaf disease segmentation, the Kaggle set sovitrath/leaf-disease-segmentation-with-trainvalid-split:
orig_data/{train,valid}_{images,masks} -> train / test (its `valid` part is the paper's test set)."""
from __future__ import annotations

from samfit.data.layouts.common import DirIndex, Layout, Splits, child, has, pair_folder
from samfit.data.layouts.masks import decode_binary_mask

NAME = "leaf"
TREE = """
orig_data/{train_images,train_masks,valid_images,valid_masks}/   X.jpg <-> X.png
(Kaggle sovitrath/leaf-disease-segmentation-with-trainvalid-split; valid -> test)"""
LEAF_PARTS = (("train_images",), ("train_masks",), ("valid_images",), ("valid_masks",))


def find_leaf(index: DirIndex) -> Splits | None:
    folder = index.named("orig_data", having=has(*LEAF_PARTS)) or index.find(has(*LEAF_PARTS))
    if folder is None:
        return None
    return {split: pair_folder(child(folder, f"{official}_images"), child(folder, f"{official}_masks"))
            for split, official in (("train", "train"), ("test", "valid"))}


LAYOUT = Layout(NAME, TREE, find_leaf, decode_binary_mask)
