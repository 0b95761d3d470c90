"""Houlsby adapters: placement, exact size, identity at init, and the serial computation inside a block."""
import pytest
import torch
from segment_anything.modeling.image_encoder import window_partition, window_unpartition

import samfit
from samfit.errors import SamfitError
from samfit.methods.adapter import BottleneckAdapter, SerialAdapter

DIMS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU


def _counts(variant, **overrides):
    with torch.device("meta"):  # shapes only: no weight initialisation
        model = samfit.get_method("adapter", **overrides).apply(samfit.build_model(variant, image_size=256))
    return samfit.count_parameters(model)


@pytest.mark.parametrize("variant", list(DIMS))
def test_default_count_is_two_adapters_per_block_within_budget(variant):
    d, L = DIMS[variant]
    m = 3
    enc = _counts(variant)["encoder_trainable"]
    assert enc == L * 2 * (2 * d * m + m + d) == L * (14 * d + 6)
    assert 0.65 <= enc / (12 * d * L) <= 1.35


def test_bottleneck_override_from_a_string_and_validation():
    d, L = DIMS["vit_b"]
    assert _counts("vit_b", bottleneck="4")["encoder_trainable"] == L * 2 * (2 * d * 4 + 4 + d)
    with pytest.raises(SamfitError, match="bottleneck"):
        samfit.get_method("adapter", bottleneck=0)


def test_every_block_wraps_attention_and_mlp():
    model = samfit.get_method("adapter").apply(samfit.build_model("tiny"))
    for block in model.image_encoder.blocks:
        assert isinstance(block.attn, SerialAdapter) and isinstance(block.mlp, SerialAdapter)
        assert block.attn.adapter.down.out_features == 3
    trainable = {n for n, p in model.image_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)


def test_adapter_is_identity_at_init_and_not_after_training_its_up_projection():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(16, 3)
    h = torch.randn(2, 5, 5, 16)
    assert torch.equal(adapter(h), h)  # exact on any CPU: the zero up-projection adds an exact zero
    with torch.no_grad():
        adapter.up.weight.normal_()
    assert not torch.allclose(adapter(h), h)


@pytest.mark.parametrize("block_index", [0, 1])  # tiny: block 0 windowed, block 1 global
def test_block_applies_adapters_serially_before_each_residual(block_index):
    """In float64, to 2**20 eps (≈ 2.3e-10) of the output's scale: measured ~1e-16, while an adapter after the
    residual instead of before it, or a parallel one, differs by ~1e-2 or more."""
    torch.manual_seed(0)
    model = samfit.get_method("adapter").apply(samfit.build_model("tiny")).double()
    block = model.image_encoder.blocks[block_index]
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    attn, mlp = block.attn.sublayer, block.mlp.sublayer
    a1, a2 = block.attn.adapter, block.mlp.adapter

    def adapter(a, h):
        return h + torch.nn.functional.gelu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias

    x = torch.randn(2, 8, 8, 64, dtype=torch.float64)
    with torch.no_grad():
        h = block.norm1(x)
        if block.window_size > 0:
            windows, pad = window_partition(h, block.window_size)
            h = window_unpartition(attn(windows), block.window_size, pad, (8, 8))
        else:
            h = attn(h)
        y = x + adapter(a1, h)
        expected = y + adapter(a2, mlp(block.norm2(y)))
        rtol = 2**20 * torch.finfo(torch.float64).eps
        torch.testing.assert_close(block(x), expected, rtol=0, atol=rtol * expected.abs().max().item())
