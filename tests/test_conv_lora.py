"""Conv-LoRA (docs/reference.md, Methods: Conv-LoRA): counts, identity at init, routing, batched dispatch, balancing loss, overrides."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samfit
from samfit.errors import SamfitError
from samfit.methods.conv_lora import ConvLoRALinear, cv_squared

DIMS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU
# The batched dispatch and its per-sample reference are compared in float64 to 2**20 eps (≈ 2.3e-10) of the
# output's scale: measured ~3e-16 (fp32: ~2e-7), while a wrong expert, gate or resize differs by ~1e-2 or more.
RTOL64 = 2**20 * torch.finfo(torch.float64).eps


def _meta_model(variant, method="conv-lora", **overrides):
    """Shapes only (no memory, no init time): right for counting parameters."""
    with torch.device("meta"):
        return samfit.get_method(method, **overrides).apply(samfit.build_model(variant, image_size=256))


@pytest.mark.parametrize("variant", list(DIMS))
def test_parameter_counts(variant):
    d, L = DIMS[variant]
    counts = samfit.count_parameters(_meta_model(variant))
    assert counts["decoder_trainable"] == 3_505_536
    assert counts["encoder_trainable"] == 12 * d * L + 720 * L
    qkv = _meta_model(variant).image_encoder.blocks[0].attn.qkv
    assert sum(p.numel() for p in qkv.router.parameters()) == 2 * 3 * 8
    assert sum(p.numel() for p in qkv.experts.parameters()) == 8 * (9 * 3 * 3 + 3)


def test_paper_totals_on_vit_h_and_vit_b():
    assert samfit.count_parameters(_meta_model("vit_h"))["trainable"] == 4_020_096
    assert samfit.count_parameters(_meta_model("vit_b"))["trainable"] == 3_624_768


def _pair(seed=0):
    torch.manual_seed(seed)
    base = samfit.build_model("tiny")
    with torch.no_grad():
        for p in base.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    other = samfit.build_model("tiny")
    other.load_state_dict(base.state_dict())
    samfit.get_method("decoder-only").apply(base)
    samfit.get_method("conv-lora").apply(other)
    return base, other


@pytest.mark.parametrize("training", [False, True])
def test_identical_to_decoder_only_at_init(training):
    base, other = _pair()
    base.train(training)
    other.train(training)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():  # exact on any CPU: with B = 0 the same operations run and an exact zero is added
        assert torch.equal(base(x)["logits"], other(x)["logits"])


def test_balancing_loss_trains_the_router():
    torch.manual_seed(0)
    model = samfit.get_method("conv-lora").apply(samfit.build_model("tiny")).train()
    out = model(torch.randn(2, 3, 128, 128))
    assert out["aux_loss"] > 0
    qkvs = [b.attn.qkv for b in model.image_encoder.blocks]
    assert all(q.aux_loss is None for q in qkvs)  # the Segmenter collected and cleared them
    out["aux_loss"].backward()
    for q in qkvs:
        for p in (q.router.w_gate, q.router.w_noise):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_no_balancing_loss_left_in_eval():
    model = samfit.get_method("conv-lora").apply(samfit.build_model("tiny")).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert out["aux_loss"] == 0


def test_routing_is_per_window_in_windowed_blocks_and_per_image_in_global_blocks():
    model = samfit.get_method("conv-lora").apply(samfit.build_model("tiny")).eval()
    seen = {}
    for i, block in enumerate(model.image_encoder.blocks):
        block.attn.qkv.router.register_forward_hook(lambda m, args, out, i=i: seen.update({i: args[0].shape}))
    with torch.no_grad():
        model(torch.randn(2, 3, 128, 128))  # 8x8 tokens, 4x4 windows -> 4 windows per image
    assert seen == {0: (8, 3), 1: (2, 3), 2: (8, 3), 3: (2, 3)}  # tiny's global blocks are 1 and 3


def _layer(dim=16, seed=0, **kw):
    """A ConvLoRALinear with every weight random, so routing and experts all matter."""
    torch.manual_seed(seed)
    layer = ConvLoRALinear(nn.Linear(dim, 3 * dim), **kw)
    with torch.no_grad():
        layer.router.w_gate.normal_(0, 3)
        layer.lora_B.normal_(0, 0.1)
        for expert in layer.experts:
            expert.conv.bias.normal_(0, 0.1)
    return layer


def _routed(layer, x):
    """layer(x) and the (indices, weights) its own router chose in that call (a hook, so no recomputation of
    the routing that rounding could tip the other way)."""
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        y = layer(x)
    finally:
        handle.remove()
    ((indices, weights, _),) = seen
    return y, indices, weights


def _assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=RTOL64 * expected.abs().max().item())


def _reference(layer, x, indices, weights):
    """Slow per-sample Conv-LoRA: each window through its chosen experts, one at a time."""
    outs = []
    for n in range(x.shape[0]):
        z = (x[n:n + 1] @ layer.lora_A.T).permute(0, 3, 1, 2)
        mixed = z.clone()
        for e, w in zip(indices[n].tolist(), weights[n]):
            expert = layer.experts[e]
            h, wd = z.shape[-2:]
            u = F.interpolate(z, scale_factor=expert.scale, mode="bicubic") if expert.scale > 1 else z
            u = F.gelu(expert.conv(u))
            u = F.interpolate(u, size=(h, wd), mode="bicubic") if expert.scale > 1 else u
            mixed = mixed + w * u
        lora = mixed.permute(0, 2, 3, 1) @ layer.lora_B.T
        outs.append(layer.base(x[n:n + 1]) + layer.scaling * lora)
    return torch.cat(outs)


def test_batched_dispatch_equals_per_sample_reference_eval():
    layer = _layer().eval().double()
    x = torch.randn(24, 5, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y, chosen, weights = _routed(layer, x)
        assert chosen.shape == (24, 1) and len(chosen.unique()) >= 3
        assert torch.equal(weights, torch.ones_like(weights))  # top-1 in eval: the chosen expert's gate is 1
        ref = _reference(layer, x, chosen, weights)
    _assert_same(y, ref)


def test_batched_dispatch_equals_per_sample_reference_noisy_top2():
    layer = _layer(top_k=2).train().double()
    x = torch.randn(24, 4, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(7)
        y, indices, weights = _routed(layer, x)
        assert indices.shape == (24, 2) and (indices[:, 0] != indices[:, 1]).all()
        assert torch.allclose(weights.sum(1), torch.ones(24, dtype=weights.dtype))
        ref = _reference(layer, x, indices, weights)
    _assert_same(y, ref)


def test_eval_routing_is_deterministic_and_noise_free():
    layer = _layer().eval()
    with torch.no_grad():
        layer.router.w_noise.normal_(0, 10)  # huge noise if it were (wrongly) used
    x = torch.randn(16, 4, 4, 16)
    pooled = (x @ layer.lora_A.T).mean((1, 2))
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        indices, weights, _ = layer.router(pooled)
    assert torch.equal(indices[:, 0], (pooled @ layer.router.w_gate).argmax(1))
    assert torch.equal(weights, torch.ones_like(weights))
    assert layer.aux_loss is None  # only a training forward leaves a balancing loss
    layer.train()
    with torch.no_grad():
        routes = {tuple(layer.router(pooled)[0][:, 0].tolist()) for _ in range(5)}
    assert len(routes) > 1  # training noise changes the routing


def test_routed_experts_get_gradients_and_unrouted_ones_none():
    layer = _layer().eval()
    x = torch.randn(6, 4, 4, 16)
    with torch.no_grad():
        pooled = (x @ layer.lora_A.T).mean((1, 2))
        routed = set((pooled @ layer.router.w_gate).argmax(1).tolist())
    assert 0 < len(routed) < 8
    layer(x).square().sum().backward()
    for i, expert in enumerate(layer.experts):
        if i in routed:
            assert expert.conv.weight.grad is not None and expert.conv.weight.grad.abs().sum() > 0
        else:
            assert expert.conv.weight.grad is None and expert.conv.bias.grad is None
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_balancing_loss_values():
    layer = _layer(experts=4).eval()  # eval: hard counts, top-1 gates are 1
    x = torch.randn(10, 3, 3, 16)
    layer.train()
    layer(x)
    assert layer.aux_loss.requires_grad and layer.aux_loss > 0
    layer.eval()
    pooled = (x @ layer.lora_A.T).mean((1, 2))
    indices, _, loss = layer.router(pooled)
    counts = torch.bincount(indices[:, 0], minlength=4).float()
    assert torch.allclose(loss, 0.01 * 2 * counts.var() / counts.mean() ** 2)
    assert cv_squared(torch.ones(4)) == 0 and cv_squared(torch.ones(1)) == 0


def test_overrides():
    method = samfit.get_method("conv-lora", experts="4")
    assert method.config.experts == 4 and method.config.scales == (1, 2, 3, 4)
    method = samfit.get_method("conv-lora", scales="1,2,4,8")
    assert method.config.experts == 4 and method.config.scales == (1, 2, 4, 8)
    method = samfit.get_method("conv-lora", experts="4", scales="1 2 4 8", top_k="2", rank="4",
                               alpha="16", balance_weight="0.1")
    assert (method.config.top_k, method.config.rank, method.config.alpha, method.config.balance_weight) == (
        2, 4, 16.0, 0.1)
    model = method.apply(samfit.build_model("tiny"))
    qkv = model.image_encoder.blocks[0].attn.qkv
    assert [e.scale for e in qkv.experts] == [1, 2, 4, 8] and qkv.router.top_k == 2
    assert qkv.scaling == 4.0
    d, L = 64, 4
    assert samfit.count_parameters(model)["encoder_trainable"] == L * (4 * d * 4 + 2 * 4 * 4 + 4 * (9 * 16 + 4))
    model.train()
    out = model(torch.randn(1, 3, 128, 128))
    assert out["logits"].shape == (1, 1, 128, 128) and torch.isfinite(out["aux_loss"])


def test_bad_overrides_error_clearly():
    with pytest.raises(SamfitError, match="Valid keys: rank, alpha, experts, scales, top_k"):
        samfit.get_method("conv-lora", expert="4")
    with pytest.raises(SamfitError, match="4 scales but experts=8"):
        samfit.get_method("conv-lora", experts="8", scales="1,2,4,8")
    with pytest.raises(SamfitError, match="top_k"):
        samfit.get_method("conv-lora", top_k="9")
    with pytest.raises(SamfitError, match="expected a value of type int"):
        samfit.get_method("conv-lora", experts="four")


def test_padded_windows():
    torch.manual_seed(0)
    model = samfit.get_method("conv-lora").apply(samfit.build_model("tiny", image_size=96)).train()
    out = model(torch.randn(2, 3, 96, 96))  # 6x6 tokens: windows of 4 padded to 8x8
    assert out["logits"].shape == (2, 1, 96, 96) and out["aux_loss"] > 0
