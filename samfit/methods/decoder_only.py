"""Decoder-only: SAM's image encoder (neck included) and prompt encoder frozen; only the cut mask decoder
trains (as micro-sam and finetune-anything do)."""
from samfit.methods.base import Method, register_method


@register_method
class DecoderOnly(Method):
    name = "decoder-only"
    summary = "train only the mask decoder"
    identical_at_init = True
    mergeable = True
    encoder_side = False

    def merge(self, model):
        """Nothing to fold: the encoder is plain SAM."""
        return model
