"""The images a command is given (folders, files, globs) and the files it writes: never over an input, atomically."""
from __future__ import annotations

import glob
from pathlib import Path

from samfit.data.registry import IMAGE_SUFFIXES
from samfit.errors import SamfitError

GLOB_CHARS = set("*?[")


def collect_images(inputs: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """(image files in order, the folders given or searched by a pattern) for folders, files and glob patterns.

    A folder gives its image files (a canonical split folder, its images/ subfolder); a pattern its matching
    image files; a file itself. The same file given twice counts once."""
    if not inputs:
        raise SamfitError("No images given. Pass a folder, image files or a glob pattern, e.g. 'scans/*.png'.")
    images: list[Path] = []
    roots: list[Path] = []
    for item in map(str, inputs):
        path = Path(item).expanduser()
        if path.is_dir():
            folder = path / "images" if not _images_in(path) and (path / "images").is_dir() else path
            found = _images_in(folder)
            if not found:
                raise SamfitError(f"No images in folder {path} (looked for {', '.join(IMAGE_SUFFIXES)} files). Give "
                                  f"the folder that holds the images, or the files themselves.")
            images += found
            roots.append(path)
        elif GLOB_CHARS & set(item):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SamfitError(f"No image files match {item!r}. Check the pattern (quote it so that samfit, "
                                  f"not the shell, expands it) and the folder.")
            images += found
            roots += sorted({p.parent for p in found})
        elif path.is_file():
            images.append(path)
        else:
            raise SamfitError(f"Input {item} does not exist: give an existing folder, image file or glob pattern.")
    unique = list(dict.fromkeys(p.resolve() for p in images))
    by_stem: dict[str, Path] = {}
    for p in unique:
        if p.stem in by_stem:
            raise SamfitError(f"Two inputs have the same name {p.stem!r} ({by_stem[p.stem]} and {p}): their outputs "
                              f"would overwrite each other. Predict the two folders into different --out folders.")
        by_stem[p.stem] = p
    return unique, list(dict.fromkeys(r.resolve() for r in roots))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def check_output_folder(out: Path, roots: list[Path], images: list[Path]) -> Path:
    """`out` resolved; an error when it is an input folder or inside one, or holds an input image (an output
    could replace an input)."""
    target = Path(out).expanduser().resolve()
    for root in roots:
        if target == root or root in target.parents:
            raise SamfitError(f"--out {out} is inside the input folder {root}: samfit never writes among the images "
                              f"it reads (an output could replace an input). Choose an --out outside it.")
    for image in images:
        if target in image.parents:
            raise SamfitError(f"--out {out} holds the input image {image}: samfit never writes where it reads (an "
                              f"output could replace an input). Choose an --out that holds none of the inputs.")
    if target.exists() and not target.is_dir():
        raise SamfitError(f"--out {out} is a file, not a folder. Choose a folder (it is created if needed).")
    return target
