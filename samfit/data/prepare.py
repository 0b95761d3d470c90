"""`prepare_dataset`: turn an official download into samfit's canonical dataset folder.

Canonical layout (what the dataset loader and `check_dataset` read):

    <data_root>/<name>/<split>/images/<stem>.jpg|.png   original bytes when the file is a JPEG or PNG,
                                                        other formats (.tif/.tiff, .bmp) converted to PNG
    <data_root>/<name>/<split>/masks/<stem>.png         single-channel uint8: binary 0/255; multi-class
                                                        class indices (0 = background), 255 = ignore

The source is a folder, an archive (.zip, .tar, .tar.gz, .tgz), a folder holding archives (e.g. the six
ISIC zips), or a list of these; archives are unpacked into a temporary folder under `data_root` that is
removed afterwards. Which of the dataset's layouts the source is in (its official layout or the Conv-LoRA
code's CSV pair lists; see `samfit.data.layouts`) is detected; neither gives an error showing both.

Re-running is safe: every file is written atomically (temporary file, then rename) and skipped when the
existing file already has identical bytes; files and split folders left from an earlier run that this run
does not produce are deleted, so the folder always mirrors the last source.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

from samfit.data.layouts import LAYOUTS, DirIndex, Layout, Pair, Splits, find_csv_splits, open_image
from samfit.data.parts import join_parts
from samfit.errors import SamfitError, unknown_name

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
KEPT_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png"}  # MPO: a JPEG with extra frames (cameras)
CANONICAL_PARTS = ("images", "masks")


def prepared_names() -> list[str]:
    """Dataset names `prepare_dataset` knows."""
    return sorted(LAYOUTS)


def prepare_dataset(name: str, source: Path | Sequence[Path], data_root: Path, progress: bool = True) -> Path:
    """Convert the official download at `source` into `<data_root>/<name>/`; returns that folder.

    `source`: a folder, an archive, a folder of archives, or a list of these (searched together).
    Raises SamfitError for an unknown name, a source in no known layout (showing the expected ones), an
    image without mask or the reverse, an unreadable file, a mask whose size differs from its image's.
    """
    if name not in LAYOUTS:
        raise unknown_name("dataset", name, LAYOUTS)
    layout = LAYOUTS[name]
    sources = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(s) for s in source]
    data_root = Path(data_root)
    out = data_root / name
    for s in sources:
        if not s.exists():
            raise SamfitError(f"Source {s} does not exist. Pass the downloaded archive or its unpacked folder.")
        if _inside(s, out):
            raise SamfitError(f"Source {s} is inside the output folder {out}, which `prepare` rewrites. Move the "
                              f"download elsewhere, or choose another data root.")
    data_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_root, prefix=f".unpack-{name}-") as tmp:
        names: dict[Path, str] = {}  # unpacked folder -> the archive it came from (for messages)
        try:
            splits = _find_splits(layout, sources, Path(tmp), out, names)
            _write_dataset(name, layout, splits, out, progress)
        except SamfitError as e:
            raise SamfitError(_unpacked_to_archive(str(e), names)) from None
    return out


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _find_splits(layout: Layout, sources: list[Path], tmp: Path, out: Path, names: dict[Path, str]) -> Splits:
    joined: dict[Path, Path] = {}  # an archive rebuilt from its parts -> the name the user knows it by
    shown = ", ".join(str(s) for s in sources)
    sources = join_parts(sources, tmp, joined)
    folders = [s for s in sources if s.is_dir()]
    archives = [s for s in sources if _is_archive(s)]
    others = [s for s in sources if s not in folders and s not in archives]
    if others:
        raise SamfitError(f"Source {others[0]} is neither a folder nor a .zip/.tar/.tar.gz archive. Pass the "
                          f"downloaded archive or the folder it unpacks to (unpack other archive types first).")
    roots = folders + [_unpack(a, tmp, names, joined) for a in archives]
    inner = [a for f in folders for a in join_parts(sorted(f.iterdir()), tmp, joined)
             if _is_archive(a)]  # a folder of downloads
    try:
        splits = _detect(layout, roots, out)
    except SamfitError:
        if not inner:
            raise
        splits = None  # perhaps completed by the archives beside the unpacked part
    if splits is None and inner:
        roots = roots + [_unpack(a, tmp, names, joined) for a in inner]
        splits = _detect(layout, roots, out)
    if splits is None:
        index = DirIndex(roots, exclude=(out,))
        raise SamfitError(f"{shown}: not a '{layout.name}' download in a known layout: looked in "
                          f"{index.where()} (at any depth) for the folders below, and "
                          f"{index.nearest(*_top_names(layout.tree))}.\n"
                          f"Expected one of these layouts (at any depth below the source):\n{layout.describe()}")
    if not any(splits.values()):
        raise SamfitError(f"The '{layout.name}' source {', '.join(map(str, sources))} holds no images.")
    return splits


def _top_names(tree: str) -> list[str]:
    """The folder names a layout's tree starts with (`TrainDataset/{images,masks}/` -> TrainDataset)."""
    import re

    names = []
    for line in tree.strip().splitlines():
        words = line.strip().split()
        words = words[1:] if words[:1] == ["or"] else words
        first = words[0].split("/")[0] if words else ""
        names += re.sub(r"[{}]", "", first).split(",") if first and not first.startswith("(") else []
    return [n for n in names if n] or ["train"]


def _detect(layout: Layout, roots: list[Path], out: Path) -> Splits | None:
    """CSV pair lists win over the folder layout: they are the paper's own split."""
    index = DirIndex(roots, exclude=(out,))
    splits = find_csv_splits(index, layout)
    if splits:
        return splits
    splits = layout.find(index)
    if splits is not None and layout.split_record is not None:
        splits = _RecordedSplits(splits, layout.split_record(splits))
    return splits


class _RecordedSplits(dict):
    """Splits that samfit drew itself (e.g. Kvasir-SEG's), with the record `prepare` writes to split.json."""

    def __init__(self, splits: Splits, record: dict):
        super().__init__(splits)
        self.record = record


def _unpack(archive: Path, tmp: Path, names: dict[Path, str], joined: dict[Path, Path] | None = None) -> Path:
    target = tmp / f"{len(names)}-{archive.name}"
    target.mkdir()
    archive_name = str((joined or {}).get(archive, archive))
    names[target] = archive_name
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for member in z.namelist():
                    if not _inside_lexically(member):
                        raise SamfitError(f"Archive {archive_name} holds a file outside its folder ('{member}'); "
                                          f"refusing to unpack it.")
                z.extractall(target)
        else:
            with tarfile.open(archive) as t:
                t.extractall(target, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise SamfitError(f"Cannot unpack {archive_name}: {e}. The archive is damaged or incomplete; download it "
                          f"again.") from None
    return target


def _inside_lexically(member: str) -> bool:
    parts = member.replace("\\", "/").split("/")
    return not member.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def _unpacked_to_archive(message: str, names: dict[Path, str]) -> str:
    for folder, archive in names.items():
        message = message.replace(str(folder), f"{archive}:")
    return message


# --- writing ---------------------------------------------------------------------------------------------

def _write_dataset(name: str, layout: Layout, splits: Splits, out: Path, progress: bool) -> None:
    for split, pairs in splits.items():
        seen: dict[str, Pair] = {}
        for pair in pairs:
            if pair.stem in seen:
                raise SamfitError(f"Two '{split}' images would be written as '{pair.stem}': {seen[pair.stem].image} "
                                  f"and {pair.image}. Rename or remove one.")
            seen[pair.stem] = pair
    kept: set[Path] = set()
    with _progress(progress) as bar:
        for split, pairs in splits.items():
            task = bar.add_task(f"{name}/{split}", total=len(pairs)) if bar is not None else None
            for folder in CANONICAL_PARTS:
                (out / split / folder).mkdir(parents=True, exist_ok=True)
            for pair in pairs:
                kept.update(_write_pair(pair, layout, out / split))
                if bar is not None:
                    bar.advance(task)
    _remove_stale(out, set(splits), kept)
    record = out / "split.json"
    if isinstance(splits, _RecordedSplits):
        import json

        _write_if_changed(record, (json.dumps(splits.record, indent=1) + "\n").encode())
    elif record.is_file():
        record.unlink()


def _write_pair(pair: Pair, layout: Layout, split_dir: Path) -> tuple[Path, Path]:
    try:
        with Image.open(pair.image) as im:  # the header only: kept JPEGs/PNGs are not decoded
            image_format, image_size = im.format, im.size
    except Exception:
        image_format, image_size = None, open_image(pair.image).size  # tifffile fallback, or a clear error
    mask = layout.decode_mask(pair.mask)
    if (mask.shape[1], mask.shape[0]) != image_size:
        raise SamfitError(f"Mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {pair.image} is "
                          f"{image_size[0]}x{image_size[1]} (width x height). Fix or remove this pair.")
    if image_format in KEPT_FORMATS:
        image_bytes, suffix = pair.image.read_bytes(), KEPT_FORMATS[image_format]
    else:
        image_bytes, suffix = _png_bytes(_convertible(open_image(pair.image))), ".png"
    image_dest = split_dir / "images" / f"{pair.stem}{suffix}"
    mask_dest = split_dir / "masks" / f"{pair.stem}.png"
    _write_if_changed(image_dest, image_bytes)
    _write_if_changed(mask_dest, _png_bytes(Image.fromarray(mask, mode="L")))
    return image_dest, mask_dest


def _convertible(im: Image.Image) -> Image.Image:
    """`im` in a mode PNG stores as an ordinary photo (RGB or L)."""
    if im.mode in ("RGB", "L"):
        return im
    if im.mode.startswith("I") or im.mode == "F":  # 16-bit or float greyscale: scale to 8 bit
        values = np.asarray(im).astype(np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _write_if_changed(dest: Path, data: bytes) -> None:
    """Write `data` to `dest` atomically, unless `dest` already holds exactly these bytes."""
    try:
        if dest.stat().st_size == len(data) and dest.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _remove_stale(out: Path, splits: set[str], kept: set[Path]) -> None:
    """Delete what an earlier run left: files not written now, split folders not produced now."""
    for entry in sorted(out.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name not in splits:
            if {p.name for p in entry.iterdir()} <= set(CANONICAL_PARTS):
                shutil.rmtree(entry)
            continue
        for folder in CANONICAL_PARTS:
            for path in (entry / folder).iterdir():
                if path not in kept and path.is_file():
                    path.unlink()


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
