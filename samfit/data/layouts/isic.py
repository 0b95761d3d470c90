"""ISIC 2017 (Codella et al. 2018), Part 1 "Lesion Segmentation": the six official zips
ISIC-2017_{Training,Validation,Test_v2}_{Data,Part1_GroundTruth} -> train / val / test."""
from __future__ import annotations

from samfit.data.layouts.common import DirIndex, Layout, Splits, layout_error, pair_folder, strip_suffix
from samfit.data.layouts.masks import decode_binary_mask

NAME = "isic2017"
TREE = """
ISIC-2017_Training_Data/ISIC_0000000.jpg            (*_superpixels.png and *_metadata.csv are skipped)
ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png
ISIC-2017_Validation_Data/  ISIC-2017_Validation_Part1_GroundTruth/
ISIC-2017_Test_v2_Data/     ISIC-2017_Test_v2_Part1_GroundTruth/
(the six zips themselves, or the folders they unpack to)"""
ISIC_SPLITS = {"Training": "train", "Validation": "val", "Test_v2": "test"}


def find_isic2017(index: DirIndex) -> Splits | None:
    folders = {}
    for official, split in ISIC_SPLITS.items():
        folders[split] = (index.named(f"ISIC-2017_{official}_Data"),
                          index.named(f"ISIC-2017_{official}_Part1_GroundTruth"), official)
    if all(data is None and gt is None for data, gt, _ in folders.values()):
        return None
    missing = [name for data, gt, official in folders.values()
               for name, found in ((f"ISIC-2017_{official}_Data", data),
                                   (f"ISIC-2017_{official}_Part1_GroundTruth", gt)) if found is None]
    if missing:
        raise layout_error(NAME, TREE, f"Found part of the ISIC 2017 download but not: {', '.join(missing)} "
                                       f"(unpack all six zips of the 'Part 1' task into the source).")
    skip = lambda name: name.endswith("_superpixels.png") or not name.lower().startswith("isic_")  # noqa: E731
    return {split: pair_folder(data, gt, mask_to_stem=strip_suffix("_segmentation"), skip=skip)
            for split, (data, gt, _) in folders.items()}


LAYOUT = Layout(NAME, TREE, find_isic2017, decode_binary_mask)
