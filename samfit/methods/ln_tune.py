"""LayerNorm tuning: only the affine weight and bias of the two LayerNorms of every encoder block train, from
their pretrained values (the "LayerNorm tuning" of micro-sam / peft-sam, Teuber et al., MIDL 2025, arXiv
2502.00418):

    LN(x) = w ⊙ (x − μ) / sqrt(σ² + ε) + b,   w, b trainable for norm1 and norm2 of every block

= 4·d per block, 4·d·L in all (no size knob: outside the ±35% budget by nature, like BitFit). The neck's
LayerNorm2d layers stay frozen. Nothing is inserted, so the model is SAM at step 0, and "merging" is a no-op.
"""
from __future__ import annotations

from samfit.methods.base import Method, placement_config, register_method


@register_method
class LNTune(Method):
    name = "ln-tune"
    requires = frozenset({"norms"})
    summary = "train the weight and bias of both LayerNorms of every block"
    Config = placement_config("ln-tune")
    identical_at_init = True
    mergeable = True
    unfreezes = ("image_encoder.blocks.*.norm1.*", "image_encoder.blocks.*.norm2.*")

    def inject(self, model) -> None:
        for block in self.selected_blocks(model):
            block.norm1.requires_grad_(True)
            block.norm2.requires_grad_(True)

    def merge(self, model):
        """Nothing to fold: the trained LayerNorm parameters are SAM's own."""
        return model
