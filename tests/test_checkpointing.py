"""--grad-checkpoint gives the plain model's gradients for every method; bf16 autocast trains on CPU."""
import pytest
import torch
import torch.nn.functional as F

import samfit
from samfit.engine.train import autocast_for
from samfit.model.attention import set_attention
from samfit.model.checkpointing import is_checkpointed, set_grad_checkpoint

METHODS = samfit.list_methods()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: steadier and faster on a shared CPU

# The recomputation runs the same kernels on the same inputs, so the gradients agree exactly in practice (and did
# in fp32 and float64 on every CPU mode tried); the comparison is in float64 to 2**20 eps of each tensor's scale
# (≈ 2.3e-10) so that no CPU's rounding can decide it, while a wrong RNG replay (Conv-LoRA's routing noise), a
# doubly counted auxiliary loss or a missing gradient path differs by far more (~1e-3 to 1).
RTOL64 = 2**20 * torch.finfo(torch.float64).eps


def _model(method, seed=0):
    torch.manual_seed(seed)
    model = samfit.get_method(method).apply(samfit.build_model("tiny", image_size=96))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make zero-initialised parts non-zero so every path carries gradient
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("mask_decoder.") and p.abs().max() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _float64(model):
    """`model` in float64, except the prompt encoder's position table, which segment_anything 1.0 computes from
    a float32 grid (PositionEmbeddingRandom.forward); the constant table is promoted where it is added."""
    model.double()
    model.prompt_encoder.pe_layer.float()
    return model


def _assert_same(actual, expected, scale, msg=None):
    torch.testing.assert_close(actual, expected, rtol=0, atol=RTOL64 * scale, msg=msg)


def _step(model, images, targets, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same routing noise (Conv-LoRA) with and without checkpointing
    out = model(images)
    loss = F.binary_cross_entropy_with_logits(out["logits"], targets) + out["aux_loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", METHODS)
def test_checkpointing_gives_the_same_gradients(method):
    model = _float64(_model(method))
    model.train()
    images = torch.randn(2, 3, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = (torch.rand(2, 1, 96, 96, generator=torch.Generator().manual_seed(2)) > 0.5).double()
    keys = list(model.state_dict())
    loss, grads = _step(model, images, targets)
    set_grad_checkpoint(model, True)
    blocks = [b for enc in model.modules() if hasattr(enc, "blocks") and hasattr(enc, "patch_embed")
              for b in enc.blocks]
    assert blocks and all(is_checkpointed(b) for b in blocks)
    assert list(model.state_dict()) == keys  # same names: checkpoints load with or without the option
    ck_loss, ck_grads = _step(model, images, targets)
    _assert_same(ck_loss, loss, loss.abs().item())
    assert ck_grads.keys() == grads.keys()
    # each gradient relative to its own largest entry, or to 1e-3 of the model's largest gradient if that is more
    # (some, e.g. the decoder's key biases, are zero in exact arithmetic and hold only rounding residue)
    largest = max(g.abs().max().item() for g in grads.values())
    for name in grads:
        _assert_same(ck_grads[name], grads[name], max(grads[name].abs().max().item(), 1e-3 * largest), name)
    # the recomputation leaves no auxiliary loss behind for the next forward to pick up
    assert all(getattr(m, "aux_loss", None) is None for m in model.modules())
    set_grad_checkpoint(model, False)
    assert not any(is_checkpointed(b) for b in blocks)


def test_checkpointed_blocks_run_plainly_without_gradients():
    model = set_grad_checkpoint(_float64(_model("lora")), True)
    model.eval()
    images = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        out = model(images)["logits"]
        ref = set_grad_checkpoint(model, False)(images)["logits"]
    _assert_same(out, ref, ref.abs().max().item())


@pytest.mark.parametrize("method", METHODS)
def test_bf16_training_step_on_cpu(method):
    autocast, dtype, scaler = autocast_for("bf16", torch.device("cpu"))
    assert dtype == torch.bfloat16 and not scaler
    model = set_grad_checkpoint(set_attention(_model(method), "sdpa"), True)
    model.train()
    images = torch.randn(2, 3, 96, 96)
    targets = (torch.rand(2, 1, 96, 96) > 0.5).float()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    with autocast():
        out = model(images)
        loss = F.binary_cross_entropy_with_logits(out["logits"].float(), targets) + out["aux_loss"].float()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    assert all(p.dtype == torch.float32 for p in params)
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
