"""The methods beyond the paper's nine (docs/reference.md, "Beyond the paper's nine"): each layer against its
equation written out in float64 on the same (non-zero) weights, to 2**20 eps of the output's scale (≈ 2.3e-10;
measured at most a few eps, while a wrong scale, axis, norm or missing term differs by ~1e-3 or more). Counts
are in test_methods.py, the registry-wide contract (freezing, identity at init, merging) in
test_method_contract.py and test_use_merge.py."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samfit
from samfit.methods.adaptformer import ParallelAdapter
from samfit.methods.dora import DoRALinear
from samfit.methods.fact import FACTORS, FacTLinear
from samfit.methods.ia3 import InputScale, KeyValueScale

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL64 = 2**20 * torch.finfo(torch.float64).eps


def randomise(module, seed=0, std=0.3):
    """Every parameter of `module` moved away from its init (zero B, zero cores, unit scales...), float64."""
    g = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def close(actual, expected):
    assert actual.dtype == expected.dtype == torch.float64
    assert (actual - expected).abs().max() <= RTOL64 * expected.abs().max(), (actual - expected).abs().max()


def tokens(dim, seed=1, grid=(3, 5)):
    return torch.randn(2, *grid, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ DoRA
def dora_layer(seed=0):
    torch.manual_seed(seed)
    return randomise(DoRALinear(nn.Linear(16, 48), rank=3, alpha=32.0), seed)


def test_dora_equals_its_equation():
    layer, x = dora_layer(), tokens(16)
    w0, b = layer.base.weight, layer.base.bias
    updated = w0 + (32.0 / 3) * layer.lora_B @ layer.lora_A
    m = w0.norm(dim=1) + layer.magnitude_offset  # m = ‖W0‖ + Δm, ‖·‖ per output feature (row)
    expected = x @ (m[:, None] * updated / updated.norm(dim=1, keepdim=True)).T + b
    with torch.no_grad():
        close(layer(x), expected)
        close(layer.merged()(x), expected)  # merged: the plain Linear computes the same


def test_dora_magnitude_starts_at_the_row_norms_and_the_layer_at_the_base():
    base = nn.Linear(16, 48).double()
    layer = DoRALinear(base, rank=3, alpha=32.0).double()
    x = tokens(16)
    with torch.no_grad():
        assert torch.equal(layer.magnitude(), base.weight.norm(dim=1))
        close(layer(x), base(x))


def test_dora_merged_keeps_dtype_device_and_frozen_state():
    layer = DoRALinear(nn.Linear(8, 24).requires_grad_(False), rank=2, alpha=4.0).to(torch.bfloat16)
    merged = layer.merged()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16 and not merged.weight.requires_grad


def test_dora_gradients_reach_magnitude_and_both_factors():
    layer = dora_layer()
    layer.base.requires_grad_(False)
    layer(tokens(16)).square().sum().backward()
    for p in (layer.magnitude_offset, layer.lora_A, layer.lora_B):
        assert p.grad is not None and p.grad.abs().max() > 0


# ------------------------------------------------------------------ AdaptFormer
def block_of(method, seed=0, **args):
    """The first block of the tiny SAM with `method` applied, every parameter randomised, float64."""
    torch.manual_seed(seed)
    model = samfit.get_method(method, **args).apply(samfit.build_model("tiny", image_size=64))
    return randomise(model, seed).image_encoder.blocks[0], model


def test_adaptformer_block_equals_its_equation():
    block, _ = block_of("adaptformer")
    adapter = block.mlp
    assert isinstance(adapter, ParallelAdapter) and adapter.scale == 0.1
    assert block.window_size == 4
    x = tokens(64, grid=(4, 4))  # one 4x4 window: SAM's window partition is the identity
    with torch.no_grad():
        h = block(x)
        attn = x + block.attn(block.norm1(x))  # SAM's attention half
        ln = block.norm2(attn)
        expected = attn + adapter.mlp(ln) + 0.1 * adapter.up(torch.relu(adapter.down(ln)))
    close(h, expected)


# ------------------------------------------------------------------ FacT
def test_fact_factors_are_shared_and_the_layers_equal_their_equation():
    block, model = block_of("fact", rank=4, scale=0.5)
    factors = getattr(model.image_encoder, FACTORS)
    layers = [m for m in model.image_encoder.modules() if isinstance(m, FacTLinear)]
    assert len(layers) == 2 * len(model.image_encoder.blocks)
    assert all(layer.factors is factors for layer in layers)
    u, v = factors.down.weight, factors.up.weight  # U (r × d), V (d × r)
    x = tokens(64)
    for layer, parts in ((block.attn.qkv, 3), (block.attn.proj, 1)):
        expected = layer.base(x) + 0.5 * torch.cat([x @ (v @ core @ u).T for core in layer.cores], dim=-1)
        assert layer.cores.shape == (parts, 4, 4)
        with torch.no_grad():
            close(layer(x), expected)
            close(layer.merged()(x), expected)


def test_fact_shared_factors_get_gradients_from_every_block():
    torch.manual_seed(0)
    model = samfit.get_method("fact").apply(samfit.build_model("tiny", image_size=64))
    model(torch.randn(1, 3, 64, 64))["logits"].sum().backward()
    factors = getattr(model.image_encoder, FACTORS)
    assert factors.down.weight.grad is None or not factors.down.weight.grad.any()  # zero cores: no path yet
    assert all(layer.cores.grad.abs().max() > 0 for layer in model.image_encoder.modules()
               if isinstance(layer, FacTLinear))


# ------------------------------------------------------------------ IA3
def test_ia3_scales_keys_values_and_the_mlp_hidden_activation():
    block, _ = block_of("ia3")
    qkv, lin2 = block.attn.qkv, block.mlp.lin2
    assert isinstance(qkv, KeyValueScale) and isinstance(lin2, InputScale)
    x = tokens(64)
    with torch.no_grad():
        q, k, v = F.linear(x, qkv.base.weight, qkv.base.bias).chunk(3, dim=-1)
        close(qkv(x), torch.cat([q, qkv.scale_k * k, qkv.scale_v * v], dim=-1))
        hidden = block.mlp.act(block.mlp.lin1(x))
        close(block.mlp(x), F.linear(lin2.scale * hidden, lin2.base.weight, lin2.base.bias))
        close(qkv.merged()(x), qkv(x))
        close(lin2.merged()(hidden), lin2(hidden))
