"""Build SAM's modules (segment_anything's own classes) at any input size, and load official weights.

Variants: vit_b, vit_l, vit_h (Kirillov et al. 2023) and `tiny`, a small random ViT with windowed and
global blocks for tests and smoke runs; MedSAM is built as vit_b (samfit/model/backbones.py). Input sizes other than 1024 (multiples of 16) are served by
interpolating the absolute position embedding (bicubic) and the global blocks' relative-position tables
(linear) when a checkpoint is loaded; windowed blocks keep their 14x14 tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from samfit.download import md5sum
from samfit.errors import SamfitError, unknown_name

PROMPT_DIM = 256
PATCH = 16
SAM_IMAGE_SIZE = 1024  # the input size SAM was trained at (its official checkpoints' size)
# SAM's input normalisation (RGB, 0-255 scale; segment_anything's Sam.pixel_mean / pixel_std), applied by the
# data loader: a property of the backbone, not of the dataset.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Variant:
    embed_dim: int
    depth: int
    heads: int
    global_blocks: tuple[int, ...]
    window: int = 14
    file: str | None = None  # official checkpoint file name; None: random weights only (tests, smoke runs)
    md5: str | None = None
    fixed_size: int | None = None  # input size used whatever the dataset's image_size; None: the dataset's
    count_size: int = SAM_IMAGE_SIZE  # input size at which the complete SAM is counted for "% of SAM"

    @property
    def has_weights(self) -> bool:
        """Whether official weights exist (and a checkpoint is loaded for training)."""
        return self.file is not None


VARIANTS = {
    "vit_b": Variant(768, 12, 12, (2, 5, 8, 11), file="sam_vit_b_01ec64.pth",
                     md5="01ec64d29a2fca3f0661936605ae66f8"),
    "vit_l": Variant(1024, 24, 16, (5, 11, 17, 23), file="sam_vit_l_0b3195.pth",
                     md5="0b3195507c641ddb6910d2bb5adee89c"),
    "vit_h": Variant(1280, 32, 16, (7, 15, 23, 31), file="sam_vit_h_4b8939.pth",
                     md5="4b8939a88964f0f4ff5f5b2642c598a6"),
    "tiny": Variant(64, 4, 2, (1, 3), window=4, fixed_size=128, count_size=64),
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise unknown_name("model", name, VARIANTS)
    return VARIANTS[name]


def check_image_size(image_size: int) -> None:
    if image_size <= 0 or image_size % PATCH:
        raise SamfitError(
            f"--image-size {image_size} is not a positive multiple of {PATCH} (SAM's patch size). "
            f"Use e.g. {max(PATCH, round(image_size / PATCH) * PATCH)}, 256, 512 or 1024."
        )


def build_sam_parts(variant: str, image_size: int, num_mask_tokens: int = 1):
    """Return (image_encoder, prompt_encoder, mask_decoder) with random weights.

    The decoder has `num_mask_tokens` mask tokens and (for the binary head) one hypernetwork MLP; its
    IoU head is removed (not trained, not used: prompt-free end-to-end segmentation).
    """
    v = get_variant(variant)
    check_image_size(image_size)
    grid = image_size // PATCH
    encoder = ImageEncoderViT(
        depth=v.depth, embed_dim=v.embed_dim, img_size=image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=v.heads, patch_size=PATCH,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=v.global_blocks, window_size=v.window,
        out_chans=PROMPT_DIM,
    )
    prompt = PromptEncoder(
        embed_dim=PROMPT_DIM, image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size), mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=num_mask_tokens - 1,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_DIM, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    del decoder.iou_prediction_head
    return encoder, prompt, decoder


def sam_total_parameters(variant: str) -> int:
    """Parameter count of the complete original SAM (the denominator of '% of SAM') at the variant's
    `count_size`; built on the meta device."""
    with torch.device("meta"):
        encoder, prompt, decoder = build_sam_parts(variant, get_variant(variant).count_size, 4)
    iou_head = 256 * 256 * 2 + 256 * 2 + 256 * 4 + 4  # MLP(256, 256, 4, depth 3)
    return sum(p.numel() for m in (encoder, prompt, decoder) for p in m.parameters()) + iou_head


# ---------------------------------------------------------------- checkpoints (where files are: backbones.py)

def verify_official_md5(path: Path) -> None:
    """For a file named like an official checkpoint, its MD5 must match (checked once, then remembered)."""
    for name, v in VARIANTS.items():
        if v.file == path.name:
            stamp = path.with_name(path.name + ".md5ok")
            key = f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
            if stamp.is_file() and stamp.read_text() == key:
                return
            actual = md5sum(path)
            if actual != v.md5:
                raise SamfitError(
                    f"Checkpoint {path} has MD5 {actual}, but the official {name} file has {v.md5}: "
                    f"it is corrupt or incomplete. Delete it and run `samfit weights download {name}`."
                )
            try:
                stamp.write_text(key)
            except OSError:
                pass
            return


def guess_variant(state: dict) -> str | None:
    """Which SAM variant a state dict belongs to, from its embedding width and depth."""
    pos = state.get("image_encoder.pos_embed")
    if pos is None:
        return None
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, v in VARIANTS.items():
        if v.embed_dim == pos.shape[-1] and v.depth == depth:
            return name
    return None


def load_sam_state(path: Path, variant: str) -> dict:
    """Load an official-format SAM state dict on CPU, checking MD5 and that it is the right variant."""
    verify_official_md5(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise SamfitError(
            f"Could not read checkpoint {path} ({type(exc).__name__}): the file is corrupt or not a PyTorch "
            f"state dict of tensors. Download it again with `samfit weights download {variant}`."
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or "image_encoder.pos_embed" not in state:
        sam2 = isinstance(state, dict) and "image_encoder.trunk.patch_embed.proj.weight" in state
        hint = " It is a SAM 2 checkpoint: pass --model sam2_hiera_t, _s, _b+ or _l." if sam2 else ""
        raise SamfitError(f"Checkpoint {path} is not a SAM state dict (no image_encoder.pos_embed).{hint}")
    found = guess_variant(state)
    if found != variant:
        raise SamfitError(
            f"Checkpoint {path} is for SAM {found or 'an unknown variant'}, but --model is {variant}. "
            f"Pass --model {found}" + (" or" if found else "") + f" the {variant} checkpoint."
        )
    return state


def resize_encoder_state(state: dict, image_size: int, global_blocks: tuple[int, ...]) -> dict:
    """Interpolate pos_embed (bicubic) and global blocks' rel-pos tables (linear) to `image_size`."""
    grid = image_size // PATCH
    out = dict(state)
    pos = state["image_encoder.pos_embed"]
    if pos.shape[1] != grid:
        resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic",
                                align_corners=False)
        out["image_encoder.pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype)
    for i in global_blocks:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            table = state[key]
            if table.shape[0] != 2 * grid - 1:
                resized = F.interpolate(table.T[None].float(), size=2 * grid - 1, mode="linear",
                                        align_corners=False)
                out[key] = resized[0].T.to(table.dtype)
    return out
