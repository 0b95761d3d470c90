"""The segmenter against segment_anything's own Sam, checkpoint loading, resizing and checkpoint errors."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

import samfit
from samfit.model.sam import VARIANTS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU


def official_tiny_sam(image_size=128, seed=0) -> Sam:
    """A SAM in the official format (4 mask tokens, IoU head) with tiny's encoder and random weights."""
    torch.manual_seed(seed)
    v = VARIANTS["tiny"]
    grid = image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=image_size, depth=v.depth, embed_dim=v.embed_dim, num_heads=v.heads,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      global_attn_indexes=v.global_blocks, window_size=v.window, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256),
    )
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(0.02 * torch.randn_like(p))  # rel-pos tables and tokens start at 0 / identical otherwise
    return sam.eval()


@pytest.fixture
def official_checkpoint(tmp_path):
    sam = official_tiny_sam()
    path = tmp_path / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def test_binary_segmenter_equals_sams_own_code_path(official_checkpoint):
    """SAM's own MaskDecoder.forward, cut to one mask token (docs/reference.md, Protocol) by building it with
    num_multimask_outputs=0 and loading token 0 / MLP 0, with no prompts: must equal the Segmenter."""
    sam, path = official_checkpoint
    model = samfit.build_model("tiny", image_size=128, checkpoint=path).eval()
    cut = MaskDecoder(num_multimask_outputs=0, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256)
    state = {k: v for k, v in sam.mask_decoder.state_dict().items() if "iou_prediction_head" not in k
             and not k.startswith(("output_hypernetworks_mlps.1", "output_hypernetworks_mlps.2",
                                   "output_hypernetworks_mlps.3"))}
    state["mask_tokens.weight"] = state["mask_tokens.weight"][:1]
    cut.load_state_dict(state, strict=False)
    # In float64 (but for the prompt encoders' position tables: segment_anything 1.0 builds them on a float32
    # grid, and the constant table is promoted where it is added), to 2**20 eps (≈ 2.3e-10) of the logits'
    # scale: the two code paths round differently by ~1e-15, a wrong token, MLP or prompt embedding by ~1e-2 or more.
    for module in (sam, cut, model):
        module.double()
    for encoder in (sam.prompt_encoder, model.prompt_encoder):
        encoder.pe_layer.float()
    x = torch.randn(1, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        emb = sam.image_encoder(x)
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        masks, _ = cut(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
        expected = F.interpolate(masks, size=(128, 128), mode="bilinear", align_corners=False)
        got = model(x)["logits"]
    assert expected.dtype == torch.float64
    rtol = 2**20 * torch.finfo(torch.float64).eps
    torch.testing.assert_close(got, expected, rtol=0, atol=rtol * expected.abs().max().item())


def test_other_input_size_interpolates_position_tables(official_checkpoint):
    sam, path = official_checkpoint
    model = samfit.build_model("tiny", image_size=256, checkpoint=path)
    assert model.image_encoder.pos_embed.shape == (1, 16, 16, 64)
    expected = F.interpolate(sam.image_encoder.pos_embed.permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(model.image_encoder.pos_embed, expected)
    glob = model.image_encoder.blocks[1].attn.rel_pos_h
    assert glob.shape == (2 * 16 - 1, 32)  # global block: table follows the grid
    torch.testing.assert_close(glob[0], sam.image_encoder.blocks[1].attn.rel_pos_h[0])  # ends are kept
    torch.testing.assert_close(model.image_encoder.blocks[0].attn.rel_pos_h,  # windowed: unchanged
                               sam.image_encoder.blocks[0].attn.rel_pos_h)
    assert model(torch.randn(1, 3, 256, 256))["logits"].shape == (1, 1, 256, 256)


def test_multiclass_head_starts_from_token0_mlp(official_checkpoint):
    sam, path = official_checkpoint
    model = samfit.build_model("tiny", num_classes=3, checkpoint=path)
    assert model.num_queries == 6
    shared = model.mask_decoder.output_hypernetworks_mlps
    assert len(shared) == 1
    torch.testing.assert_close(shared[0].layers[0].weight, sam.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight)
    out = model(torch.randn(2, 3, 128, 128))
    assert out["logits"].shape == (2, 3, 128, 128) and out["class_logits"].shape == (2, 6, 4)


def test_missing_corrupt_wrong_variant_and_wrong_md5_checkpoints(tmp_path, official_checkpoint):
    _, tiny_path = official_checkpoint
    with pytest.raises(samfit.SamfitError, match="Checkpoint not found"):
        samfit.build_model("vit_b", checkpoint=tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(samfit.SamfitError, match="corrupt.pth .*the file is corrupt"):
        samfit.build_model("vit_b", image_size=64, checkpoint=corrupt)
    with pytest.raises(samfit.SamfitError, match="is for SAM tiny, but --model is vit_b"):
        samfit.build_model("vit_b", image_size=64, checkpoint=tiny_path)
    fake = tmp_path / "sam_vit_b_01ec64.pth"
    fake.write_bytes(tiny_path.read_bytes())
    with pytest.raises(samfit.SamfitError, match="MD5 .* official vit_b file has 01ec64d29a2fca3f0661936605ae66f8"):
        samfit.build_model("vit_b", image_size=64, checkpoint=fake)


def test_image_size_must_be_a_multiple_of_16():
    with pytest.raises(samfit.SamfitError, match="not a positive multiple of 16"):
        samfit.build_model("tiny", image_size=100)


def test_segmenter_fuzz_shapes_no_nan():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from samfit.losses import get_loss, mask_classification_loss, semantic_targets

    models = {c: samfit.get_method("lora").apply(samfit.build_model("tiny", num_classes=c, image_size=64))
              for c in (1, 2, 5)}

    @settings(max_examples=12, deadline=None)
    @given(c=st.sampled_from([1, 2, 5]), batch=st.integers(1, 3), fill=st.sampled_from(["empty", "full", "random"]))
    def check(c, batch, fill):
        model = models[c].train()
        x = torch.randn(batch, 3, 64, 64)
        out = model(x)
        assert torch.isfinite(out["logits"]).all()
        if c == 1:
            target = {"empty": torch.zeros, "full": torch.ones}.get(fill, lambda *s: (torch.rand(*s) > 0.5).float())(
                batch, 1, 64, 64)
            losses = [get_loss(n)(out["logits"], target) for n in ("structure", "balanced-bce", "bce", "dice")]
        else:
            maps = {"empty": torch.zeros(batch, 64, 64, dtype=torch.long),
                    "full": torch.full((batch, 64, 64), c - 1, dtype=torch.long)}.get(
                fill, torch.randint(0, c, (batch, 64, 64)))
            losses = [mask_classification_loss(out["class_logits"], out["mask_logits"],
                                               [semantic_targets(m, c) for m in maps])]
        for loss in losses:
            assert torch.isfinite(loss)

    check()


def test_dense_positional_encoding_is_sams_and_follows_the_model_dtype():
    """The segmenter's dense position encoding is SAM's get_dense_pe() bitwise in float32, and a float64 model
    gets it in float64 (SAM's own builds a float32 grid and fails there)."""
    from samfit.model.segmenter import dense_positional_encoding

    model = samfit.build_model("tiny", image_size=64)
    pe = dense_positional_encoding(model.prompt_encoder)
    assert torch.equal(pe, model.prompt_encoder.get_dense_pe())
    model.double()
    pe64 = dense_positional_encoding(model.prompt_encoder)
    assert pe64.dtype == torch.float64
    # float32 rounds sin/cos's argument 2π·(coords @ G): the error is a few eps32 of its largest magnitude
    largest_argument = 2 * math.pi * model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.abs().sum(0).max()
    atol = 16 * torch.finfo(torch.float32).eps * largest_argument.item()
    torch.testing.assert_close(pe64, pe.double(), rtol=0, atol=atol)
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64))["logits"].dtype == torch.float64
