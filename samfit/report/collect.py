"""Collect run folders (any folder holding metrics.json, at any depth) into a pandas DataFrame; read a run's
per-image rows (per_image.csv, written by runs since per-image records exist)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from samfit.config import method_label
from samfit.errors import SamfitError

PER_IMAGE = "per_image.csv"


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per run and test set: identity, every scalar score, parameter counts, speed and memory."""
    root = Path(root)
    if not root.is_dir():
        raise SamfitError(f"No such folder: {root}.")
    rows = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as exc:
            raise SamfitError(f"Unreadable results file {path}: {exc}. Delete it or re-run that run.") from None
        for split, scores in m["scores"].items():
            row = {"run": str(path.parent.relative_to(root)) or ".", "method": method_label(m["method"], m.get("method_args")),
                   "dataset": m["dataset"],
                   "test_set": split, "model": m["model"], "image_size": m["image_size"], "seed": m["seed"],
                   "headline": m["headline"]["metric"], "lower_is_better": m["headline"]["lower_is_better"],
                   "trainable": m["params"]["trainable"], "encoder_trainable": m["params"]["encoder_trainable"],
                   "percent_of_sam": m["params"]["percent_of_sam"],
                   "train_img_per_s": m["throughput"]["train_img_per_s"],
                   "step_time_s": m["throughput"]["step_time_s"], "eval_img_per_s": m["throughput"]["eval_img_per_s"],
                   "peak_memory_mb": m["peak_memory_mb"], "device": m["device"],
                   "path": str(path.parent.resolve()), "per_image": (path.parent / PER_IMAGE).is_file()}
            row.update({k: v for k, v in scores.items() if isinstance(v, (int, float))})
            rows.append(row)
    if not rows:
        raise SamfitError(f"No runs under {root} (no metrics.json found). Run `samfit run ... --out {root}` first.")
    return pd.DataFrame(rows)


def read_per_image(run_dir: str | Path, test_set: str) -> pd.DataFrame:
    """One test set's per-image rows of a run, indexed by image name."""
    path = Path(run_dir) / PER_IMAGE
    if not path.is_file():
        raise SamfitError(f"{run_dir} has no {PER_IMAGE}: the run was made before per-image records. Re-run it "
                          f"(same settings, a fresh --out) to compare it.")
    try:
        rows = pd.read_csv(path, dtype={"test_set": str, "image": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SamfitError(f"Unreadable {path}: {exc}. Re-run that run.") from None
    rows = rows[rows["test_set"] == test_set]
    if rows.empty or rows["image"].duplicated().any():
        why = "no rows for test set" if rows.empty else "a repeated image name in test set"
        raise SamfitError(f"{path} has {why} '{test_set}'; per-image comparison needs one row per image.")
    return rows.set_index("image")
