"""Prefix cache on SAM 2's Hiera: the stored tuple (h_k, the stage outputs before block k-1 its neck reads) taken
through blocks >= k, the neck and the decoder computes what the live encoder computes; whole cached runs equal
uncached ones; eligibility is read off the model as for SAM."""
import json

import pytest
import torch

import samfit
from samfit.config import make_config
from samfit.engine.cache import cache_plan
from samfit.engine.prefix_cache import prefix_depth
from samfit.engine.train import run
from samfit.model.checkpointing import set_grad_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
EXACT = dict(batch_size=1, effective_batch=2)  # one image per batch: bitwise on any CPU (tests/test_cache.py)
RTOL64 = 2**20 * torch.finfo(torch.float64).eps
# sam2_tiny: stages (1, 1, 2, 1), so blocks 0-4 with stage ends 0, 1, 3, 4 (the neck reads all four)
STAGE_ENDS = [0, 1, 3, 4]


def _tiny(method="lora", **args):
    return samfit.get_method(method, **args).apply(samfit.build_model("sam2_tiny", image_size=64))


@pytest.mark.parametrize("blocks, k, stored_ends", [("last:1", 4, [0, 1]), ("last:2", 3, [0, 1]),
                                                    ("last:3", 2, [0]), ("last:4", 1, [])])
def test_stored_prefix_then_the_rest_equals_the_encoder_in_float64(blocks, k, stored_ends):
    """h_k plus the stage outputs before block k-1 (block k-1's own output is h_k), each compared with the live
    forward's intermediate values; then the rest (blocks >= k, neck, no_mem_embed) against model.encode and the
    whole cached forward against model.forward. Every weight random and non-zero (LoRA's B too)."""
    torch.manual_seed(0)
    model = _tiny(blocks=blocks).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plan, reason = cache_plan(model, 64)
    assert reason is None and plan.kind == "prefix" and plan.blocks == k
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    e = model.image_encoder
    outputs = []  # every block's output, recorded by the live forward
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in e.blocks]
    with torch.no_grad():
        live = model.encode(images)
        for h in hooks:
            h.remove()
        prefix = plan.encode(images)
        assert len(prefix) == 1 + len(stored_ends)
        for got, want in zip(prefix, [outputs[k - 1]] + [outputs[i] for i in stored_ends]):
            torch.testing.assert_close(got, want, rtol=RTOL64, atol=RTOL64 * want.abs().max().item())
        stored = plan.model.store(prefix)
        assert stored.shape == (2, sum(t[0].numel() for t in prefix))
        assert plan.item_mb == sum(t[0].numel() for t in prefix) * 4 / 2**20
        rest = plan.model.encode_rest(plan.model.restore(stored))
        assert len(rest) == 3
        for got, want in zip(rest, live):
            assert got.shape == want.shape and got.stride() == want.stride()
            torch.testing.assert_close(got, want, rtol=RTOL64, atol=RTOL64 * want.abs().max().item())
        got, want = plan.model(stored)["logits"], model(images)["logits"]
    torch.testing.assert_close(got, want, rtol=RTOL64, atol=RTOL64 * want.abs().max().item())


def _run(tmp_path, data_root, name, **kw):
    settings = dict(method="lora", dataset="shapes", model="sam2_tiny", epochs=2, limit_train=4, limit_eval=2,
                    image_size=64, out=str(tmp_path / "runs"), data_root=str(data_root), device="cpu", name=name,
                    **EXACT)
    settings.update(kw)
    folder = run(make_config(**settings), quiet=True)
    return folder, json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("blocks, k", [("last:1", 4), ("last:2", 3)])  # k = 3: mid-stage, before stage end 3
def test_late_lora_on_sam2_with_the_prefix_cache_equals_the_uncached_run(tmp_path, data_root, blocks, k):
    """Random sam2_tiny starts its position tables at zero (as Hiera does), so a run cannot tell whether the
    prefix adds them: the float64 test above, on non-zero weights, does."""
    args = {"blocks": blocks}
    cached_dir, cached = _run(tmp_path, data_root, "cached", method_args=args, cache_embeddings="on")
    plain_dir, plain = _run(tmp_path, data_root, "plain", method_args=args, cache_embeddings="off")
    report = cached["embedding_cache"]
    assert report["enabled"] and report["kind"] == "prefix" and report["blocks_cached"] == k
    assert report["views"] == 2 and report["dtype"] == "torch.float32" and report["train_images"] == 4
    assert cached["scores"] == plain["scores"] and cached["selection"] == plain["selection"]
    a = torch.load(cached_dir / "checkpoints" / "best.pt", weights_only=True)
    b = torch.load(plain_dir / "checkpoints" / "best.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # noqa: E731  (epoch_time_s differs)
    h1 = (cached_dir / "history.csv").read_text().splitlines()
    h2 = (plain_dir / "history.csv").read_text().splitlines()
    assert len(h1) == 3 and strip(h1) == strip(h2)


def test_eligibility_on_hiera_is_read_off_the_model():
    assert prefix_depth(_tiny(blocks="last:1")) == (4, None)
    assert prefix_depth(set_grad_checkpoint(_tiny(blocks="last:1"), True)) == (4, None)  # the same function
    assert prefix_depth(_tiny("full", blocks="2,3,4")) == (2, None)
    model = _tiny(blocks="last:1")
    model.image_encoder.no_mem_embed.requires_grad_(True)  # added after the neck: the prefix stays
    model.image_encoder.neck.requires_grad_(True)
    assert prefix_depth(model) == (4, None)
    model.image_encoder.blocks[0].norm1.requires_grad_(True)
    assert prefix_depth(model) == (None, "block 0 trains")
    assert "block 0 trains" in cache_plan(model, 64)[1]
    assert prefix_depth(_tiny()) == (None, "block 0 trains")  # LoRA on every block
    model = _tiny(blocks="last:1")
    model.image_encoder.pos_embed_window.requires_grad_(True)
    assert "pos_embed_window trains before the first block" in prefix_depth(model)[1]
    model = _tiny(blocks="last:1")
    model.image_encoder.blocks[2].register_forward_pre_hook(lambda m, i: None)
    assert prefix_depth(model) == (None, "image_encoder.blocks.2 has forward hooks")
    model = _tiny(blocks="last:1")
    model.image_encoder.blocks[1].mlp.act = torch.nn.Dropout(0.1)
    assert "random" in prefix_depth(model)[1]
    model = _tiny(blocks="last:1")
    model.image_encoder.blocks[4].mlp.act = torch.nn.Dropout(0.1)  # after the prefix: no matter
    assert prefix_depth(model) == (4, None)
    model = _tiny(blocks="last:1")
    model.image_encoder.forward = lambda images: model.image_encoder.neck(images)
    assert prefix_depth(model) == (None, "image_encoder has a patched forward")
