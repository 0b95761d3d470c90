"""Official on-disk layouts of the benchmark's datasets, and how their masks are decoded (REFERENCE §3).

Each `Layout` knows how to find its dataset's folders under one or more search roots (at any depth, so an
archive's extra top folder or PraNet's nested `TestDataset/TestDataset` does not matter), pair images with
masks by the dataset's file naming, and decode a mask into samfit's canonical values:

- binary: 0 background / 255 foreground. Single-channel masks are thresholded at > 127 (0/255 PNGs stay
  as they are, Kvasir-SEG's JPEG masks lose their compression noise); colour masks use the brightest channel
  (> 127 in any channel is foreground); lossless masks holding only 0 and 1 are read as 0/1; a lossless mask
  whose values stop between 2 and 127 is refused (it would decode as empty).
- trans10k-v1: RGB masks, channel mean 0 / 85 / 255 = background / things / stuff (the official TransLab
  loader's rule); samfit takes the nearest of the three (cut points 42.5 and 170) so anti-aliased edges
  cannot produce other values.
- trans10k-v2: palette PNGs whose indices are the classes, read WITHOUT converting to RGB; 255 stays
  "ignore"; any other index >= 12 is an error.

Canonical split folder names (what `datasets.yaml` lists under `splits:`):
isic2017 train/val/test; polyp train + kvasir, cvc-clinicdb, cvc-colondb, etis, cvc-300; cod train + camo,
cod10k, chameleon; sbu train/test; leaf train/test (the Kaggle set's `valid_*` is the paper's test set);
road train/val/test; trans10k-v1 and -v2 train/val/test. Trans10K's `validation`/`test` `easy` and `hard`
subfolders are merged into one split (as the official loader does) and the subset is kept in the stem:
`easy_<name>` / `hard_<name>`.
"""
from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from samfit.errors import SamfitError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
MAX_DEPTH = 6
LOSSLESS_FORMATS = {"PNG", "TIFF", "BMP", "GIF"}


@dataclass(frozen=True)
class Pair:
    """One sample: the canonical stem it is written under, and its source image and mask files."""

    stem: str
    image: Path
    mask: Path


Splits = dict[str, list[Pair]]


# --- reading files ---------------------------------------------------------------------------------------

def open_image(path: Path) -> Image.Image:
    """A fully loaded PIL image; TIFFs PIL cannot decode go through tifffile. SamfitError if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except Exception as pil_error:  # PIL raises many types for corrupt data
        if path.suffix.lower() in {".tif", ".tiff"}:
            try:
                import tifffile

                return Image.fromarray(tifffile.imread(path))
            except Exception:
                pass
        raise SamfitError(f"Cannot read image file {path}: {pil_error}. The file is damaged or not an image; "
                          f"download or unpack it again.") from None


def decode_binary_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 mask, 0 background / 255 foreground (rules in the module docstring)."""
    im = open_image(path)
    if im.mode == "1":
        return np.where(np.asarray(im), 255, 0).astype(np.uint8)
    if im.mode == "L":
        values = np.asarray(im)
    elif im.mode.startswith("I") or im.mode == "F":
        values = np.asarray(im).astype(np.float64)
        if values.max(initial=0) > 255:
            values = values * (255.0 / 65535.0)
    else:
        values = np.asarray(im.convert("RGB")).max(axis=-1)
    top = values.max(initial=0)
    if im.format in LOSSLESS_FORMATS and top == 1 and np.isin(values, (0, 1)).all():
        foreground = values == 1
    elif im.format in LOSSLESS_FORMATS and 1 < top <= 127:
        raise SamfitError(f"Mask {path} has values up to {top:g}, none above 127: thresholding at >127 would make "
                          f"it empty. Is it a class-index or colour-coded mask? Convert it to 0/255 first.")
    else:
        foreground = values > 127
    return np.where(foreground, 255, 0).astype(np.uint8)


TRANS10K_V1_LEVELS = (0, 85, 255)  # channel-mean value of background, things, stuff


def decode_trans10k_v1_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 class indices 0/1/2 from a Trans10K-v1 RGB mask: nearest of channel means 0/85/255."""
    mean = np.asarray(open_image(path).convert("RGB"), dtype=np.float32).mean(axis=-1)
    out = np.zeros(mean.shape, np.uint8)
    out[mean >= (TRANS10K_V1_LEVELS[0] + TRANS10K_V1_LEVELS[1]) / 2] = 1
    out[mean >= (TRANS10K_V1_LEVELS[1] + TRANS10K_V1_LEVELS[2]) / 2] = 2
    return out


def palette_mask_decoder(num_classes: int) -> Callable[[Path], np.ndarray]:
    """Decoder for palette ('P') or greyscale PNGs whose pixel values are class indices (255 = ignore)."""

    def decode(path: Path) -> np.ndarray:
        im = open_image(path)
        if im.mode not in ("P", "L"):
            raise SamfitError(
                f"Mask {path} has mode {im.mode}: expected a palette PNG (mode P) whose indices are the class "
                f"numbers, as in the official download. Do not convert the masks to RGB; unpack the original."
            )
        values = np.asarray(im).astype(np.uint8)
        seen = np.unique(values)
        bad = [int(v) for v in seen if v >= num_classes and v != 255]
        if bad:
            raise SamfitError(f"Mask {path} holds class indices {bad}, but the dataset has {num_classes} classes "
                              f"(0..{num_classes - 1}, 255 = ignore). Is it the right dataset's mask?")
        return values

    return decode


# --- finding folders -------------------------------------------------------------------------------------

class DirIndex:
    """Every folder under the search roots (breadth first, shallowest first, at most MAX_DEPTH deep),
    skipping hidden folders, `__MACOSX` and the folders in `exclude`."""

    def __init__(self, roots: list[Path], exclude: tuple[Path, ...] = ()):
        self.roots = roots
        self.dirs: list[Path] = []
        excluded = {os.path.realpath(p) for p in exclude}
        queue = deque((root, 0) for root in roots)
        while queue:
            folder, depth = queue.popleft()
            if os.path.realpath(folder) in excluded:
                continue
            self.dirs.append(folder)
            if depth >= MAX_DEPTH:
                continue
            try:
                children = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _ignored(e.name))
            except OSError:
                continue
            queue.extend((folder / child, depth + 1) for child in children)

    def find(self, predicate: Callable[[Path], bool]) -> Path | None:
        return next((d for d in self.dirs if predicate(d)), None)

    def named(self, *names: str, having: Callable[[Path], bool] = lambda d: True) -> Path | None:
        """The shallowest folder called one of `names` (case-insensitive) for which `having` holds."""
        wanted = {n.lower() for n in names}
        return self.find(lambda d: d.name.lower() in wanted and having(d))

    def files_named(self, name: str) -> list[Path]:
        return [d / name for d in self.dirs if (d / name).is_file()]


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def child(folder: Path, *names: str) -> Path | None:
    """The subfolder of `folder` called one of `names` (case-insensitive), or None."""
    wanted = [n.lower() for n in names]
    try:
        found = {e.name.lower(): folder / e.name for e in os.scandir(folder) if e.is_dir()}
    except OSError:
        return None
    return next((found[n] for n in wanted if n in found), None)


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder` (by extension), sorted, hidden files (e.g. macOS `._x.jpg`) skipped."""
    return sorted(folder / e.name for e in os.scandir(folder)
                  if e.is_file() and not _ignored(e.name) and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


def pair_folder(
    images: Path,
    masks: Path,
    *,
    mask_to_stem: Callable[[str], str | None] = lambda s: s,
    skip: Callable[[str], bool] = lambda name: False,
    prefix: str = "",
) -> list[Pair]:
    """Pairs of `images` and `masks` matched by stem (`mask_to_stem` maps a mask's stem to its image's stem,
    None when the name does not follow the dataset's rule). Unmatched files raise SamfitError naming them."""
    by_stem: dict[str, Path] = {}
    for path in image_files(images):
        if skip(path.name):
            continue
        if path.stem in by_stem:
            raise SamfitError(f"Two images with the same name stem: {by_stem[path.stem]} and {path}. "
                              f"Remove the duplicate.")
        by_stem[path.stem] = path
    mask_by_stem: dict[str, Path] = {}
    for path in image_files(masks):
        if skip(path.name):
            continue
        stem = mask_to_stem(path.stem)
        if stem is None or stem not in by_stem:
            raise SamfitError(f"Mask without image: {path} has no matching image in {images}. Add the image or "
                              f"remove the mask.")
        if stem in mask_by_stem:
            raise SamfitError(f"Two masks for image {by_stem[stem]}: {mask_by_stem[stem]} and {path}. "
                              f"Remove one.")
        mask_by_stem[stem] = path
    for stem, path in by_stem.items():
        if stem not in mask_by_stem:
            raise SamfitError(f"Image without mask: {path} has no matching mask in {masks}. Add the mask or "
                              f"remove the image.")
    return [Pair(prefix + stem, path, mask_by_stem[stem]) for stem, path in by_stem.items()]


def strip_suffix(suffix: str) -> Callable[[str], str | None]:
    """Mask-stem rule `<stem><suffix>` -> `<stem>` (None for names without the suffix)."""
    return lambda s: s[: -len(suffix)] if s.endswith(suffix) else None


def _has(*groups: tuple[str, ...]) -> Callable[[Path], bool]:
    """Predicate: the folder has a subfolder from each group of alternative names."""
    return lambda d: all(child(d, *group) is not None for group in groups)


def _layout_error(name: str, problem: str) -> SamfitError:
    return SamfitError(f"{problem}\nThe source for '{name}' must be one of these layouts:\n"
                       f"{LAYOUTS[name].describe()}")


# --- the layouts -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """How one dataset's official download looks, and how its masks are decoded."""

    name: str
    tree: str  # the expected layout, shown in errors
    find: Callable[[DirIndex], Splits | None]  # None when the layout's top folders are not there
    decode_mask: Callable[[Path], np.ndarray]
    csv_test_names: dict[str, str] = field(default_factory=dict)  # test_<X>.csv -> split name, X lower-cased

    def describe(self) -> str:
        return (f"  official download:\n{_indent(self.tree)}\n"
                f"  or the Conv-LoRA code's prepared zip: a folder with train.csv, val.csv and test.csv or "
                f"test_<SET>.csv,\n    columns image,label, paths relative to that folder")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.strip("\n").splitlines())


ISIC_SPLITS = {"Training": "train", "Validation": "val", "Test_v2": "test"}


def _find_isic2017(index: DirIndex) -> Splits | None:
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
        raise _layout_error("isic2017", f"Found part of the ISIC 2017 download but not: {', '.join(missing)} "
                                        f"(unpack all six zips of the 'Part 1' task into the source).")
    skip = lambda name: name.endswith("_superpixels.png") or not name.lower().startswith("isic_")  # noqa: E731
    return {split: pair_folder(data, gt, mask_to_stem=strip_suffix("_segmentation"), skip=skip)
            for split, (data, gt, _) in folders.items()}


POLYP_TEST_SETS = {"Kvasir": "kvasir", "CVC-ClinicDB": "cvc-clinicdb", "CVC-ColonDB": "cvc-colondb",
                   "ETIS-LaribPolypDB": "etis", "CVC-300": "cvc-300"}  # folder (any case) -> split
IMAGES, MASKS = ("images", "image"), ("masks", "mask")


def _sets_folder(index: DirIndex, name: str, sets: dict[str, str], groups) -> Path | None:
    return index.named(name, having=lambda d: any(child(d, s) is not None and _has(*groups)(child(d, s))
                                                  for s in sets))


def _find_test_sets(dataset: str, folder: Path, sets: dict[str, str], images, masks, **kw) -> Splits:
    splits, missing = {}, []
    for official, split in sets.items():
        set_dir = child(folder, official)
        if set_dir is None or not _has(images, masks)(set_dir):
            missing.append(official)
            continue
        splits[split] = pair_folder(child(set_dir, *images), child(set_dir, *masks), **kw)
    if missing:
        raise _layout_error(dataset, f"{folder} lacks the test set folder(s) {', '.join(missing)} (each with "
                                     f"{images[0]}/ and {masks[0]}/ inside).")
    return splits


def _find_polyp(index: DirIndex) -> Splits | None:
    train = index.named("TrainDataset", having=_has(IMAGES, MASKS))
    test = _sets_folder(index, "TestDataset", POLYP_TEST_SETS, (IMAGES, MASKS))
    if train is None and test is None:
        return None
    if train is None or test is None:
        raise _layout_error("polyp", f"Found {train or test} but no "
                                     f"{'TrainDataset' if train is None else 'TestDataset'} folder beside it.")
    splits = {"train": pair_folder(child(train, *IMAGES), child(train, *MASKS))}
    splits.update(_find_test_sets("polyp", test, POLYP_TEST_SETS, IMAGES, MASKS))
    return splits


COD_TEST_SETS = {"CAMO": "camo", "COD10K": "cod10k", "CHAMELEON": "chameleon"}
COD_IMAGES, COD_MASKS = ("Imgs",), ("GT",)


def _find_cod(index: DirIndex) -> Splits | None:
    train = index.named("TrainValDataset", "TrainDataset", having=_has(COD_IMAGES, COD_MASKS))
    test = _sets_folder(index, "TestDataset", COD_TEST_SETS, (COD_IMAGES, COD_MASKS))
    if train is None and test is None:
        return None
    if train is None or test is None:
        raise _layout_error("cod", f"Found {train or test} but no "
                                   f"{'TrainValDataset' if train is None else 'TestDataset'} folder beside it.")
    splits = {"train": pair_folder(child(train, *COD_IMAGES), child(train, *COD_MASKS))}
    splits.update(_find_test_sets("cod", test, COD_TEST_SETS, COD_IMAGES, COD_MASKS))
    return splits


SBU_PARTS = (("ShadowImages",), ("ShadowMasks",))


def _find_sbu(index: DirIndex) -> Splits | None:
    train = index.named("SBUTrain4KRecoveredSmall", having=_has(*SBU_PARTS))
    test = index.named("SBU-Test", having=_has(*SBU_PARTS))
    if train is None and test is None:
        return None
    if train is None or test is None:
        raise _layout_error("sbu", f"Found {train or test} but not "
                                   f"{'SBUTrain4KRecoveredSmall' if train is None else 'SBU-Test'}.")
    return {split: pair_folder(child(d, "ShadowImages"), child(d, "ShadowMasks"))
            for split, d in (("train", train), ("test", test))}


LEAF_PARTS = (("train_images",), ("train_masks",), ("valid_images",), ("valid_masks",))


def _find_leaf(index: DirIndex) -> Splits | None:
    folder = index.named("orig_data", having=_has(*LEAF_PARTS)) or index.find(_has(*LEAF_PARTS))
    if folder is None:
        return None
    return {split: pair_folder(child(folder, f"{official}_images"), child(folder, f"{official}_masks"))
            for split, official in (("train", "train"), ("test", "valid"))}


ROAD_PARTS = (("train",), ("train_labels",), ("val",), ("val_labels",), ("test",), ("test_labels",))


def _find_road(index: DirIndex) -> Splits | None:
    folder = index.named("tiff", having=_has(*ROAD_PARTS)) or index.find(_has(*ROAD_PARTS))
    if folder is None:
        return None
    return {split: pair_folder(child(folder, split), child(folder, f"{split}_labels"))
            for split in ("train", "val", "test")}


TRANS10K_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _trans10k_finder(dataset: str, masks: str) -> Callable[[DirIndex], Splits | None]:
    def split_pairs(folder: Path) -> list[Pair]:
        subsets = [(s, child(folder, s)) for s in ("easy", "hard")]
        subsets = [(s, d) for s, d in subsets if d is not None and _has(("images",), (masks,))(d)]
        if not subsets:
            if not _has(("images",), (masks,))(folder):
                raise _layout_error(dataset, f"{folder} has neither images/ and {masks}/ nor easy/ and hard/ "
                                             f"subfolders holding them.")
            subsets = [("", folder)]
        pairs = []
        for subset, d in subsets:
            pairs += pair_folder(child(d, "images"), child(d, masks), mask_to_stem=strip_suffix("_mask"),
                                 prefix=f"{subset}_" if subset else "")
        return pairs

    def find(index: DirIndex) -> Splits | None:
        is_train = lambda d: _has(("images",), (masks,))(d)  # noqa: E731
        root = index.find(lambda d: child(d, "train") is not None and is_train(child(d, "train")))
        if root is None:
            return None
        missing = [s for s in TRANS10K_SPLITS if child(root, s) is None]
        if missing:
            raise _layout_error(dataset, f"{root} lacks the folder(s) {', '.join(missing)}.")
        return {split: split_pairs(child(root, official)) for official, split in TRANS10K_SPLITS.items()}

    return find


LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (
        Layout("isic2017", """
ISIC-2017_Training_Data/ISIC_0000000.jpg            (*_superpixels.png and *_metadata.csv are skipped)
ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png
ISIC-2017_Validation_Data/  ISIC-2017_Validation_Part1_GroundTruth/
ISIC-2017_Test_v2_Data/     ISIC-2017_Test_v2_Part1_GroundTruth/
(the six zips themselves, or the folders they unpack to)""", _find_isic2017, decode_binary_mask),
        Layout("polyp", """
TrainDataset/{images,masks}/                        (PraNet's split: Kvasir + CVC-ClinicDB)
TestDataset/{Kvasir,CVC-ClinicDB,CVC-ColonDB,ETIS-LaribPolypDB,CVC-300}/{images,masks}/
(TestDataset/TestDataset/... is fine)""", _find_polyp, decode_binary_mask,
               csv_test_names={"kvasir": "kvasir", "cvc-clinicdb": "cvc-clinicdb", "clinicdb": "cvc-clinicdb",
                               "cvc-colondb": "cvc-colondb", "colondb": "cvc-colondb", "etis": "etis",
                               "etis-laribpolypdb": "etis", "cvc-300": "cvc-300"}),
        Layout("cod", """
TrainValDataset/{Imgs,GT}/                          (SINet-V2: COD10K + CAMO training images)
TestDataset/{CAMO,COD10K,CHAMELEON}/{Imgs,GT}/""", _find_cod, decode_binary_mask,
               csv_test_names={"camo": "camo", "cod10k": "cod10k", "chameleon": "chameleon"}),
        Layout("sbu", """
SBUTrain4KRecoveredSmall/{ShadowImages,ShadowMasks}/
SBU-Test/{ShadowImages,ShadowMasks}/""", _find_sbu, decode_binary_mask),
        Layout("leaf", """
orig_data/{train_images,train_masks,valid_images,valid_masks}/   X.jpg <-> X.png
(Kaggle sovitrath/leaf-disease-segmentation-with-trainvalid-split; valid -> test)""", _find_leaf,
               decode_binary_mask),
        Layout("road", """
tiff/{train,val,test}/X.tiff
tiff/{train,val,test}_labels/X.tif                  (Kaggle balraj98/massachusetts-roads-dataset)""",
               _find_road, decode_binary_mask),
        Layout("trans10k-v1", """
Trans10K/train/{images,masks}/X.jpg, X_mask.png
Trans10K/{validation,test}/{easy,hard}/{images,masks}/""", _trans10k_finder("trans10k-v1", "masks"),
               decode_trans10k_v1_mask),
        Layout("trans10k-v2", """
Trans10K_cls12/{train,validation,test}/{images,masks_12}/X.jpg, X_mask.png (palette PNG)""",
               _trans10k_finder("trans10k-v2", "masks_12"), palette_mask_decoder(12)),
    )
}


# --- the Conv-LoRA code's prepared zips (train.csv, val.csv, test*.csv) ---------------------------------

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
