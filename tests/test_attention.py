"""--attention sdpa equals SAM's own attention (outputs and gradients), with and without methods on qkv.

Equivalence is tested in float64, where rounding is ~1e-16 and a real difference cannot hide under it; the
bf16 tests check which kernel runs and agreement to bf16's precision."""
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

import samfit
from samfit.errors import SamfitError
from samfit.model import attention
from samfit.model.attention import SDPAAttention, attention_kind, sdpa_attention, set_attention

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU

# Two float64 computations of the same function agree to RTOL64 of the compared tensor's scale. The tiny model's
# forward and backward amplify rounding by up to ~1e4 eps (measured at most 1.7e-12 ≈ 7.7e3 eps: LoRA at 96 px,
# padded windows and sharp random rel-pos logits, AVX2-only kernels; 1e-13 with AVX-512, 4.6e-13 with
# ATEN_CPU_CAPABILITY=default). 2**20 eps ≈ 2.3e-10 leaves > 100x for other CPUs, and is still ~100x below what
# rounding the rel-pos bias alone to float32 leaves (tried: 6e-9 to 8e-7 of the scale), let alone a wrong term.
RTOL64 = 2**20 * torch.finfo(torch.float64).eps
# bf16 keeps 8 significant bits (eps = 2**-7); the bf16 tests bound the RMS error relative to the RMS output by
# 8 eps = 6.3% (measured 1.1-1.8% on the mildly randomised model below; dropping the rel-pos bias gives ~40%).
BF16_RMS = 8 * torch.finfo(torch.bfloat16).eps


def _randomise(model, seed=0, scale=0.5):
    """Random rel-pos tables (SAM zero-initialises them) and random LoRA-B / expert weights (`scale` times a
    standard normal), so that every term of the attention is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "lora_B" in name or "router" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def _model(method, image_size, seed=0, scale=0.5):
    torch.manual_seed(seed)
    model = samfit.get_method(method).apply(samfit.build_model("tiny", image_size=image_size))
    return _randomise(model, seed, scale)


def _float64(model):
    """`model` in float64 (SAM's modules run in float64 on CPU), except the prompt encoder's random-Fourier
    position table: segment_anything 1.0 builds its grid in float32 (PositionEmbeddingRandom.forward), and the
    constant table is promoted to float64 where it is added."""
    model.double()
    model.prompt_encoder.pe_layer.float()
    return model


def _assert_same(actual, expected, scale=None, msg=None):
    """|actual - expected| <= RTOL64 · scale, scale defaulting to expected's largest entry (dtypes must match)."""
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=RTOL64 * scale, msg=msg)


def _rms_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


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
    model = _float64(_model(method, image_size))
    if method == "decoder-only":  # gradients through every encoder parameter, rel-pos tables included
        model.image_encoder.requires_grad_(True)
    images = torch.randn(2, 3, image_size, image_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = {}
    for kind in ("reference", "sdpa"):
        set_attention(model, kind)
        assert attention_kind(model) == kind
        model.zero_grad(set_to_none=True)
        results[kind] = _forward_backward(model, images)
    (ref_out, ref_gin, ref_grads), (out, gin, grads) = results["reference"], results["sdpa"]
    assert ref_out.abs().max() > 0
    _assert_same(out, ref_out)
    _assert_same(gin, ref_gin)
    assert grads.keys() == ref_grads.keys() and grads
    if method == "decoder-only":
        assert any("rel_pos" in n for n in grads)
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for name in grads:
        # each gradient relative to its own largest entry, or to 1e-3 of the model's largest gradient if that is
        # more: the key projections' bias gradients are zero in exact arithmetic (softmax ignores a constant per
        # query), so they hold only rounding residue (~1e-20 here) that no relative bound can follow
        _assert_same(grads[name], ref_grads[name], max(ref_grads[name].abs().max().item(), 1e-3 * largest), name)


@pytest.mark.parametrize("window", [True, False])
def test_sdpa_attention_on_one_block(window, monkeypatch):
    """Windowed blocks see (B·windows, 4, 4, d) grids, global blocks the whole (B, 8, 8, d) grid. The explicit
    form that sdpa mode takes for 16-bit CPU training is checked here too, in float64."""
    model = _float64(_model("decoder-only", 128))
    block = model.image_encoder.blocks[0 if window else 1]
    assert (block.window_size > 0) == window
    attn = block.attn
    attn.requires_grad_(True)
    params = [attn.qkv.weight, attn.qkv.bias, attn.rel_pos_h, attn.rel_pos_w, attn.proj.weight]
    x = torch.randn(8 if window else 2, 4 if window else 8, 4 if window else 8, 64, dtype=torch.float64,
                    requires_grad=True)
    weights = torch.randn(x.shape, dtype=torch.float64)  # a loss whose gradient differs per output entry

    def output_and_grads(forward):
        out = forward(attn, x)
        return out, torch.autograd.grad((out * weights).sum(), [x, *params])

    ref, ref_grads = output_and_grads(Attention.forward)
    fused, fused_grads = output_and_grads(sdpa_attention)
    monkeypatch.setattr(attention, "upcasting_fallback", lambda q, bias_needs_grad: True)
    explicit, explicit_grads = output_and_grads(sdpa_attention)
    for out, grads in ((fused, fused_grads), (explicit, explicit_grads)):
        _assert_same(out, ref)
        for name, g, ref_g in zip(["x", "qkv.weight", "qkv.bias", "rel_pos_h", "rel_pos_w", "proj.weight"], grads,
                                  ref_grads):
            assert ref_g.abs().max() > 0, name
            _assert_same(g, ref_g, msg=name)


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
    model = _float64(_model(method, 96))
    model.eval()
    images = torch.randn(1, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(images)["logits"]
        set_attention(model, "sdpa")
        out = model(images)["logits"]
    assert ref.abs().max() > 0
    _assert_same(out, ref)


def test_sdpa_under_bf16_autocast_on_cpu():
    """bf16 autocast with sdpa trains (finite output and gradients) and agrees with the fp32 reference to bf16's
    precision. The model is randomised mildly (LoRA-B at 0.05): with the sharper 0.5 of the float64 tests bf16's
    rounding alone moves the output by 9-15% RMS, too close to a real error to tell them apart."""
    model = set_attention(_model("lora", 96, scale=0.05), "sdpa")
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)["logits"]
    out.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = set_attention(model, "reference")(images)["logits"]
    assert torch.isfinite(out).all()
    assert _rms_error(out, ref) < BF16_RMS


def test_sdpa_avoids_the_upcasting_math_fallback_for_16_bit_cpu_training():
    """On CPU a bias that needs a gradient has no fused kernel, and the math fallback computes 16-bit inputs
    in fp32; there sdpa mode uses the explicit form. fp32 training and 16-bit inference keep sdpa."""
    from torch.profiler import profile

    model = set_attention(_model("lora", 96, scale=0.05), "sdpa")
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))

    def ops(precision, grad):
        with profile() as prof, torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(images)
        return {e.key for e in prof.key_averages()}

    assert "aten::scaled_dot_product_attention" not in ops("bf16", grad=True)
    # the explicit form computes what SAM's own attention does (to float64 rounding: test_sdpa_attention_on_one_block);
    # in bf16 the two may round differently, so they agree to bf16's precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)["logits"]
        ref = set_attention(model, "reference")(images)["logits"]
    assert out.dtype == ref.dtype and _rms_error(out, ref) < BF16_RMS
    set_attention(model, "sdpa")
    assert "aten::scaled_dot_product_attention" in ops("bf16", grad=False)
    assert "aten::scaled_dot_product_attention" in ops("fp32", grad=True)
