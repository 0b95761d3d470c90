"""Official on-disk layouts of the datasets, and how their masks are decoded (docs/reference.md, Datasets).

Each dataset's `Layout` (one module per dataset family: `isic`, `polyp`, `kvasir`, `cod`, `sbu`, `leaf`, `road`,
`trans10k`) knows how to find its folders under one or more search roots at any depth (helpers in `common`),
pair images with masks by the dataset's file naming, and decode a mask into samfit's canonical values
(binary 0/255, or class indices with 255 = ignore; decoders in `masks` and `trans10k`). Every dataset may
also come as the Conv-LoRA code's CSV pair lists (`convlora`).

Canonical split folder names (what `datasets.yaml` lists under `splits:`):
isic2017 train/val/test; polyp train + kvasir, cvc-clinicdb, cvc-colondb, etis, cvc-300; kvasir-seg
train/val/test (samfit's seeded split); cod train + camo, cod10k, chameleon; sbu train/test; leaf train/test
(the Kaggle set's `valid_*` is the paper's test set); road train/val/test; trans10k-v1 and -v2 train/val/test (Trans10K's `easy`/`hard` subsets merged, the
subset kept in the stem: `easy_<name>` / `hard_<name>`).
"""
from __future__ import annotations

from samfit.data.layouts import cod, isic, kvasir, leaf, polyp, road, sbu, trans10k
from samfit.data.layouts.common import DirIndex, Layout, Pair, Splits, image_files, pair_folder
from samfit.data.layouts.convlora import csv_split_name, find_csv_splits
from samfit.data.layouts.masks import decode_binary_mask, open_image, palette_mask_decoder
from samfit.data.layouts.trans10k import decode_trans10k_v1_mask

LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (isic.LAYOUT, polyp.LAYOUT, kvasir.LAYOUT, cod.LAYOUT, sbu.LAYOUT,
                                       leaf.LAYOUT, road.LAYOUT, trans10k.V1_LAYOUT, trans10k.V2_LAYOUT)
}

__all__ = ["LAYOUTS", "DirIndex", "Layout", "Pair", "Splits", "csv_split_name", "decode_binary_mask",
           "decode_trans10k_v1_mask", "find_csv_splits", "image_files", "open_image", "pair_folder",
           "palette_mask_decoder"]
