"""Distributed training: 2 CPU processes (gloo, under torchrun) give the 1-process run's result."""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samfit.config import make_config
from samfit.engine import distributed
from samfit.engine.train import epoch_order, flip_batch, run
from samfit.errors import SamfitError

ROOT = Path(__file__).resolve().parents[1]
# Same global batch and every other setting; 2 optimiser steps per epoch, 2 epochs, 6 evaluation images
# (3 per rank), a flip-augmented LoRA run on the tiny model.
SETTINGS = dict(method="lora", dataset="shapes", model="tiny", image_size=64, epochs=2, limit_train=8, limit_eval=6,
                batch_size=4, effective_batch=4, lr=1e-3, device="cpu")
# The runs are fp32 (a run has no float64 mode) and not the same computation: one process runs batches of 4 where
# each rank runs 2, so GEMMs round differently, and gradients are summed in another order. The bounds below
# follow from what that rounding can change; measured on AVX-512, AVX2-only (MKL_ENABLE_INSTRUCTIONS=AVX2
# ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, as on AMD Zen 3) and generic (ATEN_CPU_CAPABILITY=default)
# kernels.
#
# Weights: AdamW moves a weight by about lr per step whatever its gradient's scale, and rounding changes a step by
# about the gradients' relative rounding error (up to ~2e-3 in this tiny model: test_attention), so after the
# 4 steps the weights differ by well under a tenth of one step. Measured 6.5e-6 to 1.1e-5; training rank 1 on rank
# 0's images gives 5e-3, summing the ranks' gradients instead of averaging them 2e-3.
PARAM_TOLERANCE = 0.1 * SETTINGS["lr"]
# Scores threshold the predicted probability at 0.5, so a pixel within rounding of it may flip between the runs.
# One flip moves a per-image IoU by <= 1/|gt| and a Dice by <= 2/|gt| (their means over the 6 images by a sixth of
# that) and the pooled BER by <= 50/P percentage points (P >= 6 |gt|); the smallest shape is a triangle of ~288 px
# on the 128 px ground truth. The bounds allow FLIPS such flips: measured none; the summed gradients above,
# weights ~200x further apart than rounding puts them, flipped about two.
FLIPS, GT_MIN, EVAL_IMAGES = 4, 288, SETTINGS["limit_eval"]
SCORE_TOLERANCE = FLIPS * 2 / (EVAL_IMAGES * GT_MIN)  # ≈ 4.6e-3, on scores in [0, 1]
BER_TOLERANCE = FLIPS * 50 / (EVAL_IMAGES * GT_MIN)  # ≈ 0.12 percentage points (BER is in [0, 100])
# The logged loss (the last micro-batch's, a mean over its pixels) follows the weights smoothly: measured <= 6e-8
# of ~1.44 (0.4 fp32 eps); bounded by 2**6 fp32 eps ≈ 7.6e-6 relative (rank 1 on rank 0's images: 7e-3).
LOSS_RTOL = 2**6 * torch.finfo(torch.float32).eps


def test_shards_cover_each_micro_batch_once_in_order():
    order = epoch_order(16, seed=3, epoch=1)
    ranks = [distributed.Context(rank=r, world=2) for r in range(2)]
    shards = [c.shard(order, 4) for c in ranks]
    assert shards[0] + shards[1] != order
    rebuilt = [i for b in range(4) for s in shards for i in s[b * 2:(b + 1) * 2]]
    assert rebuilt == order
    assert distributed.Context(rank=1, world=3).eval_args(7)["indices"] == [1, 4]


def test_each_rank_gets_the_flips_its_images_get_in_one_process():
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    targets = torch.arange(4 * 1 * 2 * 2, dtype=torch.float32).reshape(4, 1, 2, 2)
    whole = flip_batch(images, targets, seed=1, epoch=2, batch=5)
    for rank in range(2):
        part = flip_batch(images[2 * rank:2 * rank + 2], targets[2 * rank:2 * rank + 2], 1, 2, 5, part=(rank, 2))
        assert torch.equal(part[0], whole[0][2 * rank:2 * rank + 2])
        assert torch.equal(part[1], whole[1][2 * rank:2 * rank + 2])


def test_batch_must_split_evenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SamfitError, match="multiple of the 2 processes"):
        distributed.setup(torch.device("cpu"), 3)


def test_nproc_becomes_a_torchrun_command():
    cmd = distributed.torchrun_command(2, ["run", "--nproc", "2", "--method", "lora", "--nproc=2"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "samfit",
                       "run", "--method", "lora"]


def _trainable(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["trainable"]


# LoRA on the last block only: blocks 0..n-2 are frozen plain SAM, so both runs train from the prefix cache
# (each rank stores every training image's prefix and reads its own shard of each batch).
CACHES = {"uncached": ({}, []), "prefix-cached": ({"method_args": {"blocks": "last:1"}}, ["--method-arg",
                                                                                         "blocks=last:1"])}


@pytest.mark.slow  # two runs, one of them under torchrun: ~30 s each
@pytest.mark.parametrize("cache", list(CACHES))
def test_two_processes_equal_one_process(tmp_path, data_root, cache):
    settings, extra_args = CACHES[cache]
    one = run(make_config(**SETTINGS, **settings, out=str(tmp_path), name="one"), quiet=True)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()] + extra_args
    env = dict(os.environ, SAMFIT_DATA=str(data_root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "samfit", "run", *args, f"--out={tmp_path}", "--name=two",
                           "--nproc", "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = tmp_path / "two"
    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in (one, two))
    assert m2["processes"] == 2 and m1["processes"] == 1
    kinds = [(m.get("embedding_cache") or {}).get("kind") for m in (m1, m2)]
    assert kinds == ([None, None] if cache == "uncached" else ["prefix", "prefix"]), kinds
    for split, scores in m1["scores"].items():
        for key, value in scores.items():
            tolerance = BER_TOLERANCE if key == "ber" else SCORE_TOLERANCE
            assert m2["scores"][split][key] == pytest.approx(value, abs=tolerance), key
    p1, p2 = _trainable(one), _trainable(two)
    assert p1.keys() == p2.keys()
    worst = max((p1[k] - p2[k]).abs().max().item() for k in p1)
    assert worst < PARAM_TOLERANCE
    h1, h2 = (list(csv.DictReader(io.StringIO((f / "history.csv").read_text()))) for f in (one, two))
    for a, b in zip(h1, h2, strict=True):  # per epoch: the same validation score and (rank-averaged) loss
        assert float(a["val_iou_per_image"]) == pytest.approx(float(b["val_iou_per_image"]), abs=SCORE_TOLERANCE)
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=LOSS_RTOL)
    # the same epoch is selected, and rounding cannot decide which: the epochs' validation scores lie further apart
    # than the two runs' scores can
    assert m1["selection"]["best_epoch"] == m2["selection"]["best_epoch"]
    val = sorted(float(a["val_iou_per_image"]) for a in h1)
    assert val[-1] - val[-2] > 2 * SCORE_TOLERANCE
    # rank 0 alone wrote the folder: one status, no lock left, no stray temporary files
    assert json.loads((two / "status.json").read_text())["status"] == "done"
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "config.yaml", "history.csv", "metrics.json",
                                                     "per_image.csv", "status.json"]
    # the per-image rows are gathered from both ranks: every image once, in dataset order, as one process has them
    r1, r2 = (list(csv.DictReader(io.StringIO((f / "per_image.csv").read_text()))) for f in (one, two))
    assert [(r["test_set"], r["image"]) for r in r1] == [(r["test_set"], r["image"]) for r in r2]
    for a, b in zip(r1, r2):
        assert float(a["iou_per_image"]) == pytest.approx(float(b["iou_per_image"]), abs=SCORE_TOLERANCE)
    assert proc.stdout.count("done ") == 1
