"""Read the official Conv-LoRA code's pair lists: CSV files with columns `image,label`.

Paths are relative to the CSV's own folder (the official code joins them onto the dataset folder). A file
written by pandas' `to_csv` may carry an unnamed index column first; it is ignored. Paths that are absolute
or climb out of the CSV's folder with `..` are refused, so a list cannot make samfit read files elsewhere.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath

from samfit.errors import SamfitError

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


def read_pairs_csv(csv_path: Path) -> list[tuple[Path, Path]]:
    """[(image, mask)] from `csv_path`, both resolved inside the CSV's folder and checked to exist.

    Raises SamfitError naming the file and line (the header is line 1) for: a missing `image` or `label`
    column, an empty cell, an absolute path or one leaving the folder, a file that does not exist.
    """
    csv_path = Path(csv_path)
    folder = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise SamfitError(f"Cannot read pair list {csv_path}: {e.strerror}.") from None
    except UnicodeDecodeError:
        raise SamfitError(f"{csv_path} is not a UTF-8 text CSV file. Expected columns "
                          f"'{IMAGE_COLUMN},{LABEL_COLUMN}' with paths relative to its folder.") from None
    if not rows:
        raise SamfitError(f"{csv_path} is empty. Expected a header '{IMAGE_COLUMN},{LABEL_COLUMN}' and one "
                          f"row per image.")
    header = [name.strip() for name in rows[0]]
    missing = [c for c in (IMAGE_COLUMN, LABEL_COLUMN) if c not in header]
    if missing:
        raise SamfitError(
            f"{csv_path}: no column {' or '.join(repr(c) for c in missing)} in the header (found: "
            f"{', '.join(repr(h) for h in header) or 'nothing'}). The pair list needs columns "
            f"'{IMAGE_COLUMN}' and '{LABEL_COLUMN}' holding paths relative to the CSV's folder."
        )
    image_col, label_col = header.index(IMAGE_COLUMN), header.index(LABEL_COLUMN)
    pairs, seen = [], set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        image = _resolve(csv_path, folder, line, IMAGE_COLUMN, row, image_col)
        label = _resolve(csv_path, folder, line, LABEL_COLUMN, row, label_col)
        if (image, label) not in seen:
            seen.add((image, label))
            pairs.append((image, label))
    return pairs


def _resolve(csv_path: Path, folder: Path, line: int, column: str, row: list[str], index: int) -> Path:
    where = f"{csv_path}, line {line}, column '{column}'"
    value = row[index].strip() if index < len(row) else ""
    if not value:
        raise SamfitError(f"{where}: the cell is empty. Every row needs an image and a label path.")
    posix = value.replace("\\", "/")
    if PurePosixPath(posix).is_absolute() or (len(posix) > 1 and posix[1] == ":"):
        raise SamfitError(f"{where}: '{value}' is an absolute path. Paths must be relative to the CSV's folder "
                          f"{folder}; samfit does not read files outside it.")
    relative = os.path.normpath(posix)
    if relative == ".." or relative.startswith("../"):
        raise SamfitError(f"{where}: '{value}' leaves the CSV's folder {folder}. Paths must stay inside it; "
                          f"move the files under that folder and list them relative to it.")
    path = folder / relative
    if not path.is_file():
        raise SamfitError(f"{where}: file '{value}' not found (looked for {path}).")
    return path
