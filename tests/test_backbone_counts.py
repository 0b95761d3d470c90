"""Encoder-side parameter counts of every (method, backbone) pair from formulas in the architecture: SAM 2's
Hiera from its configuration (this file's own copy of the 2.1 configs and of Hiera's widening rule), MedSAM as
SAM ViT-B (whose counts test_methods.py derives); methods with no faithful form on a backbone count n/a."""
import pytest
import torch

import samfit
from samfit.methods.base import missing_features

pytestmark = pytest.mark.usefixtures("one_thread")
HIERA = {  # embed_dim, stages, window_spec[0], window_pos_embed_bkg (configs/sam2.1/sam2.1_hiera_*.yaml)
    "sam2_tiny": (16, (1, 1, 2, 1), 8, 4), "sam2_hiera_t": (96, (1, 2, 7, 2), 8, 7),
    "sam2_hiera_s": (96, (1, 2, 11, 2), 8, 7), "sam2_hiera_b+": (112, (2, 3, 16, 3), 8, 14),
    "sam2_hiera_l": (144, (2, 6, 36, 4), 8, 7),
}
NOT_ON_HIERA = {"fact", "vpt", "sam-adapter", "lst"}


def widths(embed, stages):
    """(input, output) width of every block: the first block of each stage after the first doubles it."""
    out, dim = [], embed
    for s, n in enumerate(stages):
        for j in range(n):
            new = dim * 2 if s > 0 and j == 0 else dim
            out.append((dim, new))
            dim = new
    return out


def hiera_count(method, embed, stages, window, bkg):
    blocks = widths(embed, stages)
    r, m_experts = 3, 8
    per_block = {
        "lora": lambda di, do: r * (di + 3 * do),
        "dora": lambda di, do: r * (di + 3 * do) + 3 * do,
        "conv-lora": lambda di, do: r * (di + 3 * do) + 2 * r * m_experts + m_experts * (9 * r * r + r),
        "ia3": lambda di, do: 2 * do + 4 * do,
        "ssf": lambda di, do: 2 * (3 * do + do + 4 * do + do + di + do),
        "bitfit": lambda di, do: 3 * do + do + 4 * do + do + di + do + (do if di != do else 0),
        "ln-tune": lambda di, do: 2 * (di + do),
        "adapter": lambda di, do: 2 * (2 * do * 3 + 3 + do),
        "adaptformer": lambda di, do: 2 * do * 6 + 6 + do,
        "decoder-only": lambda di, do: 0,
        "full": lambda di, do: (2 * di + di * 3 * do + 3 * do + do * do + do + 2 * do + do * 4 * do + 4 * do
                                + 4 * do * do + do + (di * do + do if di != do else 0)),
    }[method]
    total = sum(per_block(di, do) for di, do in blocks)
    if method == "ssf":
        total += 2 * embed  # the patch embedding's γ, β
    if method == "full":
        stage_widths = [embed * 2 ** s for s in range(4)]
        total += 3 * 7 * 7 * embed + embed + embed * bkg * bkg + embed * window * window  # patch, position tables
        total += sum(w * 256 + 256 for w in stage_widths) + 256  # the FPN's 1×1 convs, no_mem_embed
    return total


def encoder_count(method, model):
    with torch.device("meta"):
        net = samfit.get_method(method).apply(samfit.build_model(model, image_size=256))
    return samfit.count_parameters(net)["encoder_trainable"]


@pytest.mark.parametrize("model", [m if m not in ("sam2_hiera_b+", "sam2_hiera_l") else
                                   pytest.param(m, marks=pytest.mark.slow) for m in HIERA])  # big: ~3-5 s each
def test_hiera_counts_from_formulas(model):
    for method in samfit.list_methods():
        if method in NOT_ON_HIERA:
            assert missing_features(type(samfit.get_method(method)), model), method
            continue
        assert encoder_count(method, model) == hiera_count(method, *HIERA[model]), method


def test_hiera_widths_as_sam2_builds_them():
    model = samfit.build_model("sam2_tiny", image_size=64)
    assert [(b.dim, b.dim_out) for b in model.image_encoder.blocks] == widths(16, (1, 1, 2, 1))


def test_medsam_counts_are_vit_b_counts():
    for method in samfit.list_methods():
        assert encoder_count(method, "medsam_vit_b") == encoder_count(method, "vit_b"), method


def test_sam2_decoder_count_is_sams_plus_its_high_resolution_convs():
    """SAM's cut decoder (3,505,536: test_methods.py) plus the object-score token (256) and the 1×1 convs that
    project the stride-4 (256→32) and stride-8 (256→64) features: the same TwoWayTransformer, upscaling, IoU and
    mask tokens and MLP 0."""
    with torch.device("meta"):
        model = samfit.build_model("sam2_hiera_t", image_size=256)
    expected = 3_505_536 + 256 + (256 * 32 + 32) + (256 * 64 + 64)
    assert samfit.count_parameters(model)["decoder_trainable"] == expected == 3_530_464
