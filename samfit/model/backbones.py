"""The backbones samfit fine-tunes, by model name: how each is built, the checkpoint it loads, how its images are
normalised, its token grid and its blocks (docs/reference.md, Backbones).

* SAM (Kirillov et al. 2023): vit_b, vit_l, vit_h and `tiny` (random, for tests); built by samfit/model/sam.py.
* MedSAM (Ma et al., Nature Communications 2024): SAM ViT-B fine-tuned on 1.5M medical image-mask pairs, fed
  images min-max scaled to [0, 1] (MedSAM_Inference.py: x ← (x − min) / max(max − min, 1e-8)), no mean/std.
* SAM 2.1 (Ravi et al. 2024): the Hiera image encoder with its FPN neck, sizes t, s, b+, l, and `sam2_tiny`
  (random, for tests); built by samfit/model/sam2.py through Meta's `sam2` package.

`features` says what a backbone's encoder offers the PEFT methods (methods/base.py, `requires`): SAM's blocks
have everything; Hiera's have a fused qkv, an MLP, two norms and token grids, but widths change between stages
and there is no single-scale ViT stem, window-prompt attention or plain neck.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samfit.errors import SamfitError, unknown_name
from samfit.model.sam import PATCH, PIXEL_MEAN, PIXEL_STD, VARIANTS
from samfit.model.sam2_configs import HIERA, SIZE_MULTIPLE, stage_widths

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
MEDSAM_SOURCE = ("the MedSAM authors' Google Drive folder linked from https://github.com/bowang-lab/MedSAM "
                 "(README, 'Download the model checkpoint'): "
                 "https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN")

# What encoder blocks can offer a method (methods/base.py `requires` names these).
FEATURES = {
    "fused-qkv": "a fused qkv Linear in every block's attention (attn.qkv) and an output projection (attn.proj)",
    "mlp": "a two-layer MLP in every block (mlp.lin1, mlp.lin2)",
    "norms": "a LayerNorm before the attention and before the MLP (norm1, norm2)",
    "token-grid": "blocks that take (B, h, w, d) token grids",
    "uniform-width": "one width d in every block",
    "vit-stem": "SAM's single-scale ViT encoder (patch embedding, absolute position embedding, blocks, neck)",
    "window-attention": "SAM's windowed/global attention with decomposed relative positions",
}
SAM_FEATURES = frozenset(FEATURES)
HIERA_FEATURES = frozenset({"fused-qkv", "mlp", "norms", "token-grid"})


@dataclass(frozen=True)
class Normalisation:
    """How an RGB image (float32, H×W×3, 0-255) becomes the encoder's input."""
    kind: str  # "mean-std" (per channel, 0-255 scale) or "min-max" (each image to [0, 1])
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.kind == "min-max":
            low, high = float(image.min()), float(image.max())
            return ((image - low) / max(high - low, 1e-8)).astype(np.float32)
        return ((image - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)).astype(np.float32)


# SAM's Sam.pixel_mean / pixel_std. SAM 2's SAM2Transforms (x / 255, then ImageNet mean 0.485, 0.456, 0.406 and
# std 0.229, 0.224, 0.225) is the same map: 0.485 · 255 = 123.675, 0.229 · 255 = 58.395, ...
SAM_NORMALISATION = Normalisation("mean-std", PIXEL_MEAN, PIXEL_STD)
MEDSAM_NORMALISATION = Normalisation("min-max")


@dataclass(frozen=True)
class Weights:
    file: str
    url: str | None  # None: no stable direct URL (`source` says where to get the file)
    md5: str | None = None
    size: int | None = None  # bytes, where published
    source: str = ""


@dataclass(frozen=True)
class Backbone:
    name: str
    family: str  # "sam" (samfit/model/sam.py) or "sam2" (samfit/model/sam2.py)
    architecture: str  # the SAM variant or SAM 2 configuration it is built as
    weights: Weights | None  # None: random weights only (tests, smoke runs)
    normalisation: Normalisation
    size_multiple: int  # --image-size must be a multiple of it
    blocks: str  # the block structure, in words
    features: frozenset[str]
    fixed_size: int | None = None  # input size used whatever the dataset's image_size
    grid_stride: int = PATCH  # input pixels per token of the image embedding the decoder reads

    @property
    def has_weights(self) -> bool:
        return self.weights is not None


def _sam(name: str, arch: str, weights: Weights | None, normalisation=SAM_NORMALISATION) -> Backbone:
    v = VARIANTS[arch]
    windowed = v.depth - len(v.global_blocks)
    blocks = (f"{v.depth} ViT blocks of width {v.embed_dim} ({windowed} with {v.window}×{v.window} windows, global "
              f"{', '.join(map(str, v.global_blocks))}), one {PATCH}-px token grid")
    return Backbone(name, "sam", arch, weights, normalisation, PATCH, blocks, SAM_FEATURES, v.fixed_size)


def _sam2(name: str, weights: Weights | None) -> Backbone:
    h = HIERA[name]
    stages = ", ".join(f"{n}×{w}" for n, w in zip(h.stages, stage_widths(h)))
    blocks = (f"{sum(h.stages)} Hiera blocks in 4 stages (blocks×width {stages}; token grids of stride 4, 8, 16, 32; "
              f"global {', '.join(map(str, h.global_blocks))}), FPN neck to 256 channels")
    return Backbone(name, "sam2", name, weights, SAM_NORMALISATION, SIZE_MULTIPLE, blocks, HIERA_FEATURES,
                    h.fixed_size)


def _sam2_weights(file: str) -> Weights:
    """Meta publishes no checksums or sizes for the SAM 2.1 files (checkpoints/download_ckpts.sh fetches them
    unverified); the file is checked by loading it (samfit/model/sam2_load.py)."""
    return Weights(file, SAM2_URL + file)


BACKBONES: dict[str, Backbone] = {
    **{n: _sam(n, n, Weights(VARIANTS[n].file, SAM_URL + VARIANTS[n].file, VARIANTS[n].md5) if VARIANTS[n].file
                else None) for n in VARIANTS},
    "medsam_vit_b": _sam("medsam_vit_b", "vit_b", Weights("medsam_vit_b.pth", None, source=MEDSAM_SOURCE),
                         MEDSAM_NORMALISATION),
    "sam2_hiera_t": _sam2("sam2_hiera_t", _sam2_weights("sam2.1_hiera_tiny.pt")),
    "sam2_hiera_s": _sam2("sam2_hiera_s", _sam2_weights("sam2.1_hiera_small.pt")),
    "sam2_hiera_b+": _sam2("sam2_hiera_b+", _sam2_weights("sam2.1_hiera_base_plus.pt")),
    "sam2_hiera_l": _sam2("sam2_hiera_l", _sam2_weights("sam2.1_hiera_large.pt")),
    "sam2_tiny": _sam2("sam2_tiny", None),
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise unknown_name("model", name, BACKBONES)
    return BACKBONES[name]


def normalisation(model: str) -> Normalisation:
    """The input normalisation of a model name (SAM's mean/std, MedSAM's [0, 1] scaling)."""
    return get_backbone(model).normalisation


def check_image_size(model: str, image_size: int) -> None:
    """--image-size must be a positive multiple of the backbone's `size_multiple` (SAM: its 16-px patches;
    Hiera: 32, so that its stride-4 grid tiles into its 8×8 windows and every stride halves evenly)."""
    m = get_backbone(model).size_multiple
    if image_size <= 0 or image_size % m:
        why = "SAM's patch size" if m == PATCH else "what Hiera's windows and strides need"
        raise SamfitError(f"--image-size {image_size} is not a positive multiple of {m} ({why}) for --model "
                          f"{model}. Use e.g. {max(m, round(image_size / m) * m)}, 256, 512 or 1024.")


# ---------------------------------------------------------------- checkpoint files

def checkpoint_dir() -> Path:
    return Path(os.environ.get("SAMFIT_CHECKPOINTS", Path.home() / ".cache" / "samfit" / "checkpoints"))


def weights_url(model: str) -> str | None:
    """Where `samfit weights download` fetches the file ($SAMFIT_WEIGHTS_URL replaces the host folder)."""
    w = get_backbone(model).weights
    if w is None or w.url is None:
        return None
    base = os.environ.get("SAMFIT_WEIGHTS_URL")
    return base.rstrip("/") + "/" + w.file if base else w.url


def where_to_get(model: str) -> str:
    """How to obtain a model's weights file, for error messages."""
    w = get_backbone(model).weights
    if w.url is None:
        return (f"There is no stable direct URL for {w.file}: download it by hand from {w.source}, then pass "
                f"--checkpoint PATH or put it in $SAMFIT_CHECKPOINTS ({checkpoint_dir()}).")
    return (f"Download it with\n  samfit weights download {model}\n(from {weights_url(model)}), or pass "
            f"--checkpoint PATH, or set SAMFIT_CHECKPOINTS to the folder holding {w.file}.")


def resolve_checkpoint(model: str, checkpoint: str | Path | None) -> Path:
    """--checkpoint PATH, else $SAMFIT_CHECKPOINTS/<file>, else ~/.cache/samfit/checkpoints/<file>."""
    b = get_backbone(model)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise SamfitError(f"Checkpoint not found: {path}. Check the path given to --checkpoint.")
        return path
    if not b.has_weights:
        raise SamfitError(f"Model '{model}' has no official weights; it is for tests and smoke runs.")
    path = checkpoint_dir() / b.weights.file
    if not path.is_file():
        raise SamfitError(f"{model} weights not found at {path}. {where_to_get(model)}")
    return path


def record_download(path: Path) -> dict:
    """For a file with no published checksum (the SAM 2.1 files): its size and SHA-256 at the first download, kept
    beside it in <file>.sha256.json, to cite in a report and to compare a later copy against."""
    import json

    from samfit.download import sha256sum

    record = {"file": path.name, "size": path.stat().st_size, "sha256": sha256sum(path)}
    path.with_name(path.name + ".sha256.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
