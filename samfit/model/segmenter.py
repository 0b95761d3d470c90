"""Prompt-free, end-to-end SAM segmenters (docs/reference.md, Protocol).

The prompt encoder is frozen and given no points or boxes: the two-way transformer sees only the output
tokens (IoU token + mask tokens) and the image embedding plus the "no mask" dense embedding.

* Binary head: the decoder is cut to ONE mask token (SAM's token 0) and ONE hypernetwork MLP; the IoU head
  is removed. logits = upsample(MLP(token_out) · upscaled_embedding) to the input size.
* Multi-class head (mask classification, Cheng et al. 2021/2022): Q mask tokens share one hypernetwork MLP
  (initialised from SAM's token-0 MLP); a classification head maps each token's output to C+1 logits (the last
  is "no object"): samfit's a 2-layer MLP, the official code's (`head="official"`) one Linear(256, C+1).
  Semantic scores: `semantic_inference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from samfit.model.sam import PROMPT_DIM


def dense_positional_encoding(prompt_encoder) -> torch.Tensor:
    """SAM's `prompt_encoder.get_dense_pe()` (1, 256, h, w), computed in the dtype of its Gaussian matrix: SAM's
    own builds its grid in float32, which fails once the model is float64. In float32 the same operations."""
    pe = prompt_encoder.pe_layer
    gaussian = pe.positional_encoding_gaussian_matrix
    h, w = prompt_encoder.image_embedding_size
    grid = torch.ones((h, w), device=gaussian.device, dtype=gaussian.dtype)
    coords = torch.stack([(grid.cumsum(dim=1) - 0.5) / w, (grid.cumsum(dim=0) - 0.5) / h], dim=-1)
    return pe._pe_encoding(coords).permute(2, 0, 1).unsqueeze(0)


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-class scores (B, C, H, W) = einsum("bqc,bqhw->bchw", softmax(class_logits)[..., :C], σ(mask_logits)),
    the no-object column dropped (MaskFormer, Cheng et al., NeurIPS 2021). Argmax over C gives the class map.
    """
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())


class Segmenter(nn.Module):
    """SAM as a prompt-free segmenter. `forward(images)` -> {"logits", "aux_loss", ...}."""

    def __init__(self, image_encoder, prompt_encoder, mask_decoder, variant: str, image_size: int,
                 num_classes: int = 1, num_queries: int | None = None, head: str = "samfit"):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.variant = variant
        self.image_size = image_size
        self.num_classes = num_classes
        self.num_queries = mask_decoder.num_mask_tokens
        self.head = head
        if num_classes > 1:
            # one hypernetwork MLP shared by all Q tokens; a class head on every token (C + 1 logits)
            self.mask_decoder.output_hypernetworks_mlps = nn.ModuleList(
                [self.mask_decoder.output_hypernetworks_mlps[0]])
            layers = 1 if head == "official" else 2  # SAM's MLP with one layer is one Linear, no activation
            self.mask_decoder.class_head = MLP(PROMPT_DIM, PROMPT_DIM, num_classes + 1, layers)

    # ------------------------------------------------------------ freezing
    def decoder_trainable_modules(self) -> list[nn.Module]:
        d = self.mask_decoder
        mods = [d.transformer, d.output_upscaling, d.iou_token, d.mask_tokens, d.output_hypernetworks_mlps]
        if self.num_classes > 1:
            mods.append(d.class_head)
        return mods

    def freeze_for_finetuning(self) -> None:
        """Freeze all of SAM, then unfreeze the (cut) mask decoder: the state every method starts from."""
        self.requires_grad_(False)
        for module in self.decoder_trainable_modules():
            module.requires_grad_(True)

    # ------------------------------------------------------------ forward
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def decode(self, embedding: torch.Tensor) -> dict:
        d = self.mask_decoder
        b, _, h, w = embedding.shape
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        pos = dense_positional_encoding(self.prompt_encoder).expand(b, -1, -1, -1)
        tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0).unsqueeze(0).expand(b, -1, -1)
        hs, src = d.transformer(embedding + dense, pos, tokens)
        mask_tokens_out = hs[:, 1:1 + self.num_queries, :]
        upscaled = d.output_upscaling(src.transpose(1, 2).reshape(b, PROMPT_DIM, h, w))
        hyper = d.output_hypernetworks_mlps[0](mask_tokens_out)  # (B, Q, C')
        mask_logits = torch.einsum("bqc,bchw->bqhw", hyper, upscaled)
        size = (self.image_size, self.image_size)
        if self.num_classes == 1:
            return {"logits": F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)}
        class_logits = d.class_head(mask_tokens_out)  # (B, Q, C + 1)
        semantic = semantic_inference(class_logits, mask_logits)
        return {"logits": F.interpolate(semantic, size=size, mode="bilinear", align_corners=False),
                "class_logits": class_logits, "mask_logits": mask_logits}

    def forward(self, images: torch.Tensor) -> dict:
        out = self.decode(self.encode(images))
        out["aux_loss"] = self.collect_aux_loss(images)
        return out

    def collect_aux_loss(self, like: torch.Tensor) -> torch.Tensor:
        """Sum of the auxiliary losses (e.g. MoE load balancing) that method layers left this forward."""
        total = like.new_zeros(())
        for module in self.modules():
            loss = getattr(module, "aux_loss", None)
            if isinstance(loss, torch.Tensor):
                total = total + loss
                module.aux_loss = None
        return total
