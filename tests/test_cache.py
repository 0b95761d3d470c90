"""Decoder-only embedding cache: same results as the uncached run, eligibility read off the model, bounded."""
import contextlib
import json

import pytest
import torch

import samfit
from samfit.config import make_config
from samfit.engine.cache import build_cache, uncacheable_reason
from samfit.engine.train import flip_batch, flip_choices, run
from samfit.errors import SamfitError
from samfit.model.attention import set_attention
from samfit.model.checkpointing import set_grad_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Whole runs compare cached and uncached training bitwise, with one image per batch: then every image is encoded
# alone in both runs (same operation, same data, same place in memory), so no CPU's rounding can tell them apart.
# With more images per batch an image's embedding may depend on its row in the batch: with MKL's AVX2 kernels
# (as on AMD Zen 3; emulated with MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2) the tiny encoder at 64 px
# gives an image's embedding up to 3.6e-6 apart in row 0 and row 1, and a cached run's weights then differ by ~2e-5
# (a flip not replayed: ~4e-3). Batches of several images are checked in float64 instead
# (test_cached_batches_replay_the_engines_flips).
EXACT = dict(batch_size=1, effective_batch=4)
RTOL64 = 2**20 * torch.finfo(torch.float64).eps


def _run(tmp_path, data_root, name, resume=False, **kw):
    settings = dict(method="decoder-only", dataset="shapes", epochs=2, limit_train=8, limit_eval=3, batch_size=2,
                    effective_batch=4, image_size=64, out=str(tmp_path / "runs"), data_root=str(data_root),
                    device="cpu", name=name)
    settings.update(kw)
    folder = run(make_config(**settings), resume=resume, quiet=True)
    return folder, json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("dataset, model", [("shapes", "tiny"), ("shapes-multiclass", "tiny"),
                                            ("shapes", "sam2_tiny"), ("shapes-multiclass", "sam2_tiny")])
def test_cached_run_equals_uncached_run(tmp_path, data_root, dataset, model):
    """SAM 2 stores its embedding and both high-resolution feature maps per image, each in its own layout."""
    cached_dir, cached = _run(tmp_path, data_root, "cached", dataset=dataset, model=model, cache_embeddings="on",
                              **EXACT)
    plain_dir, plain = _run(tmp_path, data_root, "plain", dataset=dataset, model=model, cache_embeddings="off",
                            **EXACT)
    assert cached["scores"] == plain["scores"]
    assert cached["selection"] == plain["selection"]
    report = cached["embedding_cache"]
    assert report["enabled"] and report["views"] == 2 and report["train_images"] == 8 and report["size_mb"] > 0
    assert plain["embedding_cache"] == {"enabled": False, "reason": "--cache-embeddings off"}
    a = torch.load(cached_dir / "checkpoints" / "best.pt", weights_only=True)
    b = torch.load(plain_dir / "checkpoints" / "best.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    h1 = (cached_dir / "history.csv").read_text().splitlines()
    h2 = (plain_dir / "history.csv").read_text().splitlines()
    strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # noqa: E731  (epoch_time_s differs)
    assert strip(h1) == strip(h2)


def test_auto_caches_decoder_only_and_not_lora(tmp_path, data_root):
    _, dec = _run(tmp_path, data_root, "dec", epochs=1)
    assert dec["embedding_cache"]["enabled"]
    _, lora = _run(tmp_path, data_root, "lora", method="lora", epochs=1)
    assert not lora["embedding_cache"]["enabled"] and "trainable" in lora["embedding_cache"]["reason"]


def test_cache_over_the_limit_falls_back_or_stops(tmp_path, data_root):
    _, m = _run(tmp_path, data_root, "auto", epochs=1, cache_max_mb=0)
    assert not m["embedding_cache"]["enabled"] and "--cache-max-mb 0" in m["embedding_cache"]["reason"]
    with pytest.raises(SamfitError, match="cache-max-mb"):
        _run(tmp_path, data_root, "on", epochs=1, cache_max_mb=0, cache_embeddings="on")


def _tiny(method):
    return samfit.get_method(method).apply(samfit.build_model("tiny", image_size=64))


@pytest.mark.parametrize("method", [m for m in samfit.list_methods() if m != "decoder-only"])
def test_every_encoder_method_is_not_cacheable(method):
    assert uncacheable_reason(_tiny(method)) is not None


def test_eligibility_is_read_off_the_model_not_the_method_name():
    model = _tiny("decoder-only")
    assert uncacheable_reason(set_grad_checkpoint(set_attention(model, "sdpa"), True)) is None
    model.image_encoder.blocks[0].mlp.lin1.requires_grad_(True)  # any trainable encoder part
    assert "trainable" in uncacheable_reason(model)
    model = _tiny("decoder-only")

    class Frozen(torch.nn.Module):  # a frozen wrapper still changes what the encoder computes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    model.image_encoder.blocks[0].mlp = Frozen(model.image_encoder.blocks[0].mlp)
    assert "Frozen" in uncacheable_reason(model)
    model = _tiny("decoder-only")
    model.image_encoder.neck.register_forward_hook(lambda m, i, o: o * 2)
    assert "hooks" in uncacheable_reason(model)


def test_cached_batches_replay_the_engines_flips():
    """Batches of two in another order than they were cached in, flipped per image: in float64 (the encoder alone,
    so SAM's float32 position table plays no part) to 2**20 eps (≈ 2.3e-10) of the embeddings' scale, since an
    image's row in the batch may change its rounding (see EXACT); a wrong image or view differs by ~1."""
    model = _tiny("decoder-only").double()
    images = torch.randn(6, 3, 64, 64, dtype=torch.float64)
    targets = (torch.rand(6, 1, 64, 64) > 0.5).double()
    dataset = [(images[i], targets[i], i) for i in range(6)]
    cache = build_cache(model, dataset, dataset[:2], batch_size=2, eval_batch_size=2, flip=True,
                        device=torch.device("cpu"), autocast=contextlib.nullcontext)
    order = [4, 1, 3, 0, 5, 2]
    flips = lambda i, n: flip_choices(n, 7, 3, i)  # noqa: E731
    for i, (emb, tgt, idx) in enumerate(cache.batches(order, 2, flips)):
        assert idx.tolist() == order[2 * i:2 * i + 2]
        x, y = flip_batch(images[idx], targets[idx], 7, 3, i)
        with torch.no_grad():
            expected = model.encode(x)
        assert emb.dtype == torch.float64
        torch.testing.assert_close(emb, expected, rtol=0, atol=RTOL64 * expected.abs().max().item())
        assert torch.equal(tgt, y)


def test_cached_run_interrupted_mid_epoch_resumes_to_the_same_scores(tmp_path, data_root, monkeypatch):
    import os
    import signal

    from samfit.engine import train
    from samfit.engine.train import Interrupted

    settings = dict(epochs=2, batch_size=1, effective_batch=2)  # one image per batch: exact (see EXACT)
    _, plain = _run(tmp_path, data_root, "plain", cache_embeddings="off", **settings)
    original = train.flip_choices

    def interrupt_in_epoch_two(n, seed, epoch, batch, part=(0, 1)):
        if epoch == 1 and batch == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the engine stops at the next optimiser step and saves
        return original(n, seed, epoch, batch, part)

    monkeypatch.setattr(train, "flip_choices", interrupt_in_epoch_two)
    with pytest.raises(Interrupted):
        _run(tmp_path, data_root, "resumed", cache_embeddings="on", **settings)
    monkeypatch.setattr(train, "flip_choices", original)
    _, resumed = _run(tmp_path, data_root, "resumed", resume=True, cache_embeddings="on", **settings)
    assert resumed["scores"] == plain["scores"]


def test_sam2_features_come_back_with_their_values_and_layouts():
    """SAM 2's decoder reads three maps (s16 embedding and s8 features channels-last, s4 contiguous): each is
    stored in its own memory order in one row per image and restored with the live tensor's strides, so the
    decoder runs the same kernels (a restored NCHW copy of a channels-last map would round differently)."""
    model = samfit.get_method("decoder-only").apply(samfit.build_model("sam2_tiny", image_size=64))
    assert uncacheable_reason(model) is None
    images = torch.randn(3, 3, 64, 64)
    dataset = [(images[i], torch.zeros(1, 64, 64), i) for i in range(3)]
    cache = build_cache(model, dataset, dataset[:1], batch_size=1, eval_batch_size=1, flip=False,
                        device=torch.device("cpu"), autocast=contextlib.nullcontext)
    assert cache.train.shape == (3, 1, 256 * (4 * 4 + 8 * 8 + 16 * 16))  # a row: 256 channels at s16, s8, s4
    stored, _, idx = next(cache.batches([2, 0], 2, None))
    with torch.no_grad():  # each image alone, as the cache encoded it: the same operations, so equal bitwise
        live = tuple(torch.cat(maps) for maps in zip(*(model.encode(images[i:i + 1]) for i in idx)))
    restored = cache.model.restore(stored)
    assert len(restored) == len(live) == 3
    for a, b in zip(restored, live):
        assert a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    assert not live[0].is_contiguous() and live[1].is_contiguous()  # the layouts differ, so the check can fail
