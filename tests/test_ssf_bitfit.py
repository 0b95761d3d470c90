"""SSF and BitFit (docs/reference.md, Methods): exact counts, what trains, SSF's init and its merge into SAM's weights
(and LoRA's merge, the other mergeable method with a layer of its own)."""
import pytest
import torch

import samfit
from samfit.methods.lora import LoRALinear
from samfit.methods.ssf import ScaleShift, merge_scale_shift

DIMS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU
# Merged and unmerged layers compute the same function with differently rounded weights. In float64 they agree to
# 2**20 eps (≈ 2.3e-10) of the output's scale (measured 1.9e-15 through the whole tiny model), while a scale or
# shift left out of the merge changes the output by ~1e-1 or more (γ ~ N(1, 0.3) here).
RTOL64 = 2**20 * torch.finfo(torch.float64).eps


def _assert_same(actual, expected, rtol=RTOL64):
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * expected.abs().max().item())


def _meta_counts(variant, method):
    with torch.device("meta"):
        return samfit.count_parameters(samfit.get_method(method).apply(samfit.build_model(variant, image_size=256)))


@pytest.mark.parametrize("variant", list(DIMS))
def test_counts(variant):
    d, L = DIMS[variant]
    ssf, bitfit = _meta_counts(variant, "ssf"), _meta_counts(variant, "bitfit")
    assert ssf["encoder_trainable"] == 22 * d * L + 2 * d
    assert bitfit["encoder_trainable"] == 11 * d * L
    assert ssf["decoder_trainable"] == bitfit["decoder_trainable"] == 3_505_536


def test_paper_bitfit_totals():
    assert _meta_counts("vit_h", "bitfit")["trainable"] == 3_956_096
    assert _meta_counts("vit_b", "bitfit")["trainable"] == 3_606_912


def test_bitfit_trains_exactly_the_block_biases():
    model = samfit.get_method("bitfit").apply(samfit.build_model("tiny"))
    trainable = {n for n, p in model.image_encoder.named_parameters() if p.requires_grad}
    layers = ["attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2", "norm1", "norm2"]
    assert trainable == {f"blocks.{i}.{layer}.bias" for i in range(4) for layer in layers}
    assert not any(p.requires_grad for p in model.image_encoder.neck.parameters())
    assert not any(p.requires_grad for p in model.image_encoder.patch_embed.parameters())
    assert not model.prompt_encoder.no_mask_embed.weight.requires_grad


def test_ssf_placement_and_init():
    torch.manual_seed(0)
    model = samfit.get_method("ssf").apply(samfit.build_model("tiny"))
    wrapped = {n for n, m in model.image_encoder.named_modules() if isinstance(m, ScaleShift)}
    layers = ["attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2", "norm1", "norm2"]
    assert wrapped == {"patch_embed"} | {f"blocks.{i}.{layer}" for i in range(4) for layer in layers}
    trainable = [p for p in model.image_encoder.parameters() if p.requires_grad]
    assert all(p.dim() == 1 for p in trainable)
    scales = torch.cat([m.scale.detach() for m in model.modules() if isinstance(m, ScaleShift)])
    shifts = torch.cat([m.shift.detach() for m in model.modules() if isinstance(m, ScaleShift)])
    assert abs(scales.mean() - 1) < 0.003 and abs(scales.std() - 0.02) < 0.003
    assert abs(shifts.mean()) < 0.003 and abs(shifts.std() - 0.02) < 0.003


def test_ssf_merges_into_sam_weights():
    torch.manual_seed(0)
    plain = samfit.build_model("tiny")
    with torch.no_grad():
        for p in plain.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model = samfit.build_model("tiny")
    model.load_state_dict(plain.state_dict())
    method = samfit.get_method("ssf")
    method.apply(model)
    assert method.mergeable
    with torch.no_grad():  # "trained" γ and β far from their init
        for m in model.modules():
            if isinstance(m, ScaleShift):
                m.scale.normal_(1, 0.3)
                m.shift.normal_(0, 0.3)
    model.eval()
    for m in (model, plain):  # float64, but for the prompt encoder's position table (SAM builds it in float32)
        m.double().prompt_encoder.pe_layer.float()
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)["logits"]
        merged = method.merge(model)
        after = merged(x)["logits"]
    assert not any(isinstance(m, ScaleShift) for m in merged.modules())
    assert set(merged.state_dict()) == set(plain.state_dict())  # plain SAM again, official names
    assert all(p.dtype == torch.float64 for p in merged.image_encoder.parameters())
    _assert_same(after, before)
    assert not torch.allclose(after, plain.eval()(x)["logits"], atol=1e-3)


def test_merge_of_a_linear_without_bias():
    torch.manual_seed(0)
    layer = ScaleShift(torch.nn.Linear(8, 4, bias=False), 4).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        _assert_same(layer.merged()(x), layer(x))
    assert merge_scale_shift(torch.nn.Sequential(layer))[0].bias is not None


# float32: the merged weight W + (alpha/r)·B·A and the unmerged path round differently, by a few eps per dot product
# of length <= 64 (measured 3.1e-7 ≈ 2.6 eps of the output's scale); bounded by 2**7 eps ≈ 1.5e-5, far below the
# ~1e-1 of a merge that drops or mis-scales B·A.
@pytest.mark.parametrize("dtype, rtol", [
    (torch.float32, 2**7 * torch.finfo(torch.float32).eps),
    (torch.float64, RTOL64),
], ids=["float32", "float64"])
def test_lora_merged_linear_equals_the_low_rank_wrapper(dtype, rtol):
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 192), rank=3, alpha=32).to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)  # "trained": B starts at zero
    x = torch.randn(2, 8, 8, 64, dtype=dtype)
    with torch.no_grad():
        merged = layer.merged()
        assert isinstance(merged, torch.nn.Linear) and merged.weight.dtype == dtype
        expected = layer(x)
        _assert_same(merged(x), expected, rtol)
        assert not torch.allclose(expected, layer.base(x), atol=1e-2)  # the low-rank update matters


def test_ssf_forward_at_256():
    model = samfit.get_method("ssf").apply(samfit.build_model("tiny", image_size=256)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256))["logits"].shape == (1, 1, 256, 256)
