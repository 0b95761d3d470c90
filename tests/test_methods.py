"""Parameter counts of the nine methods on the real SAM sizes (docs/reference.md, Methods) and a training step
at a real width. The registry-wide contract (validation, freezing, identity at init, bf16, multi-class) is in
test_method_contract.py."""
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
    d, L = DIMS[variant]
    with torch.device("meta"):  # shapes only: counting needs no memory or initialisation
        model = samfit.get_method(method).apply(samfit.build_model(variant, image_size=256))
    counts = samfit.count_parameters(model)
    assert counts["decoder_trainable"] == DECODER
    if method in EXACT:
        assert counts["encoder_trainable"] == EXACT[method](d, L)
    else:  # budget rule: within ±35% of LoRA r=3's 12·d·L
        assert 0.65 * 12 * d * L <= counts["encoder_trainable"] <= 1.35 * 12 * d * L, counts


@pytest.mark.slow  # ~2 s per method
@pytest.mark.parametrize("method", samfit.list_methods())
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
