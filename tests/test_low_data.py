"""--train-fraction: a fixed, nested subset of the training split, the same for every method and seed, drawn after
the selection split is held out; recorded in the run name and metrics.json; benchmarks/low_data.yaml."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from samfit.config import RunConfig, make_config
from samfit.data import fraction_pairs, selection_pairs
from samfit.data.registry import DatasetSpec
from samfit.errors import SamfitError
from samfit.grid import load_grid
from test_selection import canonical, stems  # noqa: F401  (canonical datasets on disk, as test_selection builds them)

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)


def _pairs(n: int) -> list:
    return [(Path(f"img{i:03d}.png"), Path(f"img{i:03d}.png")) for i in range(n)]


def test_subsets_are_nested_sized_and_independent_of_input_order():
    pairs = _pairs(200)
    subsets = [set(stems(fraction_pairs(pairs, f))) for f in FRACTIONS]
    assert [len(s) for s in subsets] == [10, 20, 50, 100, 200]
    assert all(small < large for small, large in zip(subsets, subsets[1:]))
    shuffled = [pairs[i] for i in np.random.default_rng(5).permutation(200)]
    assert stems(fraction_pairs(shuffled, 0.25)) == stems(fraction_pairs(pairs, 0.25))  # sorted by name first
    assert fraction_pairs(pairs, 1.0) is pairs  # fraction 1: exactly as before
    assert len(fraction_pairs(_pairs(3), 0.05)) == 1  # at least one image
    # not simply the first images by name: a permutation
    assert stems(fraction_pairs(pairs, 0.1)) != [f"img{i:03d}" for i in range(20)]


def test_selection_split_is_the_same_images_whatever_the_fraction(tmp_path):
    folder = canonical(tmp_path / "polyp", {"train": 60, "kvasir": 2})
    spec = DatasetSpec(name="polyp", val=None, test=["kvasir"])
    train, held, _ = selection_pairs(spec, folder)
    for fraction in FRACTIONS:
        subset = fraction_pairs(train, fraction)
        assert set(stems(subset)) <= set(stems(train)) and set(stems(subset)).isdisjoint(stems(held))
    assert stems(selection_pairs(spec, folder)[1]) == stems(held)


def test_every_method_and_seed_trains_on_the_same_images(tmp_path, data_root):
    from samfit.data import ensure_available, resolve_dataset
    from samfit.engine import distributed
    from samfit.engine.train import Run

    trained = set()
    for method, seed in (("lora", 0), ("lora", 3), ("bitfit", 1), ("decoder-only", 2)):
        cfg = make_config(method=method, seed=seed, train_fraction=0.25, dataset="shapes", device="cpu",
                          data_root=str(data_root), out=str(tmp_path))
        spec = resolve_dataset(cfg.dataset)
        cfg = cfg.resolved(spec)
        dist = distributed.setup(torch.device("cpu"), 4)
        run = Run(cfg, spec, dist, tmp_path / cfg.run_name(), quiet=True)
        run.prepare_data()
        trained.add(tuple(p[0].name for p in run.train_set.pairs))
        full = selection_pairs(spec, ensure_available(spec, cfg.data_root))[0]
    assert len(trained) == 1
    (images,) = trained
    assert len(images) == round(0.25 * len(full)) and set(images) < {p[0].name for p in full}


def test_run_name_and_bounds():
    assert RunConfig(train_fraction=0.25, image_size=128).run_name() == "shapes_lora_tiny_128_s0_f0.25"
    assert RunConfig(train_fraction=0.05, image_size=128, protocol="official").run_name() == \
        "shapes_lora_tiny_128_s0_f0.05_official"
    assert RunConfig(image_size=128).run_name() == "shapes_lora_tiny_128_s0"  # the default: names as before
    for bad in (0, -0.1, 1.5):
        with pytest.raises(SamfitError, match="train-fraction"):
            RunConfig(train_fraction=bad)


def test_low_data_grid_dry_run(tmp_path):
    grid = load_grid(ROOT / "benchmarks" / "low_data.yaml", out=str(tmp_path))
    assert len(grid.runs) == 9 * 8 * 5 * 3
    names = {cfg.name for cfg in grid.runs}
    assert "isic2017_conv-lora_vit_h_1024_s2_f0.05_official" in names
    assert "isic2017_conv-lora_vit_h_1024_s2_official" in names  # fraction 1: the paper grid's name
    paper = {cfg.name for cfg in load_grid(ROOT / "benchmarks" / "paper.yaml", out=str(tmp_path)).runs}
    assert paper <= names
    assert {cfg.train_fraction for cfg in grid.runs} == set(FRACTIONS)


def test_a_fraction_run_records_it(tmp_path, data_root, one_thread):
    from samfit.engine.train import run

    folder = run(make_config(method="decoder-only", dataset="shapes", epochs=1, train_fraction=0.5, limit_eval=2,
                             out=str(tmp_path), data_root=str(data_root), device="cpu"), quiet=True)
    assert folder.name.endswith("_f0.5")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["train_fraction"] == 0.5 and metrics["run"] == folder.name
    spec_train = selection_pairs(DatasetSpec(name="shapes"), data_root / "shapes")[0]
    assert metrics["train_images"] == round(0.5 * len(spec_train))


def test_reports_keep_fractions_apart(tmp_path):
    from samfit.report.collect import collect_runs
    from samfit.report.table import summarise

    for fraction in (0.5, 1.0, None):  # None: a run made before --train-fraction, on all of train
        folder = tmp_path / f"shapes_lora_f{fraction}"
        folder.mkdir()
        metrics = {"method": "lora", "dataset": "shapes", "model": "tiny", "image_size": 64, "seed": 0,
                   "device": "cpu", "headline": {"metric": "iou", "lower_is_better": False, "value": 0.5,
                                                 "split": "test"},
                   "scores": {"test": {"iou": 0.5}}, "params": {"trainable": 1, "encoder_trainable": 0,
                                                                "percent_of_sam": 1.0},
                   "throughput": {"train_img_per_s": 1, "step_time_s": 1, "eval_img_per_s": 1},
                   "peak_memory_mb": 1}
        if fraction is not None:
            metrics["train_fraction"] = fraction
        (folder / "metrics.json").write_text(json.dumps(metrics))
    runs = collect_runs(tmp_path)
    assert sorted(runs["dataset"]) == ["shapes", "shapes", "shapes@f0.5"]
    assert sorted(runs["train_fraction"]) == [0.5, 1.0, 1.0]
    summary = summarise(runs)
    assert sorted(zip(summary["dataset"], summary["seeds"])) == [("shapes", 1), ("shapes@f0.5", 1)]
