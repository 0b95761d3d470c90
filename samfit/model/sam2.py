"""SAM 2 (Ravi et al. 2024, "SAM 2: Segment Anything in Images and Videos", arXiv 2408.00714) as a prompt-free
segmenter, built from Meta's `sam2` package's own modules (Hiera, FpnNeck, PromptEncoder, MaskDecoder).

The image path of SAM2ImagePredictor, without prompts:

    s4, s8, s16 = FPN(Hiera(x))[:3]                  the stride-32 level dropped (scalp 1)
    e   = s16 + no_mem_embed                          an image seen without memory (directly_add_no_mem_embed)
    hs, src = TwoWay([obj_score_token, iou_token, mask tokens], e + no_mask_embed, dense PE)
    up  = GELU(dc2(GELU(LN(dc1(src) + conv_s1(s8)))) + conv_s0(s4))     the high-resolution features
    logits = upsample(MLP_0(hs_mask) · up) to the input size

No point or box prompt (the sparse embeddings are empty, as SAM2ImagePredictor's with no prompt), the "no mask"
dense embedding, one mask token (token 0; multi-class: Q tokens sharing MLP 0 and a class head, as the SAM
Segmenter). The IoU and object-score heads are removed (not trained, not used); the object-score and IoU tokens
stay, as they are inputs of the two-way transformer. Dynamic multimask selection (by stability) does not apply:
there is one mask token.

Hiera's trunk is held flat in `image_encoder` (patch_embed, pos_embed, pos_embed_window, blocks) beside the
neck, so that methods find `image_encoder.blocks` as on SAM; each block's MLP is segment_anything's MLPBlock
(lin1, GELU, lin2: the same function as sam2's two-layer MLP), so methods find `mlp.lin1`/`mlp.lin2`.
Checkpoint keys map to and from the official layout in samfit/model/sam2_load.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from torch import nn
from torch.overrides import TorchFunctionMode

from samfit.errors import SamfitError
from samfit.model.sam2_configs import HIERA, NECK_DIM, SAM2_IMAGE_SIZE, SIZE_MULTIPLE, stage_widths
from samfit.model.segmenter import Segmenter, dense_positional_encoding, semantic_inference


def _sam2():
    """Meta's sam2 modules, with a clear error when the package is missing."""
    try:
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.backbones.image_encoder import FpnNeck
        from sam2.modeling.position_encoding import PositionEmbeddingSine
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer
    except ImportError as exc:
        raise SamfitError(f"SAM 2 models need Meta's sam2 package ({exc}). Install it with\n"
                          f"  SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0\n"
                          f"(`make install` does this).") from None
    return Hiera, FpnNeck, PositionEmbeddingSine, MaskDecoder, PromptEncoder, TwoWayTransformer


class HieraEncoder(nn.Module):
    """Hiera trunk + FPN neck; forward(images) -> (image embedding s16 + no_mem_embed, s4, s8)."""

    def __init__(self, trunk: nn.Module, neck: nn.Module):
        super().__init__()
        self.patch_embed = trunk.patch_embed
        self.pos_embed = trunk.pos_embed
        self.pos_embed_window = trunk.pos_embed_window
        self.blocks = trunk.blocks
        self.stage_ends = list(trunk.stage_ends)
        self.neck = neck
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, NECK_DIM))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)
        for block in self.blocks:  # sam2's MLP(layers=[Linear, Linear], GELU) as segment_anything's MLPBlock
            mlp = block.mlp
            new = MLPBlock(mlp.layers[0].in_features, mlp.layers[0].out_features, type(mlp.act))
            new.lin1, new.lin2 = mlp.layers
            block.mlp = new

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Hiera._get_pos_embed: the background table resized (bicubic) plus the window table tiled."""
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        window = self.pos_embed_window
        pos = pos + window.tile([x // y for x, y in zip(pos.shape, window.shape)])
        return pos.permute(0, 2, 3, 1)

    def forward(self, images: torch.Tensor):
        x = self.patch_embed(images)
        x = x + self.position_embedding(*x.shape[1:3])
        stages = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                stages.append(x.permute(0, 3, 1, 2))
        features, _ = self.neck(stages)
        s4, s8, s16 = features[:-1]
        return s16 + self.no_mem_embed.reshape(1, -1, 1, 1), s4, s8


class _ScheduleOnCPU(TorchFunctionMode):
    """Hiera reads its drop-path schedule with `linspace(...).item()`, impossible on the meta device: make that
    one tensor on the CPU so that a model can be built on the meta device (for counting)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def check_sam2_size(name: str, image_size: int) -> None:
    if image_size <= 0 or image_size % SIZE_MULTIPLE:
        near = max(SIZE_MULTIPLE, round(image_size / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        raise SamfitError(f"--image-size {image_size} does not fit SAM 2's Hiera ({name}): it must be a positive "
                          f"multiple of {SIZE_MULTIPLE} (its stride-4 grid tiles into 8×8 windows and each stage "
                          f"halves the grid). Use e.g. {near}, 256, 512 or 1024.")


def build_sam2_parts(name: str, image_size: int, num_mask_tokens: int = 1):
    """(image_encoder, prompt_encoder, mask_decoder) of SAM 2.1 `name` with random weights, as
    sam2/configs/sam2.1 builds them; the decoder has `num_mask_tokens` tokens and still its IoU and
    object-score heads (`cut_heads` removes them; with 4 tokens it is SAM 2's complete decoder, for counting)."""
    Hiera, FpnNeck, PositionEmbeddingSine, MaskDecoder, PromptEncoder, TwoWayTransformer = _sam2()
    h = HIERA[name]
    check_sam2_size(name, image_size)
    with _ScheduleOnCPU():
        trunk = Hiera(embed_dim=h.embed_dim, num_heads=h.heads, stages=h.stages, global_att_blocks=h.global_blocks,
                      window_spec=h.window_spec, window_pos_embed_bkg_spatial_size=h.window_pos_embed_bkg)
    neck = FpnNeck(position_encoding=PositionEmbeddingSine(num_pos_feats=NECK_DIM, normalize=True, scale=None,
                                                           temperature=10000),
                   d_model=NECK_DIM, backbone_channel_list=stage_widths(h)[::-1], fpn_top_down_levels=[2, 3],
                   fpn_interp_model="nearest")
    grid = image_size // 16
    prompt = PromptEncoder(embed_dim=NECK_DIM, image_embedding_size=(grid, grid),
                           input_image_size=(image_size, image_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=num_mask_tokens - 1,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=NECK_DIM, mlp_dim=2048, num_heads=8),
                          transformer_dim=NECK_DIM, iou_head_depth=3, iou_head_hidden_dim=256,
                          use_high_res_features=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True,
                          pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True)
    return HieraEncoder(trunk, neck), prompt, decoder


def cut_heads(decoder: nn.Module) -> nn.Module:
    """Remove the IoU and object-score heads (not trained, not used by the prompt-free segmenter)."""
    del decoder.iou_prediction_head, decoder.pred_obj_score_head
    return decoder


def sam2_total_parameters(name: str) -> int:
    """Parameters of SAM 2's image path (Hiera, FPN neck, no_mem_embed, prompt encoder and the complete mask
    decoder with its 4 tokens, IoU and object-score heads) at the configuration's `count_size`: the
    denominator of "% of SAM" for SAM 2. The video modules (memory attention and encoder) are not counted."""
    with torch.device("meta"):
        parts = build_sam2_parts(name, HIERA[name].count_size, 4)
    return sum(p.numel() for m in parts for p in m.parameters())


class SAM2Segmenter(Segmenter):
    """SAM 2 as a prompt-free segmenter: the SAM Segmenter's interface (encode, decode, forward, freezing)."""

    def decoder_trainable_modules(self) -> list[nn.Module]:
        d = self.mask_decoder
        return [*super().decoder_trainable_modules(), d.obj_score_token, d.conv_s0, d.conv_s1]

    def decode(self, features) -> dict:
        """features = encode(images) = (image embedding, s4, s8)."""
        embedding, s4, s8 = features
        d = self.mask_decoder
        b, c, h, w = embedding.shape
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        pos = dense_positional_encoding(self.prompt_encoder).expand(b, -1, -1, -1)
        tokens = torch.cat([d.obj_score_token.weight, d.iou_token.weight, d.mask_tokens.weight], dim=0)
        hs, src = d.transformer(embedding + dense, pos, tokens.unsqueeze(0).expand(b, -1, -1))
        mask_tokens_out = hs[:, 2:2 + self.num_queries, :]
        dc1, ln1, act1, dc2, act2 = d.output_upscaling
        up = act1(ln1(dc1(src.transpose(1, 2).reshape(b, c, h, w)) + d.conv_s1(s8)))
        up = act2(dc2(up) + d.conv_s0(s4))
        mask_logits = torch.einsum("bqc,bchw->bqhw", d.output_hypernetworks_mlps[0](mask_tokens_out), up)
        size = (self.image_size, self.image_size)
        if self.num_classes == 1:
            return {"logits": F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False),
                    "mask_logits": mask_logits}
        class_logits = d.class_head(mask_tokens_out)
        semantic = semantic_inference(class_logits, mask_logits)
        return {"logits": F.interpolate(semantic, size=size, mode="bilinear", align_corners=False),
                "class_logits": class_logits, "mask_logits": mask_logits}


def build_sam2_model(name: str, num_classes: int = 1, image_size: int | None = None, checkpoint=None,
                     num_queries: int | None = None, head: str = "samfit") -> SAM2Segmenter:
    """A prompt-free SAM 2 segmenter; random weights without `checkpoint` (an official-format SAM 2.1 file)."""
    from samfit.model.sam2_load import load_sam2_weights

    image_size = image_size or HIERA[name].fixed_size or SAM2_IMAGE_SIZE
    binary = num_classes == 1
    queries = 1 if binary else (num_queries or 2 * num_classes)
    encoder, prompt, decoder = build_sam2_parts(name, image_size, queries)
    model = SAM2Segmenter(encoder, prompt, cut_heads(decoder), name, image_size, num_classes, head=head)
    if checkpoint is not None:
        load_sam2_weights(model, checkpoint, name, queries, binary, head)
    elif not binary and head == "official":  # as for SAM: every query starts as its token 0
        with torch.no_grad():
            decoder.mask_tokens.weight.copy_(decoder.mask_tokens.weight[0:1].expand(queries, -1))
    model.freeze_for_finetuning()
    return model
