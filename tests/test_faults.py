"""Bad input, interruption and faults: clear errors without tracebacks, resume, nothing lost."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from samfit.data.registry import ensure_available, resolve_dataset
from samfit.engine.rundir import RunLock

pytestmark = pytest.mark.slow  # nearly every test runs samfit in a subprocess (signals, kills, exit codes)

QUICK = ["--image-size", "64", "--limit-train", "4", "--limit-eval", "2", "--epochs", "1", "--batch-size", "2",
         "--effective-batch", "2", "--device", "cpu"]
RESUMABLE = ["--method", "lora", "--image-size", "64", "--limit-train", "16", "--limit-eval", "4", "--epochs", "3",
             "--batch-size", "2", "--effective-batch", "2", "--device", "cpu"]


def samfit(*args, data_root, **kw):
    env = dict(os.environ, SAMFIT_DATA=str(data_root), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "samfit", *args], capture_output=True, text=True, env=env, **kw)


def start(*args, data_root):
    env = dict(os.environ, SAMFIT_DATA=str(data_root), COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "samfit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def fails_cleanly(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    message = " ".join(proc.stderr.split())
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    ensure_available(resolve_dataset("shapes"), root)
    return root


@pytest.fixture
def folder_copy(root, tmp_path):
    """A copy of `shapes` used as a folder dataset (canonical layout given by path)."""
    dst = tmp_path / "myset"
    shutil.copytree(root / "shapes", dst)
    return dst


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = samfit("run", *RESUMABLE, "--out", str(out), "--name", "ref", data_root=root)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "ref" / "metrics.json").read_text())


def wait_for(path: Path, proc, timeout=300):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_scores(root, tmp_path, reference):
    proc = start("run", *RESUMABLE, "--out", str(tmp_path), "--name", "killed", data_root=root)
    run_dir = tmp_path / "killed"
    wait_for(run_dir / "checkpoints" / "last.pt", proc)  # epoch 1 done
    time.sleep(0.4)  # well inside epoch 2
    proc.kill()
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"  # died without a word
    resumed = samfit("run", *RESUMABLE, "--out", str(tmp_path), "--name", "killed", "--resume", data_root=root)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stderr and "stale lock" in resumed.stderr  # the dead owner's lock is taken over
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["scores"] == reference["scores"]
    assert len((run_dir / "history.csv").read_text().strip().splitlines()) == 1 + 3


def test_sigint_saves_and_resume_finishes_identically(root, tmp_path, reference):
    proc = start("run", *RESUMABLE, "--out", str(tmp_path), "--name", "int", data_root=root)
    run_dir = tmp_path / "int"
    wait_for(run_dir / "checkpoints" / "last.pt", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in stderr
    assert "--resume" in stderr
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "run.lock").exists()
    resumed = samfit("run", *RESUMABLE, "--out", str(tmp_path), "--name", "int", "--resume", data_root=root)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["scores"] == reference["scores"]


def test_a_live_lock_refuses_a_second_writer(root, tmp_path):
    run_dir = tmp_path / "busy"
    with RunLock(run_dir):
        proc = samfit("run", *QUICK, "--out", str(tmp_path), "--name", "busy", data_root=root)
    fails_cleanly(proc, "is in use by process", str(os.getpid()))
    assert not (run_dir / "metrics.json").exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "run.lock").write_text(f"{os.uname().nodename} {dead.pid}")
    with pytest.warns(UserWarning, match="stale lock"):
        lock = RunLock(tmp_path).acquire()
    assert (tmp_path / "run.lock").read_text().endswith(str(os.getpid()))
    lock.release()


def test_nan_loss_stops_with_step_lr_and_precision(root, tmp_path):
    proc = samfit("run", *QUICK, "--lr", "1e30", "--out", str(tmp_path), "--name", "nan", data_root=root)
    fails_cleanly(proc, "Loss became", "at epoch 1, optimiser step", "lr 5e+29", "precision fp32",
                  "No checkpoint was saved yet")
    status = json.loads((tmp_path / "nan" / "status.json").read_text())
    assert status["status"] == "failed" and "Loss became" in status["error"]


def test_disk_full_while_writing_is_reported(root, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        proc = samfit("run", *QUICK, "--out", str(mount), "--name", "full", data_root=root)
        fails_cleanly(proc, "Disk full while writing", "Free space")
        leftovers = [p.name for p in (mount / "full" / "checkpoints").iterdir()]
        assert not [n for n in leftovers if n.endswith(".tmp")]  # no half-written file left behind
    finally:
        subprocess.run(["umount", str(mount)])


def test_output_folder_not_writable(root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    fails_cleanly(samfit("run", *QUICK, "--out", str(blocker / "sub"), data_root=root), "is not writable", "--out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_asked_for_but_absent(root, tmp_path):
    fails_cleanly(samfit("run", "--device", "cuda", "--out", str(tmp_path), data_root=root),
                  "--device cuda was asked for, but CUDA is not available")


def test_unknown_method_arg_lists_valid_keys(root, tmp_path):
    fails_cleanly(samfit("run", "--method", "lora", "--method-arg", "rnak=4", "--out", str(tmp_path), data_root=root),
                  "Unknown --method-arg rnak", "Valid keys: rank, alpha")


def test_unknown_dataset_suggests_the_closest(root, tmp_path):
    fails_cleanly(samfit("run", "--dataset", "shapess", "--out", str(tmp_path), data_root=root),
                  "Unknown dataset 'shapess'. Did you mean 'shapes'?")


def test_image_size_not_multiple_of_16(root, tmp_path):
    fails_cleanly(samfit("run", "--image-size", "200", "--out", str(tmp_path), data_root=root),
                  "--image-size 200 is not a positive multiple of 16")


def test_image_without_mask_and_mask_without_image(root, folder_copy, tmp_path):
    (folder_copy / "train" / "masks" / "0003.png").unlink()
    fails_cleanly(samfit("run", "--dataset", str(folder_copy), *QUICK, "--out", str(tmp_path), data_root=root),
                  "Image without mask", "0003.png")
    (folder_copy / "train" / "images" / "0003.png").unlink()
    (folder_copy / "val" / "images" / "0002.png").unlink()
    fails_cleanly(samfit("run", "--dataset", str(folder_copy), *QUICK, "--out", str(tmp_path), data_root=root),
                  "Mask without image", "0002.png")


def test_mask_size_mismatch_and_illegal_values(root, folder_copy, tmp_path):
    mask = folder_copy / "train" / "masks" / "0000.png"
    cv2.imwrite(str(mask), np.zeros((50, 60), np.uint8))
    fails_cleanly(samfit("run", "--dataset", str(folder_copy), *QUICK, "--out", str(tmp_path), data_root=root),
                  "Mask size 60x50", "0000.png", "differs from image size 128x128")
    cv2.imwrite(str(mask), np.full((128, 128), 7, np.uint8))
    fails_cleanly(samfit("run", "--dataset", str(folder_copy), *QUICK, "--out", str(tmp_path), data_root=root),
                  "Illegal mask values [7]", "0000.png", "allowed: 0 and 255")


def test_skip_bad_skips_and_counts(root, folder_copy, tmp_path):
    (folder_copy / "train" / "images" / "0001.png").write_bytes(b"broken")
    proc = samfit("run", "--dataset", str(folder_copy), *QUICK, "--skip-bad", "--out", str(tmp_path),
                  "--name", "skip", data_root=root)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert metrics["skipped_bad"] == 1 and metrics["train_images"] == 3
