"""Massachusetts Roads (Mnih 2013), the Kaggle copy balraj98/massachusetts-roads-dataset:
tiff/{train,val,test} with labels in tiff/{train,val,test}_labels -> train / val / test."""
from __future__ import annotations

from samfit.data.layouts.common import DirIndex, Layout, Splits, child, has, pair_folder
from samfit.data.layouts.masks import decode_binary_mask

NAME = "road"
TREE = """
tiff/{train,val,test}/X.tiff
tiff/{train,val,test}_labels/X.tif                  (Kaggle balraj98/massachusetts-roads-dataset)"""
ROAD_PARTS = (("train",), ("train_labels",), ("val",), ("val_labels",), ("test",), ("test_labels",))


def find_road(index: DirIndex) -> Splits | None:
    folder = index.named("tiff", having=has(*ROAD_PARTS)) or index.find(has(*ROAD_PARTS))
    if folder is None:
        return None
    return {split: pair_folder(child(folder, split), child(folder, f"{split}_labels"))
            for split in ("train", "val", "test")}


LAYOUT = Layout(NAME, TREE, find_road, decode_binary_mask)
