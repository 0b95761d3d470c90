"""Camouflaged object detection in SINet-V2's split (Fan et al., TPAMI 2022): TrainValDataset (COD10K +
CAMO training images) -> train, and TestDataset/{CAMO,COD10K,CHAMELEON}, one test split each."""
from __future__ import annotations

from samfit.data.layouts.common import DirIndex, Layout, Splits, find_train_and_test_sets
from samfit.data.layouts.masks import decode_binary_mask

NAME = "cod"
TREE = """
TrainValDataset/{Imgs,GT}/                          (SINet-V2: COD10K + CAMO training images)
TestDataset/{CAMO,COD10K,CHAMELEON}/{Imgs,GT}/"""
COD_TEST_SETS = {"CAMO": "camo", "COD10K": "cod10k", "CHAMELEON": "chameleon"}
COD_IMAGES, COD_MASKS = ("Imgs",), ("GT",)
CSV_TEST_NAMES = {"camo": "camo", "cod10k": "cod10k", "chameleon": "chameleon"}


def find_cod(index: DirIndex) -> Splits | None:
    return find_train_and_test_sets(index, NAME, TREE, ("TrainValDataset", "TrainDataset"), COD_TEST_SETS, COD_IMAGES, COD_MASKS)


LAYOUT = Layout(NAME, TREE, find_cod, decode_binary_mask, csv_test_names=CSV_TEST_NAMES)
