"""Segment new images with a trained run: one mask PNG per image at the image's own size.

Each image is read and normalised as in training (RGB, bicubic resize to the model's input size, the backbone's
normalisation), segmented, and the prediction brought back to the image's size as evaluation does (probabilities or
class scores upsampled bilinearly), so predicting a test set and scoring the masks gives the run's own scores.

Written under OUT: masks/<stem>.png (binary: 0/255 where the probability exceeds the threshold; multi-class: the
class index with a colour palette), optionally overlays/<stem>.jpg (the mask blended over the image) and
probabilities/<stem>.png (16-bit: round(p · 65535); multi-class: <stem>_<class>.png per class score).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from samfit.model.backbones import normalisation
from samfit.errors import SamfitError
from samfit.engine.rundir import write_bytes

# class 0 (background) black, then distinct colours (RGB), repeated for more classes
COLOURS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
           (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195)]


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours; class 0 black."""
    return np.array([COLOURS[0]] + [COLOURS[1 + (c - 1) % (len(COLOURS) - 1)] for c in range(1, num_classes)],
                    np.uint8)


@dataclass
class Summary:
    written: list[Path] = field(default_factory=list)  # the mask files
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (image, why)


def read_rgb(path: Path) -> np.ndarray | None:
    """The image as RGB uint8, or None when it cannot be decoded."""
    try:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        return None
    return None if image is None or image.size == 0 else np.ascontiguousarray(image[..., ::-1])


def to_input(image: np.ndarray, size: int, model: str = "vit_b") -> torch.Tensor:
    """As SegmentationFolder feeds training and evaluation."""
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    return torch.from_numpy(normalisation(model)(resized).transpose(2, 0, 1).copy())


def _png(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise SamfitError("Could not encode a PNG (cv2.imencode failed).")
    return data.tobytes()


def _palette_png(classes: np.ndarray, colours: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray(classes.astype(np.uint8), mode="P")
    image.putpalette(colours.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _overlay(image: np.ndarray, colour_map: np.ndarray, shown: np.ndarray) -> bytes:
    blend = image.astype(np.float32)
    blend[shown] = 0.5 * blend[shown] + 0.5 * colour_map[shown]
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(blend.round().astype(np.uint8)[..., ::-1]),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise SamfitError("Could not encode a JPEG overlay (cv2.imencode failed).")
    return data.tobytes()


def write_outputs(out: Path, stem: str, image: np.ndarray, scores: torch.Tensor, threshold: float, overlay: bool,
                  probabilities: bool) -> Path:
    """The files of one image from its scores (C, H, W) at the image's size; returns the mask's path."""
    mask_path = out / "masks" / f"{stem}.png"
    if scores.shape[0] == 1:
        prob = scores[0].numpy()
        positive = prob > threshold
        write_bytes(mask_path, _png(positive.astype(np.uint8) * 255))
        colour_map = np.broadcast_to(np.array([255, 0, 0], np.float32), image.shape)
        maps = {"": prob}
    else:
        classes = scores.argmax(0).numpy()
        colours = palette(scores.shape[0])
        write_bytes(mask_path, _palette_png(classes, colours))
        positive = classes > 0
        colour_map = colours[classes].astype(np.float32)
        maps = {f"_{c}": scores[c].clamp(0, 1).numpy() for c in range(scores.shape[0])}
    if overlay:
        write_bytes(out / "overlays" / f"{stem}.jpg", _overlay(image, colour_map, positive))
    if probabilities:
        for suffix, prob in maps.items():
            write_bytes(out / "probabilities" / f"{stem}{suffix}.png", _png((prob * 65535).round().astype(np.uint16)))
    return mask_path


@torch.no_grad()
def predict_images(model, images: list[Path], out: Path, threshold: float = 0.5, overlay: bool = False,
                   probabilities: bool = False, batch_size: int | None = None, precision: str = "auto",
                   console: Console | None = None) -> Summary:
    """Segment `images` with a loaded run (`samfit.load_run`) into `out` (see the module docstring). A mergeable
    method is merged into the model first, in place (`merge_for_inference`): plain SAM's cost, the same function."""
    from samfit.engine.step import autocast_for
    from samfit.use.load import merge_for_inference

    if not 0 <= threshold < 1:
        raise SamfitError(f"--threshold {threshold}: must be in [0, 1) (a probability; 0.5 is what scores use).")
    cfg = merge_for_inference(model).run_config
    batch_size = batch_size or cfg.batch_size
    if batch_size < 1:
        raise SamfitError(f"--batch-size {batch_size}: must be >= 1.")
    device = next(model.parameters()).device
    autocast = autocast_for(precision, device)[0]
    summary = Summary()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console or Console(stderr=True), transient=True,
                  disable=console is None) as progress:
        task = progress.add_task("predict", total=len(images))
        pending: list[tuple[Path, np.ndarray]] = []
        for index, path in enumerate(images):
            image = read_rgb(path)
            if image is None:
                summary.skipped.append((path, "unreadable (not an image, or damaged)"))
                progress.advance(task)
            else:
                pending.append((path, image))
            if pending and (len(pending) == batch_size or index == len(images) - 1):
                batch = torch.stack([to_input(image, cfg.image_size, cfg.model) for _, image in pending]).to(device)
                with autocast():
                    logits = model(batch)["logits"]
                scores = logits.float().sigmoid() if logits.shape[1] == 1 else logits.float()
                for (path, image), s in zip(pending, scores.cpu()):
                    s = F.interpolate(s[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
                    summary.written.append(write_outputs(out, path.stem, image, s, threshold, overlay, probabilities))
                    progress.advance(task)
                pending = []
    return summary
