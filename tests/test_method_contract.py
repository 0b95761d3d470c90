"""The contract every registered method keeps, parametrized over `samfit.list_methods()`: a method added in
one file under samfit/methods/ is tested here without touching this file. Exact per-method parameter counts
are in test_methods.py, per-method behaviour in the per-method test files."""
import dataclasses
import fnmatch
import math
import os
import re
import subprocess
import sys
import typing

import pytest
import torch

import samfit
from samfit import SamfitError
from samfit.losses import mask_classification_loss, semantic_targets, structure_loss
from samfit.methods.base import NotApplicable, missing_features, show

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU
METHODS = samfit.list_methods()
BASELINE = "decoder-only"  # SAM frozen but for the decoder: what every other method is compared with
BACKBONES = ("tiny", "sam2_tiny")  # the random test configurations of SAM's ViT and SAM 2's Hiera
# (method, backbone) for every method on every backbone it applies to
CASES = [pytest.param(n, b, id=f"{n}-{b}") for b in BACKBONES for n in METHODS
         if not missing_features(type(samfit.get_method(n)), b)]


def method_class(name):
    return type(samfit.get_method(name))


def config_fields(name):
    """(key, kind, default) of every hyperparameter; kind is the field's type, "tuple" for tuple[int, ...]."""
    config = method_class(name).Config
    hints, defaults = typing.get_type_hints(config), config()
    return [(f.name, "tuple" if typing.get_origin(hints[f.name]) is tuple else hints[f.name],
             getattr(defaults, f.name)) for f in dataclasses.fields(config)]


# ------------------------------------------------------------------ hyperparameter validation
BAD = {  # values of a kind (or meant for it) that no field should accept; strings go through --method-arg coercion
    int: [0, -1, 2.5, True, None, "0", "-1", "2.5", "abc"],
    float: [-1.0, math.nan, math.inf, -math.inf, True, None, "-1", "nan", "inf", "abc"],
    bool: ["maybe", 2, None],
    "tuple": [(-1,), (1.5,), (True,), 3, None, "-1", "1,x"],
    str: ["no-such-choice", 3, None],
}
VALID_ANYWAY = {  # (method, key, value as on the command line) that is valid although BAD lists it
    ("lst", "reduction", "0"): "reduction=0 means the side width is side_dim, not d / reduction",
    ("fact", "rank", "0"): "rank=0 means the rank is chosen per backbone within LoRA r=3's budget",
}
NO_BAD_VALUES = object()
GOOD = {}  # (method, key) -> an accepted non-default value, where good_value() cannot derive one


def good_value(name, key, kind, default):
    if (name, key) in GOOD:
        return GOOD[name, key]
    if key == "blocks":  # the placement every method with per-block parts takes (test_placement.py)
        return "last:1"
    if kind is bool:
        return not default
    if kind is int:
        return default + 1
    if kind is float:
        return default / 2 if default else 0.5
    if kind == "tuple":
        return (1, 2)
    pytest.fail(f"{name}: no good value known for {key} of type {kind}; add one to GOOD")


def _bad_cases():
    for name in METHODS:
        for key, kind, _ in config_fields(name):
            if kind not in BAD:
                yield pytest.param(name, key, NO_BAD_VALUES, id=f"{name}-{key}-no-bad-values")
            for value in BAD.get(kind, []):
                yield pytest.param(name, key, value, id=f"{name}-{key}-{value!r}")


@pytest.mark.parametrize("name,key,value", list(_bad_cases()))
def test_bad_hyperparameter_is_a_clear_error(name, key, value):
    if value is NO_BAD_VALUES:
        pytest.fail(f"{name}: no bad values known for the type of {key}; add some to BAD (or, if every value "
                    f"of its type is valid, VALID_ANYWAY entries with the reason)")
    if (name, key, show(value)) in VALID_ANYWAY:
        samfit.get_method(name, **{key: value})  # the allow-list stays honest: the value is accepted
        return
    with pytest.raises(SamfitError) as err:
        samfit.get_method(name, **{key: value})
    message = str(err.value)
    assert f"--method-arg {key}=" in message and f"method '{name}'" in message, message
    assert re.search(r": (must be|expected) .*\w", message), f"no valid range in: {message}"
    assert "\n" not in message, message


@pytest.mark.parametrize("name", METHODS)
def test_defaults_valid_unknown_keys_refused(name):
    method = samfit.get_method(name)
    assert method.config == method_class(name).Config()
    assert samfit.get_method(name, **method.describe()).config == method.config
    assert samfit.get_method(name, **{k: show(v) for k, v in method.describe().items()}).config == method.config
    with pytest.raises(SamfitError, match="Unknown --method-arg no_such_key"):
        samfit.get_method(name, no_such_key="1")


@pytest.mark.parametrize("name,key", [(n, key) for n in METHODS for key, _, _ in config_fields(n)])
def test_good_non_default_value_accepted(name, key):
    (kind, default), = [(k, d) for f, k, d in config_fields(name) if f == key]
    value = good_value(name, key, kind, default)
    assert value != default
    for given in (value, show(value)):  # as a Python value and as typed after --method-arg
        method = samfit.get_method(name, **{key: given})
        assert getattr(method.config, key) == value
        assert samfit.get_method(name, **method.describe()).config == method.config


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s
def test_cli_reports_a_bad_method_arg_without_traceback(tmp_path):
    env = {**os.environ, "SAMFIT_DATA": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-m", "samfit.cli", "run", "--method", "lora", "--method-arg",
                             "rank=0", "--device", "cpu", "--out", str(tmp_path / "runs")],
                            capture_output=True, text=True, env=env, timeout=120)
    message = " ".join(result.stderr.split())  # the console wraps long lines
    assert result.returncode == 2, result.stderr
    assert "--method-arg rank=0 for method 'lora'" in message and "at least 1" in message, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no work was started


# ------------------------------------------------------------------ the model with a method applied
def tiny_sam(seed=0, backbone="tiny", **kwargs):
    """The tiny random SAM (or SAM 2) at 64 px with every parameter non-zero (its relative-position tables start
    at 0)."""
    torch.manual_seed(seed)
    model = samfit.build_model(backbone, image_size=64, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


def build(name, backbone="tiny", **kwargs):
    return samfit.get_method(name).apply(tiny_sam(backbone=backbone, **kwargs))


def batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=dtype)
    return x, (torch.rand(2, 1, 64, 64, generator=g) > 0.5).to(dtype)


def float64(model):
    """model.double() (the segmenter computes SAM's dense position encoding in the model's dtype)."""
    return model.double()


def encoder_side(model):
    """Trainable parameters outside the mask decoder (what count_parameters calls encoder_trainable)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("mask_decoder.")}


@pytest.mark.parametrize("name,backbone", CASES)
def test_trains_only_what_it_declares(name, backbone):
    """SAM's own weights stay frozen except the decoder's (always) and the method's `unfreezes` patterns
    (bitfit: the block biases); every parameter the method inserts trains; no SAM weight is dropped."""
    model = tiny_sam(backbone=backbone)
    sam_names = {id(p): n for n, p in model.named_parameters()}  # by object: wrapping changes the names
    method = samfit.get_method(name)
    method.apply(model)
    baseline = build(BASELINE, backbone)
    decoder = {n for n, p in baseline.named_parameters() if p.requires_grad}
    assert all(n.startswith("mask_decoder.") for n in decoder)
    params = dict(model.named_parameters())
    assert set(sam_names) <= {id(p) for p in params.values()}, "a SAM weight left the model"
    for n, p in params.items():
        original = sam_names.get(id(p))
        if original is None:
            assert p.requires_grad, f"inserted parameter {n} is frozen"
        elif original.startswith("mask_decoder."):
            assert p.requires_grad == (original in decoder), original
        else:
            trainable = p.requires_grad
            declared = any(fnmatch.fnmatchcase(original, pattern) for pattern in method.unfreezes)
            assert trainable == declared, f"SAM's {original}: trainable={trainable}, declared in unfreezes={declared}"
    for pattern in method.unfreezes:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in sam_names.values()), f"{pattern} matches nothing"
    counts, reference = samfit.count_parameters(model), samfit.count_parameters(baseline)
    assert set(counts) == {"total", "trainable", "encoder_trainable", "decoder_trainable"}
    assert counts["decoder_trainable"] == reference["decoder_trainable"]
    assert counts["trainable"] == counts["encoder_trainable"] + counts["decoder_trainable"]
    assert counts["encoder_trainable"] == sum(p.numel() for p in encoder_side(model).values())
    assert (counts["encoder_trainable"] > 0) == (name != BASELINE), counts


@pytest.mark.parametrize("name,backbone", [c for c in CASES if c.values[0] != BASELINE
                                           and method_class(c.values[0]).identical_at_init])
def test_identical_to_decoder_only_at_init_when_declared(name, backbone):
    """Compared in float64 and eval mode (no router noise), so CPU rounding cannot decide."""
    x, _ = batch(torch.float64)
    with torch.no_grad():
        reference = float64(build(BASELINE, backbone)).eval()(x)["logits"]
        logits = float64(build(name, backbone)).eval()(x)["logits"]
    assert logits.dtype == torch.float64
    assert (logits - reference).abs().max() <= 1e-12 * reference.abs().max()


@pytest.mark.parametrize("name,backbone", CASES)
def test_training_steps_change_only_trainable_weights(name, backbone):
    model = build(name, backbone).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    start = {n: p.detach().clone() for n, p in encoder_side(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = structure_loss(out["logits"], y) + out["aux_loss"]
        assert torch.isfinite(loss)
        loss.backward()
        for n, p in model.named_parameters():
            assert p.requires_grad or p.grad is None, f"frozen {n} got a gradient"
            assert p.grad is None or torch.isfinite(p.grad).all(), f"{n}: non-finite gradient"
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} changed"
    changed = [n for n, p in encoder_side(model).items() if not torch.equal(p, start[n])]
    assert bool(changed) == (name != BASELINE), changed


@pytest.mark.parametrize("name,backbone", CASES)
def test_multiclass_head(name, backbone):
    model = build(name, backbone, num_classes=3).train()
    assert samfit.count_parameters(model)["decoder_trainable"] == samfit.count_parameters(
        build(BASELINE, backbone, num_classes=3))["decoder_trainable"]
    x, _ = batch()
    out = model(x)
    assert out["logits"].shape == (2, 3, 64, 64)
    maps = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(2))
    loss = mask_classification_loss(out["class_logits"], out["mask_logits"],
                                     [semantic_targets(m, 3) for m in maps]) + out["aux_loss"]
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(not n.startswith("mask_decoder.") for n in grads) == (name != BASELINE)


@pytest.mark.parametrize("name,backbone", CASES)
def test_bf16_autocast_forward_backward(name, backbone):
    model = build(name, backbone).train()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = structure_loss(out["logits"].float(), y) + out["aux_loss"].float()
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert any(not n.startswith("mask_decoder.") for n in grads) == (name != BASELINE)


@pytest.mark.parametrize("name", [n for n in METHODS if missing_features(type(samfit.get_method(n)), "sam2_tiny")])
def test_no_faithful_form_is_a_clear_error(name):
    """A method whose encoder needs something Hiera lacks refuses SAM 2 and names what is missing."""
    with pytest.raises(NotApplicable, match=rf"Method '{name}' has no faithful form on --model sam2_tiny: it needs"):
        build(name, "sam2_tiny")
