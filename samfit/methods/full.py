"""Full fine-tuning: every weight of SAM's image encoder trains (patch embedding, absolute position embedding,
every block with its relative-position tables, and the neck), from the pretrained values.

    θ_encoder ← θ_encoder − η·∇L   for all of it

The upper bound of every PEFT table (Teuber et al., MIDL 2025, arXiv 2502.00418, train it beside the PEFT
methods). Encoder-side count at input size S (grid g = S/16, head width h = d/heads, window 14, L blocks of
which G global): 769·d + g²·d + L·(12·d² + 13·d) + (L − G)·2·27·h + G·2·(2g − 1)·h + 256·d + 590,848 —
89,670,912 on vit_b and 637,026,048 on vit_h at 1024 px. Nothing is inserted, so the model is SAM at step 0,
and "merging" is a no-op. `--grad-checkpoint` recomputes each block in backward as for every method.

With a placement (`blocks=last:K`, ...) only the selected blocks train; the parts outside the blocks
(patch and position embeddings, neck) train only with `blocks=all`.
"""
from __future__ import annotations

from samfit.methods.base import Method, placement_config, register_method


@register_method
class Full(Method):
    name = "full"
    summary = "train the whole image encoder (neck included): the upper bound"
    Config = placement_config("full")
    identical_at_init = True
    mergeable = True
    unfreezes = ("image_encoder.*",)

    def inject(self, model) -> None:
        if self.places_everywhere():
            model.image_encoder.requires_grad_(True)
            return
        for block in self.selected_blocks(model):
            block.requires_grad_(True)

    def merge(self, model):
        """Nothing to fold: the trained weights are SAM's own."""
        return model
