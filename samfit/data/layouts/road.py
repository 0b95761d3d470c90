"""Massachusetts Roads (Mnih 2013): the Kaggle copy balraj98/massachusetts-roads-dataset,
tiff/{train,val,test} with labels in tiff/{train,val,test}_labels, or Mnih's original layout
{train,valid,test}/{sat,map} -> train / val / test. Images and labels share the stem (X.tiff <-> X.tif)."""
from __future__ import annotations

from samfit.data.layouts.common import DirIndex, Layout, Splits, child, has, pair_folder
from samfit.data.layouts.masks import decode_binary_mask

NAME = "road"
TREE = """
tiff/{train,val,test}/X.tiff
tiff/{train,val,test}_labels/X.tif                  (Kaggle balraj98/massachusetts-roads-dataset)
or {train,valid,test}/{sat,map}/X.tiff, X.tif       (Mnih's original layout)"""
ROAD_PARTS = (("train",), ("train_labels",), ("val",), ("val_labels",), ("test",), ("test_labels",))
MNIH_SPLITS = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
MNIH_PARTS = (("sat",), ("map",))


def _mnih(d) -> bool:
    return all(child(d, *names) is not None and has(*MNIH_PARTS)(child(d, *names)) for names in MNIH_SPLITS.values())


def find_road(index: DirIndex) -> Splits | None:
    folder = index.named("tiff", having=has(*ROAD_PARTS)) or index.find(has(*ROAD_PARTS))
    if folder is not None:
        return {split: pair_folder(child(folder, split), child(folder, f"{split}_labels"))
                for split in ("train", "val", "test")}
    folder = index.find(_mnih)
    if folder is None:
        return None
    return {split: pair_folder(child(child(folder, *names), "sat"), child(child(folder, *names), "map"))
            for split, names in MNIH_SPLITS.items()}


LAYOUT = Layout(NAME, TREE, find_road, decode_binary_mask)
