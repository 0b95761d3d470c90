"""Ladder side-tuning: size, SAM at init, no autograd graph through the backbone, the ladder equation."""
import pytest
import torch

import samfit
from samfit.errors import SamfitError
from samfit.methods.lst import LSTEncoder

DIMS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU


def _lst_count(d, L, w):
    return (L + 1) * (d * w + w) + L * (12 * w * w + 13 * w + 1) + 2 * w + 256 * w + 256


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = samfit.build_model("tiny")
    with torch.no_grad():  # non-trivial random SAM (rel-pos tables start at zero)
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model, samfit.get_method("lst", **overrides).apply(model)


@pytest.mark.parametrize("variant", list(DIMS))
def test_default_count_within_budget(variant):
    d, L = DIMS[variant]
    with torch.device("meta"):
        model = samfit.get_method("lst").apply(samfit.build_model(variant, image_size=256))
    enc = samfit.count_parameters(model)["encoder_trainable"]
    assert enc == _lst_count(d, L, 8) == {"vit_b": 92_772, "vit_l": 228_272, "vit_h": 368_440}[variant]
    assert 0.65 <= enc / (12 * d * L) <= 1.35


def test_width_knobs_and_validation():
    with torch.device("meta"):
        model = samfit.get_method("lst", reduction="96").apply(samfit.build_model("vit_b", image_size=256))
    assert model.image_encoder.side_upsample.in_features == 8
    assert samfit.count_parameters(model)["encoder_trainable"] == _lst_count(768, 12, 8)
    with pytest.raises(SamfitError, match="divisible by heads"):
        samfit.get_method("lst", side_dim=10, heads=3).apply(samfit.build_model("tiny"))
    with pytest.raises(SamfitError, match="gate_temperature"):
        samfit.get_method("lst", gate_temperature=0)


def test_encoder_output_equals_sam_at_init_and_gates_are_one_half():
    _, model = _model()
    encoder = model.image_encoder
    assert isinstance(encoder, LSTEncoder)
    torch.testing.assert_close(encoder.gates(), torch.full((4,), 0.5), rtol=0, atol=0)
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():  # exact on any CPU: the backbone's own operations, plus an exact zero (up-projection 0)
        assert torch.equal(encoder(images), encoder.backbone(images))


def test_no_autograd_graph_through_the_backbone():
    _, model = _model()
    model.train()
    encoder = model.image_encoder
    seen = []
    for module in [*encoder.backbone.blocks, encoder.backbone.neck, encoder.backbone.patch_embed]:
        module.register_forward_hook(lambda m, args, out: seen.append(out))
    out = model(torch.randn(2, 3, 128, 128))
    assert len(seen) == 6
    assert all(not t.requires_grad and t.grad_fn is None for t in seen)

    # every leaf the loss reaches is a trainable side/decoder parameter
    leaves, stack, visited = set(), [out["logits"].grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    names = {id(p): n for n, p in model.named_parameters()}
    reached = {names[i] for i in leaves}
    assert not any(n.startswith("image_encoder.backbone.") for n in reached)
    assert {n for n, p in model.image_encoder.named_parameters() if p.requires_grad} == {
        n[len("image_encoder."):] for n in reached if n.startswith("image_encoder.")}

    out["logits"].sum().backward()
    assert all(p.grad is None for p in encoder.backbone.parameters())


def test_backward_keeps_no_backbone_internal_activations():
    """Saved for backward inside the encoder: the L + 1 backbone hidden states feeding the down-projections
    and the narrow side activations, nothing else; LoRA, which backpropagates through SAM, saves far more."""
    def saved_by_encoder(method):
        torch.manual_seed(0)
        model = samfit.get_method(method).apply(samfit.build_model("tiny")).train()
        saved, hidden = [], []
        if method == "lst":
            blocks = model.image_encoder.backbone.blocks
            blocks[0].register_forward_pre_hook(lambda m, args: hidden.append(args[0]))
            for block in blocks:
                block.register_forward_hook(lambda m, args, out: hidden.append(out))

        def pack(t):
            saved.append((t.untyped_storage().data_ptr(), t.numel()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.image_encoder(torch.randn(1, 3, 128, 128))
        return saved, {h.untyped_storage().data_ptr() for h in hidden}

    lst, hidden = saved_by_encoder("lst")
    tokens_by_width = 8 * 8 * 64  # a (1, 8, 8, d) backbone state of the tiny model at 128 px
    large = [ptr for ptr, n in lst if n >= tokens_by_width]
    assert len(hidden) == 4 + 1 and sorted(large) == sorted(hidden)
    lora, _ = saved_by_encoder("lora")
    assert 4 * sum(n for _, n in lst) < sum(n for _, n in lora)


def test_ladder_equation_with_learned_gates():
    """In float64, to 2**20 eps (≈ 2.3e-10) of the embedding's scale: the equation written out rounds like the
    encoder to ~1e-16, while a gate on the wrong branch or a missing side block differs by ~1e-2 or more."""
    _, model = _model()
    model.double()
    encoder = model.image_encoder
    with torch.no_grad():
        encoder.side_gates.normal_(0, 0.3)
        encoder.side_upsample.weight.normal_(0, 0.1)
    hidden = []
    encoder.backbone.blocks[0].register_forward_pre_hook(lambda m, args: hidden.append(args[0]))
    for block in encoder.backbone.blocks:
        block.register_forward_hook(lambda m, args, out: hidden.append(out))
    images = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        result = encoder(images)
        side = encoder.side_first_downsample(hidden[0])
        for i, h in enumerate(hidden[1:]):
            mu = torch.sigmoid(encoder.side_gates[i] / 0.1)
            side = encoder.side_blocks[i](mu * side + (1 - mu) * encoder.side_downsamples[i](h))
        expected = encoder.backbone.neck(hidden[-1].permute(0, 3, 1, 2)) + encoder.side_upsample(
            encoder.side_norm(side)).permute(0, 3, 1, 2)
    assert result.dtype == torch.float64
    rtol = 2**20 * torch.finfo(torch.float64).eps
    torch.testing.assert_close(result, expected, rtol=0, atol=rtol * expected.abs().max().item())


def test_training_changes_only_side_parameters():
    torch.manual_seed(0)
    _, model = _model()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    images, target = torch.randn(2, 3, 128, 128), (torch.rand(2, 1, 128, 128) > 0.5).float()
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images)["logits"], target)
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith("image_encoder.backbone.") for n in changed)
    side = {n for n in before if n.startswith("image_encoder.") and not n.startswith("image_encoder.backbone.")}
    assert side <= changed  # every side parameter moved once the up-projection left zero
    with torch.no_grad():
        encoder = model.image_encoder
        assert not torch.allclose(encoder(images), encoder.backbone(images))
