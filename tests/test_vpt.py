"""VPT-deep on SAM (docs/reference.md, Methods: VPT): counts, SAM-equivalence without prompts, an independent full-attention
reference with prompts in every (padded) window, any input size."""
import math

import pytest
import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, window_partition, window_unpartition

import samfit
from samfit.errors import SamfitError
from samfit.methods import vpt
from samfit.methods.vpt import PromptedBlock

DIMS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU
# Blocks and their references are compared in float64 to 2**20 eps (≈ 2.3e-10) of the output's scale: measured
# ~2e-16 to 3e-16 (fp32: ~1.2e-7), while prompts left out of a window, or rel-pos put on the prompt columns,
# differ by ~1e-2 to 1.
RTOL64 = 2**20 * torch.finfo(torch.float64).eps
# bf16 keeps 8 significant bits (eps = 2**-7): its RMS error relative to the RMS fp32 output is bounded by 8 eps =
# 6.3% (measured 1.1-1.3% over three seeds).
BF16_RMS = 8 * torch.finfo(torch.bfloat16).eps


def _assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=RTOL64 * expected.abs().max().item())


@pytest.mark.parametrize("variant", list(DIMS))
def test_parameter_count_is_loras_budget(variant):
    d, L = DIMS[variant]
    with torch.device("meta"):
        model = samfit.get_method("vpt").apply(samfit.build_model(variant, image_size=256))
    counts = samfit.count_parameters(model)
    assert counts["encoder_trainable"] == 12 * d * L and counts["decoder_trainable"] == 3_505_536


def _encoder(size, seed=0):
    """A tiny SAM encoder with non-zero relative-position tables (they start at zero)."""
    torch.manual_seed(seed)
    model = samfit.build_model("tiny", image_size=size)
    with torch.no_grad():
        for block in model.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    return model


def test_prompted_block_without_prompts_equals_sam_block():
    model = _encoder(96).double()  # 6x6 tokens: windows of 4 padded to 8x8
    x = torch.randn(2, 6, 6, 64, dtype=torch.float64)
    with torch.no_grad():
        for block in model.image_encoder.blocks:  # windowed (0, 2) and global (1, 3)
            _assert_same(PromptedBlock(block, 0).double()(x), block(x))


def _full_attention_reference(block, x):
    """Prompts appended to every window as full tokens (queries too), attention over T + p tokens with
    SAM's rel-pos bias on the patch×patch block only, prompt outputs dropped: the VPT spec, literally."""
    attn, p = block.attn, block.prompts.shape[0]
    shortcut, y = x, block.norm1(x)
    hw = y.shape[1:3]
    if block.window_size:
        y, pad_hw = window_partition(y, block.window_size)
    n, h, w, d = y.shape
    heads, c = attn.num_heads, d // attn.num_heads
    tokens = torch.cat([y.reshape(n, h * w, d), block.norm1(block.prompts).expand(n, -1, -1)], dim=1)
    q, k, v = attn.qkv(tokens).reshape(n, h * w + p, 3, heads, c).permute(2, 0, 3, 1, 4).reshape(
        3, n * heads, h * w + p, c).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    patch = logits[:, :h * w, :h * w]
    logits[:, :h * w, :h * w] = add_decomposed_rel_pos(patch, q[:, :h * w], attn.rel_pos_h, attn.rel_pos_w,
                                                       (h, w), (h, w))
    out = (logits.softmax(-1) @ v).reshape(n, heads, h * w + p, c)[:, :, :h * w]
    out = attn.proj(out.permute(0, 2, 1, 3).reshape(n, h, w, d))
    if block.window_size:
        out = window_unpartition(out, block.window_size, pad_hw, hw)
    x = shortcut + out
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("form", ["fused", "explicit"])  # explicit: the form 16-bit CPU training takes
@pytest.mark.parametrize("size", [96, 128])
def test_prompted_block_equals_full_attention_reference(size, form, monkeypatch):
    if form == "explicit":
        monkeypatch.setattr(vpt, "upcasting_fallback", lambda q, bias_needs_grad: True)
    model = _encoder(size)
    samfit.get_method("vpt").apply(model)
    model.double()
    grid = size // 16
    x = torch.randn(2, grid, grid, 64, dtype=torch.float64)
    with torch.no_grad():
        for block in model.image_encoder.blocks:
            _assert_same(block(x), _full_attention_reference(block, x))


def test_prompts_change_attention_and_are_dropped():
    model = _encoder(128)
    samfit.get_method("vpt").apply(model)
    block = model.image_encoder.blocks[0]
    x = torch.randn(1, 8, 8, 64)
    with torch.no_grad():
        with_prompts = block(x)
        assert with_prompts.shape == x.shape  # prompt outputs dropped
        assert not torch.allclose(with_prompts, PromptedBlock(block, 0)(x), atol=1e-3)


def test_init_follows_official_vpt():
    with torch.device("meta"):
        model = samfit.get_method("vpt").apply(samfit.build_model("vit_b", image_size=256))
    assert model.image_encoder.blocks[0].prompts.shape == (12, 768)
    model = samfit.get_method("vpt").apply(samfit.build_model("tiny"))
    bound = math.sqrt(6 / (3 * 16 * 16 + 64))
    prompts = torch.cat([b.prompts.detach() for b in model.image_encoder.blocks])
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.8 * bound
    assert [n for n, p in model.named_parameters() if p.requires_grad and "prompts" in n] == [
        f"image_encoder.blocks.{i}.prompts" for i in range(4)]
    assert "image_encoder.blocks.0.attn.qkv.weight" in model.state_dict()  # SAM's names are kept


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_tiny_forward_at_any_size(size):
    model = samfit.get_method("vpt").apply(_encoder(size)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out["logits"].shape == (1, 1, size, size) and torch.isfinite(out["logits"]).all()


def test_vit_b_blocks_at_256():
    """vit_b at 256 px: 16x16 tokens, so windowed blocks pad to 28x28 (four 14x14 windows)."""
    torch.manual_seed(0)
    model = samfit.get_method("vpt").apply(samfit.build_model("vit_b", image_size=256))
    x = torch.randn(1, 16, 16, 768, dtype=torch.float64)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 256, 256))["logits"].shape == (1, 1, 256, 256)
        for i in (0, 2):  # a windowed and a global block, in float64 (just these two: cheap)
            block = model.image_encoder.blocks[i].double()
            y = block(x)
            assert y.shape == x.shape
            _assert_same(y, _full_attention_reference(block, x))


def test_num_prompts_override():
    model = samfit.get_method("vpt", num_prompts="5").apply(samfit.build_model("tiny"))
    assert samfit.count_parameters(model)["encoder_trainable"] == 5 * 64 * 4
    with pytest.raises(SamfitError, match="Valid keys: num_prompts"):
        samfit.get_method("vpt", prompts="5")
    with pytest.raises(SamfitError, match="at least 1"):
        samfit.get_method("vpt", num_prompts="0")


def test_bf16_training_on_cpu_takes_the_explicit_form_with_the_same_result():
    """PyTorch's CPU math fallback would compute a 16-bit sdpa whose bias needs a gradient in fp32; VPT then
    computes the prompted attention explicitly (as samfit.model.attention does for SAM's own). Only block 0,
    whose input and so whose bias needs no gradient, keeps the fused kernel."""
    from torch.profiler import profile

    model = samfit.get_method("vpt").apply(_encoder(96))
    images = torch.randn(1, 3, 96, 96)
    sdpa = "aten::scaled_dot_product_attention"

    def run(bf16, grad=True):
        with profile() as prof, torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images)["logits"]
        return out, {e.key: e.count for e in prof.key_averages()}.get(sdpa, 0)

    blocks = len(model.image_encoder.blocks)
    out16, sdpa_calls16 = run(True)
    out32, sdpa_calls32 = run(False)
    assert (sdpa_calls16, sdpa_calls32, run(True, grad=False)[1]) == (1, blocks, blocks)
    out16.float().mean().backward()
    assert all(torch.isfinite(b.prompts.grad).all() for b in model.image_encoder.blocks)
    # the explicit form itself is checked in float64 (test_prompted_block_equals_full_attention_reference)
    assert ((out16.float() - out32).norm() / out32.norm()).item() < BF16_RMS
