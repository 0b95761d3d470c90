"""Prefix cache for late placement: a cached run equals the uncached one exactly, eligibility is read off the model
(which parameters train and where, what the prefix is made of), and bf16/fp16 storage reports its rounding."""
import contextlib
import json

import pytest
import torch

import samfit
from samfit.config import make_config
from samfit.engine.cache import build_cache, cache_plan
from samfit.engine.prefix_cache import EncoderPrefix, prefix_depth
from samfit.engine.train import run
from samfit.errors import SamfitError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
EXACT = dict(batch_size=1, effective_batch=2)  # one image per batch: bitwise on any CPU (tests/test_cache.py)


def _run(tmp_path, data_root, name, **kw):
    settings = dict(method="lora", method_args={"blocks": "last:1"}, dataset="shapes", epochs=2, limit_train=4,
                    limit_eval=2, image_size=64, out=str(tmp_path / "runs"), data_root=str(data_root), device="cpu",
                    name=name, **EXACT)
    settings.update(kw)
    folder = run(make_config(**settings), quiet=True)
    return folder, json.loads((folder / "metrics.json").read_text())


def test_late_lora_with_the_prefix_cache_equals_the_uncached_run(tmp_path, data_root):
    cached_dir, cached = _run(tmp_path, data_root, "cached", cache_embeddings="on")
    plain_dir, plain = _run(tmp_path, data_root, "plain", cache_embeddings="off")
    report = cached["embedding_cache"]
    assert report["enabled"] and report["kind"] == "prefix" and report["blocks_cached"] == 3  # tiny: 4 blocks
    assert report["views"] == 2 and report["dtype"] == "torch.float32" and "precision" not in report
    assert cached["scores"] == plain["scores"] and cached["selection"] == plain["selection"]
    a = torch.load(cached_dir / "checkpoints" / "best.pt", weights_only=True)
    b = torch.load(plain_dir / "checkpoints" / "best.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_is_not_used_when_an_earlier_block_trains(tmp_path, data_root):
    _, m = _run(tmp_path, data_root, "all", method_args={}, epochs=1)
    assert not m["embedding_cache"]["enabled"] and "block 0 trains" in m["embedding_cache"]["reason"]


def _tiny(method="lora", **args):
    return samfit.get_method(method, **args).apply(samfit.build_model("tiny", image_size=64))


def test_eligibility_is_read_off_the_model():
    assert prefix_depth(_tiny(blocks="last:1")) == (3, None)
    assert prefix_depth(_tiny("full", blocks="2,3")) == (2, None)
    assert prefix_depth(_tiny(blocks="1,3")) == (1, None)
    model = _tiny(blocks="last:1")
    model.image_encoder.blocks[1].norm1.requires_grad_(True)  # an earlier block trains: a shorter prefix
    assert prefix_depth(model) == (1, None)
    model.image_encoder.pos_embed.requires_grad_(True)
    assert "pos_embed trains before the first block" in prefix_depth(model)[1]
    model = _tiny(blocks="last:1")
    model.image_encoder.blocks[0].register_forward_hook(lambda m, i, o: o)
    assert "hooks" in prefix_depth(model)[1]
    model = _tiny(blocks="last:1")
    model.image_encoder.blocks[2].mlp.act = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Dropout(0.1))
    assert "random" in prefix_depth(model)[1]
    model = _tiny(blocks="last:1")
    model.image_encoder.blocks[3].mlp.act = torch.nn.Dropout(0.1)  # after the prefix: no matter
    assert prefix_depth(model) == (3, None)
    assert cache_plan(_tiny("decoder-only"), 64)[0].kind == "decoder-only"
    plan, reason = cache_plan(_tiny("lst"), 64)
    assert plan is None and "not SAM's ImageEncoderViT" in reason


@pytest.mark.parametrize("dtype, unit_roundoff", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
def test_narrow_storage_reports_its_rounding(dtype, unit_roundoff):
    """Each stored value is the nearest in the narrow dtype, so its relative error is at most the unit roundoff
    (2^-8 for bf16, 2^-11 for fp16, values in the normal range); batches come back in the computing dtype."""
    torch.manual_seed(0)
    model = _tiny(blocks="last:1")
    plan, _ = cache_plan(model, 64)
    images = torch.randn(3, 3, 64, 64)
    dataset = [(images[i], torch.zeros(1, 64, 64), i) for i in range(3)]
    cache = build_cache(model, dataset, dataset[:2], batch_size=1, eval_batch_size=2, flip=False,
                        device=torch.device("cpu"), autocast=contextlib.nullcontext, plan=plan, store_dtype=dtype)
    prefix = EncoderPrefix(model.image_encoder, 3)
    with torch.no_grad():  # computed as the cache does: training batches of one, the validation batch of two
        exact = [prefix(images[i:i + 1])[0].double() for i in range(3)] + list(prefix(images[:2]).double())
    restore = cache.model.restore  # the stored tensors are kept in h_k's own memory layout
    stored = [restore(cache.train[i:i + 1, 0])[0].double() for i in range(3)] + list(
        restore(cache.val.embeddings).double())
    assert cache.train.dtype == cache.val.embeddings.dtype == dtype
    errors = [(s - e).abs() for s, e in zip(stored, exact)]
    assert all((err <= unit_roundoff * e.abs()).all() for err, e in zip(errors, exact))
    precision = cache.report()["precision"]
    assert precision["max_abs_error"] == max(err.max().item() for err in errors)
    rms = (sum(err.square().sum() for err in errors) / sum(e.square().sum() for e in exact)).sqrt().item()
    assert precision["relative_rms_error"] == pytest.approx(rms, rel=1e-9) and 0 < rms <= unit_roundoff
    assert 0 <= precision["mask_pixels_flipped"] <= 1 and precision["logits_max_abs_change"] >= 0
    embeddings, _, _ = next(cache.batches([0, 1], 1, None))
    assert embeddings.dtype == torch.float32


def test_fp16_storage_that_would_overflow_is_refused():
    model = _tiny(blocks="last:1")
    plan, _ = cache_plan(model, 64)
    images = 1e6 * torch.randn(1, 3, 64, 64)  # the prefix then holds values past fp16's 65504
    dataset = [(images[0], torch.zeros(1, 64, 64), 0)]
    with pytest.raises(SamfitError, match="overflows"):
        build_cache(model, dataset, dataset, batch_size=1, eval_batch_size=1, flip=False,
                    device=torch.device("cpu"), autocast=contextlib.nullcontext, plan=plan, store_dtype=torch.float16)
