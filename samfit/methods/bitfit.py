"""BitFit (Ben Zaken, Ravfogel, Goldberg, ACL 2022, arXiv 2106.10199) on SAM's image encoder.

Only the bias terms inside the encoder blocks train, from their pretrained values:

    y = W x + b,   b trainable for attn.qkv (3d), attn.proj (d), mlp.lin1 (4d), mlp.lin2 (d), norm1 (d), norm2 (d)

= 11·d per block, 11·d·L in all. The patch embedding, position embedding, relative-position tables and the
neck stay frozen. Nothing is inserted, so the model is SAM at step 0, and "merging" is a no-op: the trained
biases simply are the fine-tuned model's biases.
"""
from __future__ import annotations

from samfit.methods.base import Method, placement_config, register_method


@register_method
class BitFit(Method):
    name = "bitfit"
    requires = frozenset({"fused-qkv", "mlp", "norms"})
    summary = "train every bias inside the encoder blocks"
    Config = placement_config("bitfit")
    identical_at_init = True
    mergeable = True
    unfreezes = ("image_encoder.blocks.*.bias",)  # exactly the six biases of every block, nothing else

    def inject(self, model) -> None:
        for block in self.selected_blocks(model):  # SAM: the six above; Hiera: also a widening block's proj.bias
            for name, p in block.named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)

    def merge(self, model):
        """Nothing to fold: the trained biases are SAM's own modules' biases."""
        return model
