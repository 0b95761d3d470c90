"""Polyp segmentation in PraNet's split (Fan et al., MICCAI 2020): TrainDataset (Kvasir + CVC-ClinicDB
training images) -> train, and TestDataset/{Kvasir,CVC-ClinicDB,CVC-ColonDB,ETIS-LaribPolypDB,CVC-300}, one
test split each."""
from __future__ import annotations

from samfit.data.layouts.common import DirIndex, Layout, Splits, find_train_and_test_sets, layout_error
from samfit.data.layouts.masks import decode_binary_mask

NAME = "polyp"
TREE = """
TrainDataset/{images,masks}/                        (PraNet's split: Kvasir + CVC-ClinicDB)
TestDataset/{Kvasir,CVC-ClinicDB,CVC-ColonDB,ETIS-LaribPolypDB,CVC-300}/{images,masks}/
(TestDataset/TestDataset/... is fine)"""
POLYP_TEST_SETS = {"Kvasir": "kvasir", "CVC-ClinicDB": "cvc-clinicdb", "CVC-ColonDB": "cvc-colondb",
                   "ETIS-LaribPolypDB": "etis", "CVC-300": "cvc-300"}  # folder (any case) -> split
IMAGES, MASKS = ("images", "image"), ("masks", "mask")
CSV_TEST_NAMES = {"kvasir": "kvasir", "cvc-clinicdb": "cvc-clinicdb", "clinicdb": "cvc-clinicdb",
                  "cvc-colondb": "cvc-colondb", "colondb": "cvc-colondb", "etis": "etis",
                  "etis-laribpolypdb": "etis", "cvc-300": "cvc-300"}


def find_polyp(index: DirIndex) -> Splits | None:
    splits = find_train_and_test_sets(index, NAME, TREE, ("TrainDataset",), POLYP_TEST_SETS, IMAGES, MASKS)
    if splits is None:
        from samfit.data.layouts.kvasir import find_kvasir_folder

        kvasir = find_kvasir_folder(index)
        if kvasir is not None:
            raise layout_error(NAME, TREE, f"{kvasir} is the original Kvasir-SEG download, not PraNet's split "
                                           f"(TrainDataset/ + TestDataset/ of five test sets). Prepare it as its "
                                           f"own dataset: samfit data prepare kvasir-seg --source ...")
    return splits


LAYOUT = Layout(NAME, TREE, find_polyp, decode_binary_mask, csv_test_names=CSV_TEST_NAMES)
