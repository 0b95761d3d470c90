"""Built-in synthetic datasets, generated deterministically into the canonical layout.

`shapes`: 1-3 filled shapes (disc, square, triangle, ring) on a textured background; the mask is their
union (0/255). `shapes-multiclass`: the same scenes, the mask holds the class index (1 disc, 2 square,
3 triangle, 4 ring; 0 background). Both foreground and background carry band-limited colour noise and
stripes of random orientation, and each class has its own tint only on average, so a model must learn
texture, colour and shape rather than threshold one channel.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

KINDS = ("disc", "square", "triangle", "ring")
VERSION = 1


def _texture(rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size, 3)).astype(np.float32), (0, 0), 2.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
    stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
    return base[None, None, :] + 30 * noise + 18 * stripes


def _draw(kind: str, mask: np.ndarray, rng: np.random.Generator) -> None:
    size = mask.shape[0]
    r = int(rng.uniform(0.1, 0.22) * size)
    cx, cy = (int(v) for v in rng.uniform(r, size - r, 2))
    if kind == "disc":
        cv2.circle(mask, (cx, cy), r, 1, -1)
    elif kind == "square":
        cv2.rectangle(mask, (cx - r, cy - r), (cx + r, cy + r), 1, -1)
    elif kind == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    else:
        cv2.circle(mask, (cx, cy), r, 1, max(2, r // 3))


def make_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image (uint8) and its class-index map (0 background, 1..4 = KINDS)."""
    tints = np.array([[200, 90, 80], [80, 180, 90], [90, 100, 200], [190, 180, 70]], np.float32)
    image = _texture(rng, size, rng.uniform(90, 160, 3).astype(np.float32))
    classes = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        k = int(rng.integers(len(KINDS)))
        shape = np.zeros((size, size), np.uint8)
        _draw(KINDS[k], shape, rng)
        fill = _texture(rng, size, tints[k] + rng.normal(0, 20, 3).astype(np.float32))
        image[shape > 0] = fill[shape > 0]
        classes[shape > 0] = k + 1
    return np.clip(image, 0, 255).astype(np.uint8), classes


def generate(spec, folder: Path) -> None:
    """Write the dataset if it is not already there in this version (safe to call every run)."""
    cfg = spec.synthetic
    stamp = folder / "samfit-synthetic.json"
    key = {"version": VERSION, **cfg}
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return
    size, seed = int(cfg["image_size"]), int(cfg.get("seed", 0))
    multiclass = cfg["generator"] == "shapes-multiclass"
    for split_index, (split, count) in enumerate(cfg["counts"].items()):
        (folder / split / "images").mkdir(parents=True, exist_ok=True)
        (folder / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(int(count)):
            rng = np.random.default_rng([seed, split_index, i])
            image, classes = make_scene(rng, size)
            mask = classes if multiclass else (classes > 0).astype(np.uint8) * 255
            cv2.imwrite(str(folder / split / "images" / f"{i:04d}.png"), image[..., ::-1])
            cv2.imwrite(str(folder / split / "masks" / f"{i:04d}.png"), mask)
    stamp.write_text(json.dumps(key))
