"""Grid files, `samfit grid` (local pool and submitit), resuming a killed grid, and the tables and plots of a
finished grid. One smoke grid (nine methods on `shapes`) is shared by the tests that read its results."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from samfit.errors import SamfitError
from samfit.config import parse_set
from samfit.grid import inspect, load_grid

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"
METHODS = ["decoder-only", "bitfit", "adapter", "sam-adapter", "vpt", "lst", "ssf", "lora", "conv-lora"]
TINY = {"model": "tiny", "image_size": 64, "epochs": 1, "limit_train": 4, "limit_eval": 2, "device": "cpu"}


def samfit(*args, env=None, timeout=600, check=True):
    proc = subprocess.run([sys.executable, "-m", "samfit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"samfit {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_grid(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- grid files ----------------------------------------------------------------------------------------------

def test_expansion_order_names_and_override_precedence(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", {
        "defaults": {**TINY, "batch_size": 2, "effective_batch": 4, "limit_eval": 3},
        "axes": {"method": ["lora", "conv-lora"], "lr": ["1e-4", 3e-4], "seed": [0, 1]},
        "overrides": {
            "method": {"conv-lora": {"batch_size": 4, "limit_eval": 5, "method_args": {"experts": 4}}},
            "lr": {"1e-4": {"limit_eval": 7}},   # a later axis wins over an earlier one
            "seed": {1: {"epochs": 2}},
        },
        "exclude": [{"method": "lora", "seed": 1}],
    })
    g = load_grid(grid, out=str(tmp_path / "out"), overrides=parse_set(["limit_train=6"]))
    names = [c.name for c in g.runs]
    assert names == ["shapes_lora_tiny_64_s0_lr-0.0001", "shapes_lora_tiny_64_s0_lr-0.0003",
                     "shapes_conv-lora_tiny_64_s0_lr-0.0001", "shapes_conv-lora_tiny_64_s1_lr-0.0001",
                     "shapes_conv-lora_tiny_64_s0_lr-0.0003", "shapes_conv-lora_tiny_64_s1_lr-0.0003"]
    by = {c.name: c for c in g.runs}
    lora = by["shapes_lora_tiny_64_s0_lr-0.0003"]
    assert (lora.lr, lora.batch_size, lora.limit_eval, lora.epochs) == (3e-4, 2, 3, 1)
    assert lora.limit_train == 6  # --set beats the file
    assert lora.loss == "structure"  # the dataset's default fills what nobody set
    conv = by["shapes_conv-lora_tiny_64_s1_lr-0.0001"]
    assert (conv.batch_size, conv.limit_eval, conv.epochs, conv.method_args) == (4, 7, 2, {"experts": 4})
    assert by["shapes_conv-lora_tiny_64_s0_lr-0.0003"].limit_eval == 5
    assert all(Path(c.out) == (tmp_path / "out").resolve() for c in g.runs)
    assert inspect(g.runs[0]).state == "new"


@pytest.mark.parametrize("data, message", [
    ({"axis": {"method": ["lora"]}}, "unknown top-level key 'axis'. Did you mean 'axes'?"),
    ({"axes": {"method": ["lora"]}, "defaults": {"epoch": 1}}, "unknown setting 'epoch'. Did you mean 'epochs'?"),
    ({"axes": {"methods": ["lora"]}}, "unknown axis 'methods'"),
    ({"axes": {"method": ["lora"]}, "overrides": {"method": {"lorra": {"epochs": 1}}}},
     "'lorra' is not a value of axis 'method'"),
    ({"axes": {"method": ["lora"]}, "overrides": {"dataset": {"shapes": {"epochs": 1}}}}, "unknown axis 'dataset'"),
    ({"axes": {"method": ["lora"]}, "defaults": {"method": "ssf"}}, "'method' is an axis of this grid"),
    ({"axes": {"method": ["lora"]}, "defaults": {"name": "x"}}, "'name' is set by the grid"),
    ({"axes": {"method": ["lora", "lorra"]}}, "Did you mean 'lora'?"),
    ({"axes": {"method": ["lora"], "dataset": ["nope"]}}, "Unknown dataset 'nope'"),
    ({"axes": {"method": ["lora"]}, "defaults": {"lr": "fast"}}, "lr must be a number"),
    ({"axes": {"method": []}}, "must be a non-empty list"),
    ({"axes": {"method": ["lora"]}, "exclude": [{"method": "lora"}]}, "every run is excluded"),
])
def test_invalid_grid_files_say_what_is_wrong(tmp_path, data, message):
    path = write_grid(tmp_path / "bad.yaml", {"defaults": TINY, **data} if "defaults" not in data else data)
    with pytest.raises(SamfitError, match=message.replace("?", r"\?").replace("(", r"\(")):
        load_grid(path, out=str(tmp_path))


def test_set_cannot_change_an_axis(tmp_path):
    with pytest.raises(SamfitError, match="'seed' is an axis"):
        load_grid(SMOKE, out=str(tmp_path), overrides=parse_set(["seed=3"]))
    with pytest.raises(SamfitError, match="KEY=VALUE"):
        parse_set(["epochs"])


@pytest.mark.slow
def test_paper_grid_dry_run_lists_216_runs(tmp_path):
    proc = samfit("grid", ROOT / "benchmarks" / "paper.yaml", "--dry-run", "--out", tmp_path / "paper")
    assert "216 runs: 216 new (dry run: nothing launched)" in proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "_vit_h_1024_s" in line]
    assert len(rows) == 216
    assert any("sbu_conv-lora_vit_h_1024_s2" in r and "balanced-bce" in r and " 10 " in r for r in rows)
    assert any("road_lst_vit_h_1024_s0" in r and "0.0003" in r and " 20 " in r for r in rows)
    assert not (tmp_path / "paper").exists()


# --- the smoke grid: run, kill, resume, skip ---------------------------------------------------------------

def _env(data_root: Path) -> dict:
    return dict(os.environ, SAMFIT_DATA=str(data_root), COLUMNS="200")


def _wait_dead(folder: Path, timeout: float = 60) -> None:
    """Wait until no worker of the killed grid is alive (their locks name them)."""
    deadline = time.time() + timeout
    for lock in folder.glob("*/run.lock"):
        pid = int(lock.read_text().split()[1])
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)


def _run_smoke_grid(tmp: Path) -> dict:
    """Start the smoke grid, SIGKILL it once 3 runs are done, run it again to the end, then a third time."""
    out, env = tmp / "runs", _env(tmp / "data")
    proc = subprocess.Popen([sys.executable, "-m", "samfit", "grid", str(SMOKE), "--out", str(out), "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.time() + 400
    while len(list(out.glob("*/metrics.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.3)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _wait_dead(out)
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    second = samfit("grid", SMOKE, "--out", out, "--jobs", "2", env=env)
    third = samfit("grid", SMOKE, "--out", out, env=env)
    return {"out": str(out), "env": env, "before": before, "second": second.stderr, "third": third.stderr}


@pytest.fixture(scope="module")
def smoke_grid(tmp_path_factory, request):
    """One smoke grid per test session, also when pytest-xdist spreads this module's tests over workers (they
    share the run's temporary root; the first one runs the grid, the others wait for it and read the result)."""
    if not hasattr(request.config, "workerinput"):
        result = _run_smoke_grid(tmp_path_factory.mktemp("smoke"))
    else:
        from filelock import FileLock

        shared = tmp_path_factory.getbasetemp().parent / "smoke-grid"
        with FileLock(str(shared) + ".lock"):
            record = shared / "result.json"
            if record.is_file():
                result = json.loads(record.read_text())
            else:
                shared.mkdir(exist_ok=True)
                result = _run_smoke_grid(shared)
                record.write_text(json.dumps(result))
    return {**result, "out": Path(result["out"])}


@pytest.mark.slow
def test_killed_grid_finishes_the_rest_without_redoing_finished_runs(smoke_grid):
    out, before = smoke_grid["out"], smoke_grid["before"]
    assert 3 <= len(before) < 9
    done = {p.parent.name for p in out.glob("*/metrics.json")}
    assert done == {f"shapes_{m}_tiny_64_s0" for m in METHODS}
    for name, mtime in before.items():  # finished before the kill: skipped, not redone
        assert (out / name / "metrics.json").stat().st_mtime_ns == mtime
    summary = json.loads((out / "grid.json").read_text())
    assert sum(r["state"] == "skipped" for r in summary["runs"]) == 9  # (the third call's record)
    assert all(json.loads((out / n / "status.json").read_text())["status"] == "done" for n in done)
    assert not list(out.glob("*/run.lock"))
    assert f"{9 - len(before)} to run ({len(before)} already complete)" in smoke_grid["second"]


@pytest.mark.slow
def test_second_call_runs_nothing(smoke_grid):
    assert "Nothing to run: 9 runs: 9 skipped." in smoke_grid["third"]
    assert "start" not in smoke_grid["third"]


@pytest.mark.slow
def test_table_shows_all_nine_methods(smoke_grid):
    proc = samfit("table", smoke_grid["out"], "--format", "csv", "--paper")
    frame = pd.read_csv(io.StringIO(proc.stdout), dtype=str)
    assert list(frame["method"]) == METHODS
    assert list(frame.columns) == ["method", "model", "trainable", "% of SAM", "shapes iou_per_image", "step s",
                                   "peak MB"]  # no published numbers for shapes: --paper adds nothing
    assert frame["shapes iou_per_image"].str.contains(r"^\d+\.\d\d \(n=1\)").all()  # one seed: no spread
    assert frame["shapes iou_per_image"].str.endswith(" *").sum() >= 1  # the best is marked
    assert "none of these runs' columns has published numbers" in proc.stderr


@pytest.mark.slow
def test_plot_writes_pngs(smoke_grid, tmp_path):
    proc = samfit("plot", smoke_grid["out"], "--out", tmp_path / "plots")
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["shapes_iou_per_image_vs_params.png", "shapes_iou_per_image_vs_step_time.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "wrote" in proc.stdout


@pytest.mark.slow
def test_changed_settings_are_refused_unless_overwrite(smoke_grid, tmp_path):
    proc = samfit("grid", SMOKE, "--out", smoke_grid["out"], "--set", "limit_eval=3", env=smoke_grid["env"],
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "9 run folder(s) hold a run made with other settings" in proc.stderr and "--overwrite" in proc.stderr
    assert "limit_eval 2 -> 3" in proc.stderr


# --- failures, retries, SLURM through submitit's local executor ------------------------------------------

@pytest.mark.slow
def test_failed_run_is_retried_then_recorded(tmp_path):
    grid = write_grid(tmp_path / "fail.yaml", {"defaults": {**TINY, "limit_train": 2},  # < one optimiser step
                                               "axes": {"method": ["lora"]}})
    proc = samfit("grid", grid, "--out", tmp_path / "runs", "--retries", "1", env=_env(tmp_path / "data"),
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "1 of 1 runs failed" in proc.stderr and "fewer than one optimiser step" in proc.stderr
    run = json.loads((tmp_path / "runs" / "grid.json").read_text())["runs"][0]
    assert run["state"] == "failed" and run["attempts"] == 2 and "optimiser step" in run["error"]
    status = json.loads((tmp_path / "runs" / "shapes_lora_tiny_64_s0" / "status.json").read_text())
    assert status["status"] == "failed" and "optimiser step" in status["error"]


@pytest.mark.slow
def test_slurm_launcher_with_submitits_local_executor(tmp_path):
    grid = write_grid(tmp_path / "one.yaml", {"defaults": TINY, "axes": {"method": ["lora"]}})
    proc = samfit("grid", grid, "--out", tmp_path / "runs", "--launcher", "slurm", "--slurm-cluster", "local",
                  "--gpus-per-task", "0", "--cpus-per-task", "1", env=_env(tmp_path / "data"))
    run = tmp_path / "runs" / "shapes_lora_tiny_64_s0"
    assert (run / "metrics.json").is_file() and json.loads((run / "status.json").read_text())["status"] == "done"
    assert "on job " in proc.stderr and "1 done" in proc.stderr
    assert list((tmp_path / "runs" / ".grid" / "slurm").glob("*/*_log.out"))


def test_slurm_without_sbatch_says_so(tmp_path, monkeypatch):
    from samfit.launch.slurm import SlurmOptions, make_executor

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SamfitError, match="sbatch"):
        make_executor(tmp_path, SlurmOptions(), "x")


def test_workers_are_pinned_to_one_gpu_or_the_cpu(monkeypatch):
    from samfit.launch import parse_gpus
    from samfit.launch.local import slot_env

    assert parse_gpus("0,1, 3") == ["0", "1", "3"] and parse_gpus("cpu") == []
    with pytest.raises(SamfitError, match="GPU indices"):
        parse_gpus("first")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert slot_env("3", jobs=8)["CUDA_VISIBLE_DEVICES"] == "3"
    cpu = slot_env(None, jobs=2)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert slot_env(None, jobs=2)["SAMFIT_GRID_PARENT"] == str(os.getpid())


def test_a_finished_run_from_before_a_new_setting_still_counts_as_done(tmp_path):
    g = load_grid(SMOKE, out=str(tmp_path))
    cfg = g.runs[0]
    folder = Path(cfg.out) / cfg.name
    folder.mkdir(parents=True)
    saved = {k: v for k, v in cfg.to_dict().items() if k != "cache_embeddings"}  # written by an older samfit
    (folder / "config.yaml").write_text(yaml.safe_dump({**saved, "retired_option": 1}))
    (folder / "metrics.json").write_text("{}")
    assert inspect(cfg).state == "done"
    (folder / "config.yaml").write_text(yaml.safe_dump({**saved, "epochs": 5}))
    run = inspect(cfg)
    assert run.state == "changed" and run.detail == "settings differ: epochs 5 -> 1"


def test_an_axis_over_a_method_argument_places_the_method(tmp_path):
    """`method_args.blocks` as an axis: the value joins the run's method arguments, the name shows it, and the
    table keeps the placements apart (method@placement)."""
    from samfit.config import method_label

    grid = tmp_path / "place.yaml"
    grid.write_text("defaults: {model: tiny, image_size: 64, method_args: {rank: 2}}\n"
                    "axes:\n  method: [lora]\n  method_args.blocks: [all, 'last:2']\n")
    g = load_grid(grid, out=str(tmp_path / "out"))
    assert [(r.name, r.method_args) for r in g.runs] == [
        ("shapes_lora_tiny_64_s0", {"rank": 2, "blocks": "all"}),
        ("shapes_lora@last:2_tiny_64_s0", {"rank": 2, "blocks": "last:2"})]
    assert method_label("lora", {"blocks": "last:2"}) == "lora@last:2" and method_label("lora", {}) == "lora"
    grid.write_text("axes:\n  method: [lora]\n  method_args.blocks: ['last:x']\n")
    with pytest.raises(SamfitError, match="last:x"):
        load_grid(grid, out=str(tmp_path / "out"))


def test_axes_the_run_name_already_carries_are_not_repeated(tmp_path):
    """protocol, decoder and train_fraction are in RunConfig.run_name(): a grid axis over them adds no second
    suffix, and the runs still get distinct folders."""
    grid = tmp_path / "named.yaml"
    grid.write_text("defaults: {model: tiny, image_size: 64, method: lora}\n"
                    "axes:\n  decoder: [full, frozen]\n  protocol: [samfit, official]\n")
    names = [r.name for r in load_grid(grid, out=str(tmp_path / "out")).runs]
    assert names == ["shapes_lora_tiny_64_s0", "shapes_lora_tiny_64_s0_official",
                     "shapes_lora_tiny_64_s0_dec-frozen", "shapes_lora_tiny_64_s0_dec-frozen_official"]
