"""Shared search helpers of the official-layout finders: the folder index, pairing images with masks, and
the `Layout` record each dataset family fills in.

A finder looks for its dataset's folders under one or more search roots at any depth (so an archive's extra
top folder or PraNet's nested `TestDataset/TestDataset` does not matter) and pairs images with masks by the
dataset's file naming.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from samfit.data.registry import IMAGE_SUFFIXES
from samfit.errors import SamfitError

MAX_DEPTH = 10
JUNK_FILES = {"thumbs.db", "desktop.ini"}  # besides hidden files (.DS_Store, macOS ._x) and __MACOSX


@dataclass(frozen=True)
class Pair:
    """One sample: the canonical stem it is written under, and its source image and mask files."""

    stem: str
    image: Path
    mask: Path


Splits = dict[str, list[Pair]]


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

    def nearest(self, *names: str) -> str:
        """The folder whose name is closest to one of `names` (for refusals: 'nearest found: ...')."""
        import difflib

        best, score = None, 0.0
        roots = {os.path.realpath(r) for r in self.roots}
        for d in self.dirs:
            if os.path.realpath(d) in roots:
                continue
            for n in names:
                ratio = difflib.SequenceMatcher(None, d.name.lower(), n.lower()).ratio()
                if ratio > score:
                    best, score = d, ratio
        return f"the nearest folder found is {best}" if best is not None and score >= 0.5 else \
            "no folder with a similar name was found"

    def where(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def files_named(self, name: str) -> list[Path]:
        return [d / name for d in self.dirs if (d / name).is_file()]


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX" or name.lower() in JUNK_FILES


def child(folder: Path, *names: str) -> Path | None:
    """The subfolder of `folder` called one of `names` (case-insensitive), or None."""
    wanted = [n.lower() for n in names]
    try:
        found = {e.name.lower(): folder / e.name for e in os.scandir(folder) if e.is_dir()}
    except OSError:
        return None
    return next((found[n] for n in wanted if n in found), None)


def holds_images(folder: Path) -> bool:
    """The folder holds image files directly (not only a subfolder of the same name, as in mirrors that
    nest `X/X/`)."""
    try:
        return any(e.is_file() and not _ignored(e.name) and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
                   for e in os.scandir(folder))
    except OSError:
        return False


def has(*groups: tuple[str, ...]) -> Callable[[Path], bool]:
    """Predicate: the folder has a subfolder from each group of alternative names."""
    return lambda d: all(child(d, *group) is not None for group in groups)


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


def strip_suffix(suffix: str, optional: bool = False) -> Callable[[str], str | None]:
    """Mask-stem rule `<stem><suffix>` -> `<stem>`, the suffix in any letter case (None for names without
    it, or the name itself when `optional`)."""
    return lambda s: s[: -len(suffix)] if s.lower().endswith(suffix.lower()) else (s if optional else None)


def sets_folder(index: DirIndex, name: str, sets: dict[str, str], groups) -> Path | None:
    """The shallowest folder called `name` holding at least one of the test `sets`, each with `groups`."""
    return index.named(name, having=lambda d: any(child(d, s) is not None and has(*groups)(child(d, s))
                                                  for s in sets))


def find_test_sets(dataset: str, tree: str, folder: Path, sets: dict[str, str], images, masks, **kw) -> Splits:
    """One split per test set folder of `folder` (`sets`: official folder -> split). A download may lack some
    test sets (the run scores those present and names the others); a set folder that is there but lacks its
    images or masks folder is an error."""
    splits, broken = {}, []
    for official, split in sets.items():
        set_dir = child(folder, official)
        if set_dir is None:
            continue  # not in this download
        if not has(images, masks)(set_dir):
            broken.append(set_dir)
            continue
        splits[split] = pair_folder(child(set_dir, *images), child(set_dir, *masks), **kw)
    if broken:
        found = sorted(e.name for e in os.scandir(broken[0]) if not _ignored(e.name))
        raise layout_error(dataset, tree, f"The test set folder {broken[0]} lacks its {images[0]}/ or "
                                          f"{masks[0]}/ folder (it holds {', '.join(found[:6]) or 'nothing'}). "
                                          f"Unpack that test set again, or remove its folder to prepare without it.")
    return splits


# --- the record of one dataset's layouts -----------------------------------------------------------------

def find_train_and_test_sets(index: DirIndex, dataset: str, tree: str, train_names: tuple[str, ...],
                             sets: dict[str, str], images, masks) -> Splits | None:
    """A training folder (called one of `train_names`) beside a TestDataset folder of test sets (PraNet's and
    SINet-V2's layouts): a `train` split plus one split per test set; None when neither folder is there."""
    train = index.named(*train_names, having=has(images, masks))
    test = sets_folder(index, "TestDataset", sets, (images, masks))
    if train is None and test is None:
        return None
    if train is None or test is None:
        missing = train_names[0] if train is None else "TestDataset"
        raise layout_error(dataset, tree, f"Found {train or test} but no {missing} folder (with its "
                                          f"{'test set folders' if train else f'{images[0]}/ and {masks[0]}/'}) "
                                          f"in {index.where()}; {index.nearest(missing)}.")
    splits = {"train": pair_folder(child(train, *images), child(train, *masks))}
    splits.update(find_test_sets(dataset, tree, test, sets, images, masks))
    return splits


@dataclass(frozen=True)
class Layout:
    """How one dataset's official download looks, and how its masks are decoded."""

    name: str
    tree: str  # the expected layout, shown in errors
    find: Callable[[DirIndex], Splits | None]  # None when the layout's top folders are not there
    decode_mask: Callable[[Path], np.ndarray]
    csv_test_names: dict[str, str] = field(default_factory=dict)  # test_<X>.csv -> split name, X lower-cased
    split_record: Callable[[Splits], dict] | None = None  # a split samfit draws: what prepare writes to split.json

    def describe(self) -> str:
        return describe(self.tree)


def describe(tree: str) -> str:
    """The layouts a source may be in: the official `tree`, or the Conv-LoRA code's CSV pair lists."""
    return (f"  official download:\n{_indent(tree)}\n"
            f"  or the Conv-LoRA code's prepared zip: a folder with train.csv, val.csv and test.csv or "
            f"test_<SET>.csv,\n    columns image,label, paths relative to that folder")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.strip("\n").splitlines())


def layout_error(name: str, tree: str, problem: str) -> SamfitError:
    """A SamfitError stating `problem` and showing the layouts dataset `name`'s source must be in."""
    return SamfitError(f"{problem}\nThe source for '{name}' must be one of these layouts:\n{describe(tree)}")
