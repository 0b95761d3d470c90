"""samfit bench: records, ratios to LoRA, round-robin order, memory per subprocess, data throughput, CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

from samfit.engine import profile
from samfit.engine.bench import add_ratios, bench, round_robin
from samfit.errors import SamfitError

KEYS = {"method", "step_time_s", "train_img_per_s", "eval_img_per_s", "peak_memory_mb", "trainable_params",
        "attention", "precision", "grad_checkpoint", "device"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_bench_writes_records_with_ratios_to_lora(tmp_path, data_root):
    path, text = bench("lora,decoder-only", "tiny", 64, 2, steps=2, out=tmp_path, warmup=1,
                       attention="sdpa", grad_checkpoint="off", device="cpu", memory=True,
                       data="shapes", num_workers=1, data_batches=3, log=lambda *_: None)
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["method"], r["attention"]) for r in records] == [("lora", "sdpa"), ("decoder-only", "sdpa")]
    for r in records:
        assert KEYS <= r.keys()
        assert r["step_time_s"] > 0 and r["train_img_per_s"] > 0 and r["eval_img_per_s"] > 0
        assert r["peak_memory_mb"] > 0 and len(r["step_times_s"]) == 2 and r["device"] == "cpu"
    assert records[0]["step_time_s_vs_lora"] == 1.0 and records[0]["peak_memory_mb_vs_lora"] == 1.0
    assert records[1]["trainable_params"] < records[0]["trainable_params"]
    meta = json.loads((tmp_path / "bench_meta.json").read_text())
    assert meta["machine"]["cores"] and meta["peak_memory_kind"] == "cpu_peak_rss_above_baseline"
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


def test_ratios_are_to_the_first_lora_record():
    records = add_ratios([{"method": "lst", "step_time_s": 3.0, "train_img_per_s": 1.0, "eval_img_per_s": 2.0,
                           "peak_memory_mb": 50.0, "trainable_params": 10},
                          {"method": "lora", "step_time_s": 2.0, "train_img_per_s": 2.0, "eval_img_per_s": 4.0,
                           "peak_memory_mb": 100.0, "trainable_params": 20}])
    assert records[0]["step_time_s_vs_lora"] == 1.5 and records[0]["peak_memory_mb_vs_lora"] == 0.5
    assert records[0]["eval_img_per_s_vs_lora"] == 0.5 and records[0]["trainable_params_vs_lora"] == 0.5


def test_peak_memory_counts_the_work_after_the_reset_not_before():
    device = torch.device("cpu")
    ballast = torch.ones(64 * 2**20 // 4)  # 64 MB touched before the reset
    del ballast
    profile.reset_peak_memory(device)
    assert profile.peak_memory_mb(device) < 32
    block = torch.ones(48 * 2**20 // 4)  # 48 MB after it
    assert profile.peak_memory_mb(device) >= 40
    del block


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(SamfitError, match="--attention"):
        bench("lora", "tiny", 64, 1, 1, tmp_path, attention="flash", device="cpu")
    with pytest.raises(SamfitError, match="Did you mean"):
        bench("lorra", "tiny", 64, 1, 1, tmp_path, device="cpu")
    with pytest.raises(SamfitError, match="Nothing to measure"):
        bench("none", "tiny", 64, 1, 1, tmp_path, device="cpu")


def test_bench_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "samfit", "bench", "--methods", "conv-lora,lora", "--model", "tiny",
                           "--image-size", "64", "--batch", "1", "--steps", "1", "--warmup", "0", "--no-memory",
                           "--attention", "sdpa,reference", "--grad-checkpoint", "--device", "cpu",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["method"], r["attention"], r["grad_checkpoint"]) for r in records] == [
        (m, a, True) for m in ("conv-lora", "lora") for a in ("sdpa", "reference")]
    assert all(r["peak_memory_mb"] is None for r in records)
    assert records[2]["step_time_s_vs_lora"] == 1.0  # LoRA with the first listed settings is the baseline
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
