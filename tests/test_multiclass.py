"""The mask-classification head (docs/reference.md, Protocol: multi-class tasks) with every method."""
import pytest
import torch

import samfit
from samfit.losses import mask_classification_loss, semantic_targets
from samfit.methods import ORDER

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU


@pytest.mark.parametrize("method", ORDER)
@pytest.mark.parametrize("num_classes", [2, 3, 12])
def test_forward_shapes_with_every_method(method, num_classes):
    model = samfit.get_method(method).apply(samfit.build_model("tiny", num_classes=num_classes, image_size=64))
    out = model(torch.randn(2, 3, 64, 64))
    q = 2 * num_classes
    assert out["logits"].shape == (2, num_classes, 64, 64)
    assert out["class_logits"].shape == (2, q, num_classes + 1)
    assert out["mask_logits"].shape == (2, q, 16, 16)
    assert out["aux_loss"].shape == ()


def test_every_head_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = samfit.get_method("decoder-only").apply(samfit.build_model("tiny", num_classes=3, image_size=64))
    out = model(torch.randn(2, 3, 64, 64))
    maps = torch.randint(0, 3, (2, 64, 64))
    loss = mask_classification_loss(out["class_logits"], out["mask_logits"], [semantic_targets(m, 3) for m in maps])
    loss.backward()
    head = dict(model.mask_decoder.named_parameters())
    for name, p in head.items():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_semantic_logits_are_the_einsum_of_class_probabilities_and_masks():
    """In float64 (but for the prompt encoder's position table, which SAM builds on a float32 grid), to 2**20 eps
    (≈ 2.3e-10) of the scores' scale: the sum written out rounds like the einsum to ~1e-16, while keeping the
    no-object column or a softmax over the wrong axis differs by ~1e-2 or more."""
    model = samfit.build_model("tiny", num_classes=3, image_size=64).eval().double()
    model.prompt_encoder.pe_layer.float()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
        probs = out["class_logits"].softmax(-1)[0, :, :3]  # (Q, C), "no object" dropped
        masks = out["mask_logits"][0].sigmoid()  # (Q, h, w)
        by_hand = torch.zeros(3, *masks.shape[1:], dtype=torch.float64)
        for q in range(masks.shape[0]):
            for c in range(3):
                by_hand[c] += probs[q, c] * masks[q]
        up = torch.nn.functional.interpolate(by_hand[None], size=(64, 64), mode="bilinear", align_corners=False)
    rtol = 2**20 * torch.finfo(torch.float64).eps
    torch.testing.assert_close(out["logits"], up, rtol=0, atol=rtol * up.abs().max().item())


def test_methods_cli_counts_the_multiclass_head():
    import json
    import subprocess
    import sys

    rows = json.loads(subprocess.run([sys.executable, "-m", "samfit", "methods", "--model", "vit_b", "--num-classes",
                                      "12", "--json"], capture_output=True, text=True, check=True).stdout)
    dec = {r["method"]: r["decoder_trainable"] for r in rows}
    # cut decoder 3,505,536 + 23 more mask tokens (256 each) + class MLP 256·256+256 + 256·13+13
    assert dec["lora"] == 3_505_536 + 23 * 256 + (256 * 256 + 256) + (256 * 13 + 13)
