"""Contract tests every registered method must pass (docs/reference.md, Methods)."""
import pytest
import torch

import samfit
from samfit.losses import structure_loss
from samfit.methods import ORDER

DIMS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
DECODER = 3_505_536
EXACT = {  # encoder-side counts with no size knob or fixed by the paper
    "decoder-only": lambda d, L: 0,
    "bitfit": lambda d, L: 11 * d * L,
    "lora": lambda d, L: 12 * d * L,
    "conv-lora": lambda d, L: 12 * d * L + 720 * L,
    "ssf": lambda d, L: 22 * d * L + 2 * d,
}


def test_all_nine_methods_registered():
    assert samfit.list_methods()[:9] == ORDER


@pytest.mark.parametrize("variant", list(DIMS))
@pytest.mark.parametrize("method", ORDER)
def test_parameter_counts(variant, method):
    if method not in samfit.list_methods():
        pytest.skip(f"{method} not implemented yet")
    d, L = DIMS[variant]
    with torch.device("meta"):  # shapes only: counting needs no memory or initialisation
        model = samfit.get_method(method).apply(samfit.build_model(variant, image_size=256))
    counts = samfit.count_parameters(model)
    assert counts["decoder_trainable"] == DECODER
    if method in EXACT:
        assert counts["encoder_trainable"] == EXACT[method](d, L)
    else:  # budget rule: within ±35% of LoRA r=3's 12·d·L
        assert 0.65 * 12 * d * L <= counts["encoder_trainable"] <= 1.35 * 12 * d * L, counts


def _pair(method, seed=0, size=128):
    torch.manual_seed(seed)
    base = samfit.build_model("tiny", image_size=size)
    # give the random SAM non-trivial weights everywhere (rel-pos tables start at zero)
    with torch.no_grad():
        for p in base.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    other = samfit.build_model("tiny", image_size=size)
    other.load_state_dict(state)
    samfit.get_method("decoder-only").apply(base)
    samfit.get_method(method).apply(other)
    return base.eval(), other.eval()


@pytest.mark.parametrize("method", ORDER)
def test_identical_to_sam_at_init_when_declared(method):
    if method not in samfit.list_methods():
        pytest.skip(f"{method} not implemented yet")
    if not samfit.get_method(method).identical_at_init:
        pytest.skip(f"{method} does not claim to equal SAM at initialisation")
    base, other = _pair(method)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(base(x)["logits"], other(x)["logits"]) or torch.allclose(
            base(x)["logits"], other(x)["logits"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ORDER)
def test_gradients_and_frozen_weights(method):
    if method not in samfit.list_methods():
        pytest.skip(f"{method} not implemented yet")
    torch.manual_seed(0)
    model = samfit.get_method(method).apply(samfit.build_model("tiny"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = torch.randn(2, 3, 128, 128)
    y = (torch.rand(2, 1, 128, 128) > 0.5).float()
    for step in range(3):
        opt.zero_grad()
        out = model(x)
        loss = structure_loss(out["logits"], y) + out["aux_loss"]
        assert torch.isfinite(loss)
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if not p.requires_grad:
                    assert p.grad is None, f"frozen {n} got a gradient"
                elif not getattr(model, "unrouted_ok", lambda n: False)(n) and ".experts." not in n:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n} got no gradient"
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} changed"


@pytest.mark.parametrize("method", ORDER)
def test_trains_two_steps_on_vit_b_at_256(method):
    torch.manual_seed(0)
    model = samfit.get_method(method).apply(samfit.build_model("vit_b", image_size=256)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(1, 3, 256, 256)
    y = (torch.rand(1, 1, 256, 256) > 0.7).float()
    for _ in range(2):
        opt.zero_grad()
        out = model(x)
        loss = structure_loss(out["logits"], y) + out["aux_loss"]
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
