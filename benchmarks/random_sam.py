"""A SAM checkpoint at random in the official key layout, for the benchmarks (no real weights here).

Speed and memory do not depend on the weights; `draw_positions` also draws the position tables, which SAM
initialises at zero, so that an equivalence check at another input size exercises their interpolation.
"""
from __future__ import annotations

from pathlib import Path

import torch


def random_checkpoint(path: Path, variant: str, draw_positions: bool = False) -> Path:
    """Write (once) and return `path`: segment_anything's `variant` with seed-0 random weights."""
    if path.is_file():
        return path
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    state = sam_model_registry[variant]().state_dict()
    if draw_positions:
        with torch.no_grad():
            for key, value in state.items():
                if key == "image_encoder.pos_embed" or ".rel_pos_" in key:
                    value.normal_(0, 0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
