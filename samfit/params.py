"""Parameter counting: what a method trains, split into encoder side and decoder side."""
from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{total, trainable, encoder_trainable, decoder_trainable}; 'encoder' = everything outside the mask
    decoder that a method adds or unfreezes (adapters, side networks, prompts, biases)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    decoder = sum(p.numel() for p in model.mask_decoder.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "encoder_trainable": trainable - decoder,
            "decoder_trainable": decoder}
