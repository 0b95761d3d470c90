"""Camouflaged object detection in SINet-V2's split (Fan et al., TPAMI 2022): TrainValDataset (COD10K +
CAMO training images) -> train, and TestDataset/{CAMO,COD10K,CHAMELEON}, one test split each."""
from __future__ import annotations

from samfit.data.layouts.common import (DirIndex, Layout, Splits, child, find_test_sets, has, layout_error,
                                        pair_folder, sets_folder)
from samfit.data.layouts.masks import decode_binary_mask

NAME = "cod"
TREE = """
TrainValDataset/{Imgs,GT}/                          (SINet-V2: COD10K + CAMO training images)
TestDataset/{CAMO,COD10K,CHAMELEON}/{Imgs,GT}/"""
COD_TEST_SETS = {"CAMO": "camo", "COD10K": "cod10k", "CHAMELEON": "chameleon"}
COD_IMAGES, COD_MASKS = ("Imgs",), ("GT",)
CSV_TEST_NAMES = {"camo": "camo", "cod10k": "cod10k", "chameleon": "chameleon"}


def find_cod(index: DirIndex) -> Splits | None:
    train = index.named("TrainValDataset", "TrainDataset", having=has(COD_IMAGES, COD_MASKS))
    test = sets_folder(index, "TestDataset", COD_TEST_SETS, (COD_IMAGES, COD_MASKS))
    if train is None and test is None:
        return None
    if train is None or test is None:
        raise layout_error(NAME, TREE, f"Found {train or test} but no "
                                       f"{'TrainValDataset' if train is None else 'TestDataset'} folder beside it.")
    splits = {"train": pair_folder(child(train, *COD_IMAGES), child(train, *COD_MASKS))}
    splits.update(find_test_sets(NAME, TREE, test, COD_TEST_SETS, COD_IMAGES, COD_MASKS))
    return splits


LAYOUT = Layout(NAME, TREE, find_cod, decode_binary_mask, csv_test_names=CSV_TEST_NAMES)
