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


def _run(tmp_path, data_root, name, resume=False, **kw):
    settings = dict(method="decoder-only", dataset="shapes", epochs=2, limit_train=8, limit_eval=3, batch_size=2,
                    effective_batch=4, image_size=64, out=str(tmp_path / "runs"), data_root=str(data_root),
                    device="cpu", name=name)
    settings.update(kw)
    folder = run(make_config(**settings), resume=resume, quiet=True)
    return folder, json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("dataset", ["shapes", "shapes-multiclass"])
def test_cached_run_equals_uncached_run(tmp_path, data_root, dataset):
    cached_dir, cached = _run(tmp_path, data_root, "cached", dataset=dataset, cache_embeddings="on")
    plain_dir, plain = _run(tmp_path, data_root, "plain", dataset=dataset, cache_embeddings="off")
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
    model = _tiny("decoder-only")
    images = torch.randn(6, 3, 64, 64)
    targets = (torch.rand(6, 1, 64, 64) > 0.5).float()
    dataset = [(images[i], targets[i], i) for i in range(6)]
    cache = build_cache(model, dataset, dataset[:2], batch_size=2, eval_batch_size=2, flip=True,
                        device=torch.device("cpu"), autocast=contextlib.nullcontext)
    order = [4, 1, 3, 0, 5, 2]
    flips = lambda i, n: flip_choices(n, 7, 3, i)  # noqa: E731
    for i, (emb, tgt, idx) in enumerate(cache.batches(order, 2, flips)):
        assert idx.tolist() == order[2 * i:2 * i + 2]
        x, y = flip_batch(images[idx], targets[idx], 7, 3, i)
        with torch.no_grad():
            assert torch.equal(emb, model.encode(x))
        assert torch.equal(tgt, y)


def test_cached_run_interrupted_mid_epoch_resumes_to_the_same_scores(tmp_path, data_root, monkeypatch):
    import os
    import signal

    from samfit.engine import train
    from samfit.engine.train import Interrupted

    _, plain = _run(tmp_path, data_root, "plain", epochs=2, effective_batch=2, cache_embeddings="off")
    original = train.flip_choices

    def interrupt_in_epoch_two(n, seed, epoch, batch, part=(0, 1)):
        if epoch == 1 and batch == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the engine stops at the next optimiser step and saves
        return original(n, seed, epoch, batch, part)

    monkeypatch.setattr(train, "flip_choices", interrupt_in_epoch_two)
    with pytest.raises(Interrupted):
        _run(tmp_path, data_root, "resumed", epochs=2, effective_batch=2, cache_embeddings="on")
    monkeypatch.setattr(train, "flip_choices", original)
    _, resumed = _run(tmp_path, data_root, "resumed", resume=True, epochs=2, effective_batch=2, cache_embeddings="on")
    assert resumed["scores"] == plain["scores"]
