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
PARAM_TOLERANCE = 1e-4  # max |difference| of any trained parameter; measured ~6e-6 (summation order only)
SCORE_TOLERANCE = 1e-6  # on scores in [0, 1] (BER in [0, 100]); measured ~1e-16


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


def test_two_processes_equal_one_process(tmp_path, data_root):
    one = run(make_config(**SETTINGS, out=str(tmp_path), name="one"), quiet=True)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    env = dict(os.environ, SAMFIT_DATA=str(data_root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "samfit", "run", *args, f"--out={tmp_path}", "--name=two",
                           "--nproc", "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = tmp_path / "two"
    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in (one, two))
    assert m2["processes"] == 2 and m1["processes"] == 1
    for split, scores in m1["scores"].items():
        for key, value in scores.items():
            assert m2["scores"][split][key] == pytest.approx(value, abs=SCORE_TOLERANCE), key
    assert m1["selection"]["best_epoch"] == m2["selection"]["best_epoch"]
    p1, p2 = _trainable(one), _trainable(two)
    assert p1.keys() == p2.keys()
    worst = max((p1[k] - p2[k]).abs().max().item() for k in p1)
    assert worst < PARAM_TOLERANCE
    assert max((p1[k] - _trainable(one)[k]).abs().max().item() for k in p1) == 0
    h1, h2 = (list(csv.DictReader(io.StringIO((f / "history.csv").read_text()))) for f in (one, two))
    for a, b in zip(h1, h2, strict=True):  # per epoch: the same validation score and (rank-averaged) loss
        assert float(a["val_iou_per_image"]) == pytest.approx(float(b["val_iou_per_image"]), abs=SCORE_TOLERANCE)
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-5)
    # rank 0 alone wrote the folder: one status, no lock left, no stray temporary files
    assert json.loads((two / "status.json").read_text())["status"] == "done"
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "config.yaml", "history.csv", "metrics.json",
                                                     "status.json"]
    assert proc.stdout.count("done ") == 1
