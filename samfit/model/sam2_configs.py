"""SAM 2.1's image-encoder configurations (Meta's sam2 package, configs/sam2.1/sam2.1_hiera_*.yaml), as data.

Hiera (Ryali et al., ICML 2023) as SAM 2 uses it: a 7×7 stride-4 patch embedding, then four stages of blocks
whose width and head count double at each stage while the token grid halves (query pooling 2×2 in each
stage's first block); stage s attends in windows of window_spec[s] tokens except the global blocks. The
FPN neck maps the four stage outputs to 256 channels; SAM 2 drops the stride-32 level (scalp 1), its mask
decoder reads the stride-16 level as the image embedding and the stride-4 and stride-8 levels as
high-resolution features. `sam2_tiny` is a small random configuration for tests and smoke runs.
"""
from __future__ import annotations

from dataclasses import dataclass

SIZE_MULTIPLE = 32  # input sizes: the stride-4 grid must tile into 8×8 windows and each stride halve evenly
NECK_DIM = 256
SAM2_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class HieraConfig:
    embed_dim: int
    heads: int
    stages: tuple[int, ...]
    global_blocks: tuple[int, ...]
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg: tuple[int, int] = (14, 14)
    fixed_size: int | None = None  # input size used whatever the dataset's image_size
    count_size: int = SAM2_IMAGE_SIZE  # input size at which the complete model is counted


HIERA = {
    "sam2_hiera_t": HieraConfig(96, 1, (1, 2, 7, 2), (5, 7, 9), window_pos_embed_bkg=(7, 7)),
    "sam2_hiera_s": HieraConfig(96, 1, (1, 2, 11, 2), (7, 10, 13), window_pos_embed_bkg=(7, 7)),
    "sam2_hiera_b+": HieraConfig(112, 2, (2, 3, 16, 3), (12, 16, 20)),
    "sam2_hiera_l": HieraConfig(144, 2, (2, 6, 36, 4), (23, 33, 43), window_spec=(8, 4, 16, 8),
                                window_pos_embed_bkg=(7, 7)),
    "sam2_tiny": HieraConfig(16, 1, (1, 1, 2, 1), (3,), window_spec=(8, 4, 4, 2), window_pos_embed_bkg=(4, 4),
                             fixed_size=128, count_size=64),
}


def stage_widths(h: HieraConfig) -> list[int]:
    """The width of each stage: embed_dim · 2^s."""
    return [h.embed_dim * 2 ** s for s in range(len(h.stages))]
