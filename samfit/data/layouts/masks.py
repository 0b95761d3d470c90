"""Reading source files, and the mask decoders shared by several datasets.

- binary (ISIC, polyp, COD, SBU, leaf, road): 0 background / 255 foreground. Single-channel masks are
  thresholded at > 127 (0/255 PNGs stay as they are, Kvasir-SEG's JPEG masks lose their compression noise);
  colour masks use the brightest channel (> 127 in any channel is foreground); lossless masks holding only
  0 and 1 are read as 0/1; a lossless mask whose values stop between 2 and 127 is refused (it would decode
  as empty).
- palette (Trans10K-v2): palette PNGs whose indices are the classes, read WITHOUT converting to RGB; 255
  stays "ignore"; any other index >= the number of classes is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from samfit.errors import SamfitError

LOSSLESS_FORMATS = {"PNG", "TIFF", "BMP", "GIF"}


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
