"""samfit bench: records, ratios to the baseline, round-robin order, memory per subprocess, data throughput, CLI,
and the training step it times being `samfit run`'s own."""
import json
import os
import subprocess
import sys

import pytest
import torch

from samfit.engine import profile
from samfit.engine.bench import Bench, Setting, Shape, add_ratios, data_throughput, round_robin, run_bench
from samfit.report.bench import write_bench

KEYS = {"method", "step_time_s", "train_img_per_s", "eval_img_per_s", "peak_memory_mb", "trainable_params",
        "attention", "precision", "grad_checkpoint", "device"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.slow
def test_bench_writes_records_with_ratios_to_the_baseline(tmp_path, data_root):
    shape = Shape("tiny", 64, 2, "cpu")
    records, meta = run_bench(["lora", "decoder-only"], shape, steps=2, warmup=1, memory=True, log=lambda *_: None)
    data = data_throughput("shapes", 64, 2, num_workers=1, batches=3, device="cpu")
    path = write_bench(tmp_path, records, meta, data)
    text = path.read_text()
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["method"], r["attention"]) for r in records] == [("lora", "sdpa"), ("decoder-only", "sdpa")]
    for r in records:
        assert KEYS <= r.keys()
        assert r["step_time_s"] > 0 and r["train_img_per_s"] > 0 and r["eval_img_per_s"] > 0
        assert r["peak_memory_mb"] > 0 and len(r["step_times_s"]) == 2 and r["device"] == "cpu"
    assert records[0]["step_time_s_vs_baseline"] == 1.0 and records[0]["peak_memory_mb_vs_baseline"] == 1.0
    assert records[1]["trainable_params"] < records[0]["trainable_params"]
    meta = json.loads((tmp_path / "bench_meta.json").read_text())
    assert meta["machine"]["cores"] and meta["peak_memory_kind"] == "cpu_peak_rss_above_baseline"
    assert meta["baseline"] == "lora"
    data = json.loads((tmp_path / "data.json").read_text())
    assert data["img_per_s"] > 0 and data["images"] == 6 and data["persistent_workers"]
    assert "| decoder-only | sdpa | fp32 | off |" in text and "Data loading (shapes" in text
    assert path == tmp_path / "bench.md"


def test_round_robin_rotates_the_starting_configuration():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def timed(self, kind):
            calls.append(self.name)

    round_robin([Fake("a"), Fake("b"), Fake("c")], "train", 4)
    assert calls == list("abc" "bca" "cab" "abc")


def test_ratios_are_to_the_first_record_of_the_baseline():
    records = add_ratios([{"method": "lst", "step_time_s": 3.0, "train_img_per_s": 1.0, "eval_img_per_s": 2.0,
                           "peak_memory_mb": 50.0, "trainable_params": 10},
                          {"method": "lora", "step_time_s": 2.0, "train_img_per_s": 2.0, "eval_img_per_s": 4.0,
                           "peak_memory_mb": 100.0, "trainable_params": 20}])
    assert records[0]["step_time_s_vs_baseline"] == 1.5 and records[0]["peak_memory_mb_vs_baseline"] == 0.5
    assert records[0]["eval_img_per_s_vs_baseline"] == 0.5 and records[0]["trainable_params_vs_baseline"] == 0.5
    records = add_ratios(records, baseline="lst")
    assert records[1]["step_time_s_vs_baseline"] == 2.0 / 3.0 and records[0]["step_time_s_vs_baseline"] == 1.0
    assert add_ratios(records, baseline="ssf")[0]["step_time_s_vs_baseline"] is None


def test_peak_memory_counts_the_work_after_the_reset_not_before():
    device = torch.device("cpu")
    ballast = torch.ones(64 * 2**20 // 4)  # 64 MB touched before the reset
    del ballast
    profile.reset_peak_memory(device)
    assert profile.peak_memory_mb(device) < 32
    block = torch.ones(48 * 2**20 // 4)  # 48 MB after it
    assert profile.peak_memory_mb(device) >= 40
    del block


def _bench_cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "samfit", "bench", "--model", "tiny", "--image-size", "64",
                           "--batch", "1", "--steps", "1", "--warmup", "0", "--no-memory", "--device", "cpu",
                           "--out", str(tmp_path), *args],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("args, message", [
    (["--methods", "lora", "--attention", "flash"], "--attention 'flash': give one or more of sdpa, reference"),
    (["--methods", "lorra"], "Did you mean 'lora'"),
    (["--methods", "none"], "Nothing to measure"),
    (["--methods", "lora", "--precision", "fp8"], "--precision 'fp8'"),
    (["--methods", "lora", "--effective-batch", "3", "--batch", "2"], "multiple of --batch-size"),
    (["--methods", "lora", "--image-size", "70"], "multiple of 16"),
])
def test_bad_options_are_user_errors(cli, tmp_path, args, message):
    code, _, text = cli("bench", "--model", "tiny", "--image-size", "64", "--batch", "1", "--steps", "1", "--no-memory",
                        "--device", "cpu", "--out", tmp_path, *args)
    assert code == 2 and message in text, text


def test_bench_times_the_training_step_of_samfit_run():
    """A bench step and a run's step (train.build_model_for + train.make_train_step, what `samfit run` builds)
    on the same batch give the same loss and gradients, with accumulation, the multi-class loss, Conv-LoRA's
    auxiliary loss and clipping in play: bench measures the run's computation, not a copy of it."""
    from samfit.config import RunConfig
    from samfit.engine.train import build_model_for, make_train_step

    shape = Shape("tiny", 64, 2, "cpu", effective_batch=4, num_classes=3)
    bench = Bench(Setting("conv-lora"), shape, seed=0)
    cfg = RunConfig(method="conv-lora", model="tiny", image_size=64, batch_size=2, effective_batch=4, lr=1e-5,
                    epochs=1, loss="structure", device="cpu")
    torch.manual_seed(0)
    model = build_model_for(cfg, 3, torch.device("cpu"))
    step = make_train_step(cfg, model, "multiclass", 3, total_steps=10**9, device=torch.device("cpu"))
    assert type(step) is type(bench.step) and step.accum == bench.step.accum == 2
    losses = {}
    for name, (net, train_step) in {"bench": (bench.model, bench.step), "run": (model, step)}.items():
        net.train()
        torch.manual_seed(1)  # the same routing noise in both
        loss, stepped = train_step(bench.images, bench.targets, 0)  # the first micro-batch: no optimiser step yet
        assert not stepped and torch.isfinite(loss)
        losses[name] = (loss, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    (bench_loss, bench_grads), (run_loss, run_grads) = losses["bench"], losses["run"]
    assert torch.equal(bench_loss, run_loss)  # one process, the same ops on the same inputs: bitwise equal
    assert bench_grads.keys() == run_grads.keys() and any("lora" in n for n in run_grads)
    assert all(torch.equal(bench_grads[n], run_grads[n]) for n in run_grads)
    loss, stepped = bench.step(bench.images, bench.targets, 1)
    assert stepped and all(p.grad is None for p in bench.model.parameters())  # stepped, then zeroed


@pytest.mark.slow
def test_bench_cli(tmp_path):
    proc = _bench_cli(tmp_path, "--methods", "conv-lora,lora", "--attention", "sdpa,reference", "--grad-checkpoint")
    assert proc.returncode == 0, proc.stderr
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["method"], r["attention"], r["grad_checkpoint"]) for r in records] == [
        (m, a, True) for m in ("conv-lora", "lora") for a in ("sdpa", "reference")]
    assert all(r["peak_memory_mb"] is None for r in records)
    assert records[2]["step_time_s_vs_baseline"] == 1.0  # LoRA with the first listed settings is the baseline
    assert "| conv-lora | reference | fp32 | on |" in proc.stdout


def test_conv_lora_hot_path_has_no_per_sample_loop_and_one_host_read_per_layer(monkeypatch):
    """Conv-LoRA's dispatch runs each expert once on all grids routed to it (the number of convolutions does
    not grow with the batch) and reads one small tensor back to the host per layer (the per-expert counts);
    no op that syncs with the device on CUDA (bincount, nonzero, unique, masked_select) is on the path."""
    import samfit
    from torch.profiler import profile

    model = samfit.get_method("conv-lora").apply(samfit.build_model("tiny", image_size=64))
    model.train()
    layers = sum(type(m).__name__ == "ConvLoRALinear" for m in model.modules())
    reads = []
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    for batch in (1, 16):
        reads.clear()
        with profile() as prof:
            out = model(torch.randn(batch, 3, 64, 64))
            (out["logits"].mean() + out["aux_loss"]).backward()
        ops = {e.key: e.count for e in prof.key_averages()}
        assert len(reads) == layers, reads
        assert not {"aten::bincount", "aten::nonzero", "aten::unique", "aten::_unique2", "aten::masked_select"} & set(ops)
        # SAM's own convolutions (patch embedding, neck) + at most one per expert and layer, not one per sample
        assert ops["aten::conv2d"] <= 3 + 8 * layers < 3 + 16 * layers


def test_a_cached_configuration_trains_from_the_stored_prefix():
    """`--cache` on a late placement: the timed step feeds the stored h_k through blocks >= k, and its loss and
    gradients are those of the uncached step on the same batch (the prefix is computed on the same batch of two, so
    no row can round differently); a model that allows no cache says why and trains uncached."""
    from samfit.engine.prefix_cache import PrefixCachedSegmenter

    shape = Shape("tiny", 64, 2, "cpu")
    cached, plain = Bench(Setting("lora@last:1", cache=True), shape), Bench(Setting("lora@last:1"), shape)
    assert isinstance(cached.forward, PrefixCachedSegmenter) and cached.cache["blocks_cached"] == 3
    assert cached.images.shape[0] == 2 and cached.images.shape[1:] != plain.images.shape[1:]
    results = []
    for bench in (cached, plain):
        bench.model.train()
        loss, _ = bench.step(bench.images, bench.targets, 0)
        results.append((loss, {n: p.grad for n, p in bench.model.named_parameters() if p.grad is not None}))
    (loss_c, grads_c), (loss_p, grads_p) = results
    assert torch.equal(loss_c, loss_p) and grads_c.keys() == grads_p.keys()
    assert all(torch.equal(grads_c[n], grads_p[n]) for n in grads_p)
    record = cached.record(None)
    assert record["method"] == "lora@last:1" and record["cache"]["kind"] == "prefix"
    everywhere = Bench(Setting("lora", cache=True), shape)
    assert everywhere.cache["kind"] is None and "block 0 trains" in everywhere.cache["reason"]
