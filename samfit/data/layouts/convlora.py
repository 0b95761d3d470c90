"""The Conv-LoRA code's prepared zips (Zhong et al., ICLR 2024, arXiv:2401.17868): a folder with train.csv,
val.csv and test.csv or test_<SET>.csv pair lists (columns image,label; read by `read_pairs_csv`)."""
from __future__ import annotations

import re

from samfit.data.layouts.common import DirIndex, Layout, Pair, Splits
from samfit.errors import SamfitError


def csv_split_name(csv_stem: str, layout: Layout) -> str | None:
    """Split folder for a pair list: train.csv -> train, val.csv -> val, test.csv -> test,
    test_<SET>.csv -> the dataset's name for SET (test_Kvasir -> kvasir, test_CVC-ClinicDB -> cvc-clinicdb,
    test_CAMO -> camo) or SET lower-cased; None for any other CSV (ignored)."""
    stem = csv_stem.strip().lower()
    if stem in ("train", "test"):
        return stem
    if stem in ("val", "valid", "validation"):
        return "val"
    match = re.fullmatch(r"test[_-](.+)", stem)
    if match:
        key = re.sub(r"[\s_]+", "-", match.group(1))
        return layout.csv_test_names.get(key, key)
    return None


def find_csv_splits(index: DirIndex, layout: Layout) -> Splits | None:
    """The pair lists of the shallowest folder holding a train.csv, read by `read_pairs_csv`."""
    from samfit.data.csvpairs import read_pairs_csv

    lists = index.files_named("train.csv")
    if not lists:
        return None
    folder = lists[0].parent
    splits: Splits = {}
    for csv_path in sorted(folder.glob("*.csv")):
        split = csv_split_name(csv_path.stem, layout)
        if split is None:
            continue
        if split in splits:
            raise SamfitError(f"Two pair lists in {folder} map to the split '{split}' (one is {csv_path}). "
                              f"Remove one.")
        splits[split] = [Pair(image.stem, image, mask) for image, mask in read_pairs_csv(csv_path)]
    return splits
