"""Activation checkpointing per encoder block (`--grad-checkpoint`).

During a training forward each block of SAM's image encoder keeps only its input; its internal activations
(attention maps, the 4d-wide MLP layer, ...) are recomputed in the backward pass (torch.utils.checkpoint,
non-reentrant). The RNG state and autocast state of the forward are replayed, so the gradients are those of
the plain model (tested), at the cost of one more forward of the encoder per step.

`set_grad_checkpoint(model, True)` finds SAM's `ImageEncoderViT` wherever a method put it (the encoder
itself, or the backbone inside a method's wrapper) and checkpoints every entry of its `blocks` — SAM's
`Block`, or whatever module a method put in its place. It patches each block's `forward` on the instance,
so module names and state-dict keys stay as they are (checkpoints load either way). Blocks run normally
when gradients are off (evaluation, backbones run under no_grad).

Layers that leave an auxiliary loss in `aux_loss` during forward (base.py) would set it again during the
recomputation; the recomputation restores whatever those attributes held before it, so the loss is counted
once, from the real forward.
"""
from __future__ import annotations

import contextlib

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn
from torch.utils.checkpoint import checkpoint

from samfit.model.sam2 import HieraEncoder


def encoder_backbones(model: nn.Module) -> list[nn.Module]:
    """SAM's ImageEncoderViT and SAM 2's HieraEncoder (whose `blocks` are Hiera's) wherever they are."""
    return [m for m in model.modules() if isinstance(m, (ImageEncoderViT, HieraEncoder))]


@contextlib.contextmanager
def _keep_aux_losses(block: nn.Module):
    """Restore every `aux_loss` attribute inside `block` after the recomputation."""
    saved = [(m, m.aux_loss) for m in block.modules() if hasattr(m, "aux_loss")]
    try:
        yield
    finally:
        for module, value in saved:
            module.aux_loss = value


def _checkpointed_forward(block: nn.Module):
    plain = type(block).forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return plain(block, *args, **kwargs)
        return checkpoint(plain, block, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _keep_aux_losses(block)), **kwargs)

    forward.samfit_checkpointed = True
    return forward


def is_checkpointed(block: nn.Module) -> bool:
    return getattr(block.__dict__.get("forward"), "samfit_checkpointed", False)


def set_grad_checkpoint(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Checkpoint (or stop checkpointing) every block of every SAM image encoder in `model`."""
    for backbone in encoder_backbones(model):
        for block in backbone.blocks:
            if enabled and not is_checkpointed(block):
                block.forward = _checkpointed_forward(block)
            elif not enabled and is_checkpointed(block):
                del block.forward
    return model
