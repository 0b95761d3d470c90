"""--attention sdpa equals SAM's own attention (outputs and gradients), with and without methods on qkv."""
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

import samfit
from samfit.errors import SamfitError
from samfit.model.attention import SDPAAttention, attention_kind, sdpa_attention, set_attention


def _randomise(model, seed=0):
    """Random rel-pos tables (SAM zero-initialises them) and random LoRA-B / expert weights, so that every
    term of the attention is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.image_encoder.named_parameters():
            if "rel_pos" in name or "lora_B" in name or "router" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _model(method, image_size, seed=0):
    torch.manual_seed(seed)
    return _randomise(samfit.get_method(method).apply(samfit.build_model("tiny", image_size=image_size)), seed)


def _forward_backward(model, images, seed=0):
    torch.manual_seed(seed)  # the same routing noise for Conv-LoRA in both runs
    images = images.clone().requires_grad_(True)
    out = model(images)
    loss = (out["logits"] ** 2).mean() + out["aux_loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["logits"].detach(), images.grad, grads


@pytest.mark.parametrize("image_size", [128, 96])  # 96: an 6x6 grid in 4x4 windows, so windows are padded
@pytest.mark.parametrize("method", ["decoder-only", "lora", "conv-lora", "bitfit"])
def test_sdpa_matches_reference_outputs_and_gradients(method, image_size):
    model = _model(method, image_size)
    if method == "decoder-only":  # gradients through every encoder parameter, rel-pos tables included
        model.image_encoder.requires_grad_(True)
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    results = {}
    for kind in ("reference", "sdpa"):
        set_attention(model, kind)
        assert attention_kind(model) == kind
        model.zero_grad(set_to_none=True)
        results[kind] = _forward_backward(model, images)
    (ref_out, ref_gin, ref_grads), (out, gin, grads) = results["reference"], results["sdpa"]
    assert ref_out.abs().max() > 0
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-4)
    torch.testing.assert_close(gin, ref_gin, rtol=0, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and grads
    if method == "decoder-only":
        assert any("rel_pos" in n for n in grads)
    for name in grads:
        scale = max(1.0, ref_grads[name].abs().max().item())
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("window", [True, False])
def test_sdpa_attention_on_one_block(window):
    """Windowed blocks see (B·windows, 4, 4, d) grids, global blocks the whole (B, 8, 8, d) grid."""
    model = _model("decoder-only", 128)
    block = model.image_encoder.blocks[0 if window else 1]
    assert (block.window_size > 0) == window
    attn = block.attn
    attn.requires_grad_(True)
    x = torch.randn(8 if window else 2, 4 if window else 8, 4 if window else 8, 64, requires_grad=True)
    ref = Attention.forward(attn, x)
    (ref_gx,) = torch.autograd.grad(ref.sum(), x)
    out = sdpa_attention(attn, x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-4)


def test_set_attention_switches_in_place_and_keeps_names():
    model = _model("lora", 128)
    keys = list(model.state_dict())
    attn = model.image_encoder.blocks[0].attn
    set_attention(model, "sdpa")
    assert model.image_encoder.blocks[0].attn is attn and isinstance(attn, SDPAAttention)
    assert list(model.state_dict()) == keys
    set_attention(model, "reference")
    assert type(attn) is Attention
    with pytest.raises(SamfitError, match="sdpa, reference"):
        set_attention(model, "flash")


@pytest.mark.parametrize("method", ["vpt", "adapter", "lst"])
def test_methods_that_wrap_attention_or_blocks_give_the_same_output(method):
    model = _model(method, 96)
    model.eval()
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(images)["logits"]
        set_attention(model, "sdpa")
        out = model(images)["logits"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_sdpa_under_bf16_autocast_on_cpu():
    model = set_attention(_model("lora", 96), "sdpa")
    images = torch.randn(1, 3, 96, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)["logits"]
    out.float().mean().backward()
    with torch.no_grad():
        ref = set_attention(model, "reference")(images)["logits"]
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


def test_sdpa_avoids_the_upcasting_math_fallback_for_16_bit_cpu_training():
    """On CPU a bias that needs a gradient has no fused kernel, and the math fallback computes 16-bit inputs
    in fp32; there sdpa mode uses the explicit form. fp32 training and 16-bit inference keep sdpa."""
    from torch.profiler import profile

    model = set_attention(_model("lora", 96), "sdpa")
    images = torch.randn(1, 3, 96, 96)

    def ops(precision, grad):
        with profile() as prof, torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(images)
        return {e.key for e in prof.key_averages()}

    assert "aten::scaled_dot_product_attention" not in ops("bf16", grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the explicit form is SAM's own computation
        out = model(images)["logits"]
        ref = set_attention(model, "reference")(images)["logits"]
    assert torch.equal(out, ref)
    set_attention(model, "sdpa")
    assert "aten::scaled_dot_product_attention" in ops("bf16", grad=False)
    assert "aten::scaled_dot_product_attention" in ops("fp32", grad=True)
