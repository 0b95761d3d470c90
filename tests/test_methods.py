"""Parameter counts of every method on the real SAM sizes (docs/reference.md, Methods and "Beyond the paper's
nine") and a training step at a real width. The registry-wide contract (validation, freezing, identity at init, bf16, multi-class) is in
test_method_contract.py."""
import pytest
import torch

import samfit
from samfit.losses import structure_loss
from samfit.methods import BEYOND, ORDER, PAPER
from samfit.methods.fact import budget_rank
from samfit.model.sam import VARIANTS

DIMS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
DECODER = 3_505_536
SIZE = 256  # input size of the counts (only the position tables, trained by `full` alone, depend on it)


def full_encoder(d, L, size=SIZE):
    """SAM's whole image encoder: patch embedding 769·d, absolute positions g²·d, L blocks of 12·d² + 13·d, the
    relative-position tables (2·(2·14 − 1)·h windowed, 2·(2g − 1)·h global, h = d / heads), neck 256·d + 590,848."""
    (variant,) = [v for v in VARIANTS.values() if (v.embed_dim, v.depth) == (d, L)]
    g, h, G = size // 16, d // variant.heads, len(variant.global_blocks)
    rel = (L - G) * 2 * (2 * variant.window - 1) * h + G * 2 * (2 * g - 1) * h
    return 769 * d + g * g * d + L * (12 * d * d + 13 * d) + rel + 256 * d + 590_848


EXACT = {  # encoder-side counts with no size knob or fixed by the paper
    "decoder-only": lambda d, L: 0,
    "bitfit": lambda d, L: 11 * d * L,
    "lora": lambda d, L: 12 * d * L,
    "conv-lora": lambda d, L: 12 * d * L + 720 * L,
    "ssf": lambda d, L: 22 * d * L + 2 * d,
    "full": full_encoder,
    "ln-tune": lambda d, L: 4 * d * L,
    "adaptformer": lambda d, L: L * (2 * d * 6 + 6 + d),  # width m = 6
    "fact": lambda d, L: 2 * d * budget_rank(d, L) + 4 * budget_rank(d, L) ** 2 * L,
    "dora": lambda d, L: 15 * d * L,
    "ia3": lambda d, L: 6 * d * L,
}
BUDGET = [m for m in ORDER if m not in ("decoder-only", "bitfit", "ssf", "full", "ln-tune", "ia3")]  # a size knob


def test_fact_default_ranks():
    assert [budget_rank(d, L) for d, L in DIMS.values()] == [35, 46, 53]


def test_all_methods_registered_in_order():
    assert len(PAPER) == 9 and len(BEYOND) == 6
    assert samfit.list_methods()[:15] == ORDER == PAPER + BEYOND


@pytest.mark.parametrize("variant", list(DIMS))
@pytest.mark.parametrize("method", ORDER)
def test_parameter_counts(variant, method):
    d, L = DIMS[variant]
    with torch.device("meta"):  # shapes only: counting needs no memory or initialisation
        model = samfit.get_method(method).apply(samfit.build_model(variant, image_size=SIZE))
    counts = samfit.count_parameters(model)
    assert counts["decoder_trainable"] == DECODER
    if method in EXACT:
        assert counts["encoder_trainable"] == EXACT[method](d, L)
    if method in BUDGET:  # budget rule: within ±35% of LoRA r=3's 12·d·L
        assert 0.65 * 12 * d * L <= counts["encoder_trainable"] <= 1.35 * 12 * d * L, counts


def test_full_counts_at_1024_as_docs_reference():
    for variant, expected in (("vit_b", 89_670_912), ("vit_h", 637_026_048)):
        with torch.device("meta"):
            model = samfit.get_method("full").apply(samfit.build_model(variant, image_size=1024))
        assert samfit.count_parameters(model)["encoder_trainable"] == expected == full_encoder(
            *DIMS[variant], size=1024)


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
