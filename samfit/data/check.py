"""`check_dataset`: validate a canonical dataset folder and summarise each split.

Reads `<root>/<split>/{images,masks}` as written by `prepare_dataset` (or by hand): every image has a
mask of the same stem and the same size, every file decodes, masks are single-channel 8-bit with legal
values (binary: 0 and 255; multi-class: class indices below the number of classes, or 255 = ignore).
The first offending file stops the check with a SamfitError naming it.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from samfit.data.layouts import image_files
from samfit.errors import SamfitError

IGNORE = 255
TASKS = ("binary", "multiclass")


@dataclass
class SplitReport:
    """What one split holds. Sizes are (width, height); `class_images` counts the masks each class is in."""

    split: str
    images: int
    masks: int
    min_size: tuple[int, int] | None
    max_size: tuple[int, int] | None
    mask_values: list[int]
    class_images: dict[str, int] = field(default_factory=dict)

    @property
    def classes_present(self) -> list[str]:
        return [name for name, count in self.class_images.items() if count]


def check_dataset(
    root: Path,
    classes: list[str],
    task: str,
    splits: list[str] | None = None,
    progress: bool = False,
) -> list[SplitReport]:
    """Check every split folder of the canonical dataset at `root`; one report per split.

    `splits`: the split folders that must exist (e.g. train, val and the test sets from datasets.yaml), in
    report order; None checks whatever split folders are there (train, val first).
    """
    root = Path(root)
    if task not in TASKS:
        raise SamfitError(f"Unknown task '{task}' for {root}: expected one of {', '.join(TASKS)}.")
    if task == "binary" and len(classes) != 2:
        raise SamfitError(f"A binary dataset has two classes [background, foreground]; got {classes}.")
    if not root.is_dir():
        raise SamfitError(f"Dataset folder {root} does not exist. Create it with `samfit data prepare NAME "
                          f"--source PATH` (or `samfit data download NAME`).")
    names = _split_names(root, splits)
    with _progress(progress) as bar:
        return [_check_split(root / name, classes, task, bar) for name in names]


def _split_names(root: Path, splits: list[str] | None) -> list[str]:
    if splits is not None:
        missing = [s for s in splits if not (root / s).is_dir()]
        if missing:
            raise SamfitError(f"{root} lacks the split folder(s) {', '.join(missing)} (each with images/ and "
                              f"masks/). Prepare the dataset again from a complete download.")
        return list(splits)
    found = sorted(d.name for d in root.iterdir()
                   if d.is_dir() and ((d / "images").is_dir() or (d / "masks").is_dir()))
    if not found:
        raise SamfitError(f"{root} has no split folders (expected <split>/images and <split>/masks, e.g. "
                          f"train/images). Create it with `samfit data prepare NAME --source PATH`.")
    order = {"train": 0, "val": 1}
    return sorted(found, key=lambda s: (order.get(s, 2), s))


def _check_split(folder: Path, classes: list[str], task: str, bar) -> SplitReport:
    for part in ("images", "masks"):
        if not (folder / part).is_dir():
            raise SamfitError(f"{folder} has no {part}/ folder. Each split needs images/ and masks/.")
    images, masks = _by_stem(folder / "images"), _by_stem(folder / "masks")
    for stem, path in sorted(images.items()):
        if stem not in masks:
            raise SamfitError(f"Image without mask: {path} (no masks/{stem}.png). Add the mask or remove the image.")
    for stem, path in sorted(masks.items()):
        if stem not in images:
            raise SamfitError(f"Mask without image: {path} (no images/{stem}.*). Add the image or remove the mask.")
    task_id = bar.add_task(folder.name, total=len(images)) if bar is not None else None
    counts = np.zeros(256, np.int64)  # number of masks holding each value
    sizes = []
    for stem in sorted(images):
        size = _image_size(images[stem])
        values = _mask_values(masks[stem], size, images[stem])
        _check_values(masks[stem], values, classes, task)
        counts[values] += 1
        sizes.append(size)
        if bar is not None:
            bar.advance(task_id)
    seen = [int(v) for v in np.flatnonzero(counts)]
    if task == "binary":
        class_images = {classes[0]: int(counts[0]), classes[1]: int(counts[255])}
    else:
        class_images = {name: int(counts[i]) for i, name in enumerate(classes)}
    return SplitReport(
        split=folder.name, images=len(images), masks=len(masks),
        min_size=(min(w for w, _ in sizes), min(h for _, h in sizes)) if sizes else None,
        max_size=(max(w for w, _ in sizes), max(h for _, h in sizes)) if sizes else None,
        mask_values=seen, class_images=class_images,
    )


def _by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in image_files(folder):
        if path.stem in found:
            raise SamfitError(f"Two files with the stem '{path.stem}' in {folder}: {found[path.stem].name} and "
                              f"{path.name}. Remove one.")
        found[path.stem] = path
    return found


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as e:
        raise SamfitError(f"Unreadable image {path}: {e}. Replace it (re-run `samfit data prepare`) or remove "
                          f"it together with its mask.") from None


def _mask_values(path: Path, image_size: tuple[int, int], image: Path) -> np.ndarray:
    """The distinct values of the mask at `path`, after checking it decodes, is 8-bit single-channel and
    matches its image's size."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            array = np.asarray(im.convert("L") if mode == "1" else im)
    except Exception as e:
        raise SamfitError(f"Unreadable mask {path}: {e}. Replace it (re-run `samfit data prepare`) or remove "
                          f"it together with its image.") from None
    if mode not in ("L", "1"):
        raise SamfitError(f"Mask {path} has PIL mode {mode}: masks must be single-channel 8-bit PNGs (mode L) "
                          f"holding the class values. `samfit data prepare` writes them so.")
    if size != image_size:
        raise SamfitError(f"Mask {path} is {size[0]}x{size[1]} but its image {image} is "
                          f"{image_size[0]}x{image_size[1]} (width x height).")
    return np.flatnonzero(np.bincount(array.ravel(), minlength=256))


def _check_values(path: Path, values: np.ndarray, classes: list[str], task: str) -> None:
    if task == "binary":
        bad = [int(v) for v in values if v not in (0, 255)]
        rule = "a binary mask holds only 0 (background) and 255 (foreground)"
    else:
        bad = [int(v) for v in values if v >= len(classes) and v != IGNORE]
        rule = f"class indices 0..{len(classes) - 1} ({', '.join(classes)}) or 255 (ignore)"
    if bad:
        raise SamfitError(f"Mask {path} holds illegal values {bad[:10]}: {rule}. Re-run `samfit data prepare` "
                          f"or fix the mask.")


def render_reports(reports: list[SplitReport]):
    """A rich Table with one row per split, for the CLI to print."""
    from rich.table import Table

    table = Table(title="dataset check")
    for column in ("split", "images", "masks", "size (w x h)", "mask values", "classes present (masks)"):
        table.add_column(column, justify="right" if column in ("images", "masks") else "left")
    for r in reports:
        if r.min_size is None:
            size = "-"
        elif r.min_size == r.max_size:
            size = f"{r.min_size[0]}x{r.min_size[1]}"
        else:
            size = f"{r.min_size[0]}x{r.min_size[1]} .. {r.max_size[0]}x{r.max_size[1]}"
        values = ", ".join(map(str, r.mask_values))
        present = ", ".join(f"{name} ({count})" for name, count in r.class_images.items() if count) or "-"
        table.add_row(r.split, str(r.images), str(r.masks), size, values, present)
    return table


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("check {task.description}"), BarColumn(), MofNCompleteColumn())
