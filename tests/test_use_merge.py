"""Merging as a method contract, over every registered method: a method whose `mergeable` is true folds its trained
parts into SAM's own weights (`Method.merge`), computing the same function with only SAM's module types left in the
image encoder and SAM's own state-dict keys; any other method refuses with a clear error. A method added in one
file under samfit/methods/ is tested here without touching this file."""
import pytest
import torch
from torch import nn

import samfit
from samfit import SamfitError
from test_placement import tiny_sam

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = samfit.list_methods()
MERGEABLE = [n for n in METHODS if type(samfit.get_method(n)).mergeable]
NOT_MERGEABLE = [n for n in METHODS if n not in MERGEABLE]
# Merged and unmerged models compute the same function with differently rounded weights: in float64 they agree to
# a few eps of the output's scale (measured <= 2e-15 relative on the tiny model); 2**20 eps ≈ 2.3e-10 is far below
# the >= 1e-2 difference a merge that drops or mis-scales a trained part makes (checked below against plain SAM).
RTOL64 = 2**20 * torch.finfo(torch.float64).eps


def float64(model):
    """model.double() (the segmenter computes SAM's dense position encoding in the model's dtype)."""
    return model.double()


def trained(name):
    """The method applied to the tiny SAM, every trainable encoder-side parameter moved far from its init (LoRA's B
    starts at zero, SSF's γ near one: untrained, a merge that forgot them would still pass)."""
    model = samfit.get_method(name).apply(tiny_sam())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("mask_decoder."):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return float64(model).eval()


def sam_module_types(module: nn.Module) -> set[str]:
    """The modules (by qualified class name) that are not segment_anything's or torch.nn's own."""
    return {f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules()
            if not type(m).__module__.startswith(("segment_anything.", "torch.nn."))}


def test_the_registry_has_mergeable_and_other_methods():
    assert {"decoder-only", "bitfit", "ssf", "lora"} <= set(MERGEABLE)
    assert NOT_MERGEABLE  # so the refusal test below runs


@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_equals_unmerged_in_float64_with_only_sam_modules(name):
    model = trained(name)
    plain = float64(tiny_sam()).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)["logits"]
        merged = samfit.get_method(name).merge(model)
        after = merged(x)["logits"]
        sam_output = plain(x)["logits"]
    assert merged is model  # in place
    assert sam_module_types(merged.image_encoder) == set(), "the merged encoder still holds a method's layers"
    assert set(merged.image_encoder.state_dict()) == set(plain.image_encoder.state_dict())  # SAM's own keys
    assert all(p.dtype == torch.float64 for p in merged.parameters())
    assert after.dtype == torch.float64
    scale = before.abs().max().item()
    assert (after - before).abs().max().item() <= RTOL64 * scale
    if any(not n.startswith("mask_decoder.") and p.requires_grad for n, p in
           samfit.get_method(name).apply(tiny_sam()).named_parameters()):
        assert (before - sam_output).abs().max().item() > 1e-2 * scale  # the trained parts matter


@pytest.mark.parametrize("name", NOT_MERGEABLE)
def test_a_method_that_cannot_merge_says_so(name):
    model = samfit.get_method(name).apply(tiny_sam())
    with pytest.raises(SamfitError) as err:
        samfit.get_method(name).merge(model)
    message = str(err.value)
    assert f"'{name}' cannot be merged" in message and "--format adapter" in message


def test_lora_merge_keeps_device_dtype_and_frozen_state():
    from samfit.methods.lora import LoRALinear

    layer = LoRALinear(nn.Linear(8, 24), rank=2, alpha=4).to(torch.bfloat16)
    layer.base.requires_grad_(False)
    merged = layer.merged()
    assert merged.weight.dtype == torch.bfloat16 and merged.weight.device == layer.base.weight.device
    assert not merged.weight.requires_grad
    state = torch.get_rng_state()
    layer.merged()
    assert torch.equal(state, torch.get_rng_state())  # no random init drawn for a layer that is overwritten
