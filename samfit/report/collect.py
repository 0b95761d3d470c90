"""Collect run folders (any folder holding metrics.json, at any depth) into a pandas DataFrame; add the scores of
`samfit evaluate` (RUN/eval/<name>.json) as rows of their own; read a run's per-image rows (per_image.csv, written
by runs since per-image records exist)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from samfit.config import method_label
from samfit.errors import SamfitError

PER_IMAGE = "per_image.csv"
IDENTITY = ("run", "method", "model", "protocol", "image_size", "seed", "trainable", "encoder_trainable",  # not scores
            "percent_of_sam", "train_img_per_s", "step_time_s", "eval_img_per_s", "peak_memory_mb", "device", "path")
EVAL_MARK = "→"  # an evaluation's dataset in the table: '<trained on>→<eval name>', e.g. 'polyp→hospital2'


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
            row = {"run": str(path.parent.relative_to(root)) or ".",
                   "method": method_label(m["method"], m.get("method_args"), m.get("decoder")),
                   "dataset": fraction_label(m["dataset"], m.get("train_fraction", 1.0)),
                   "test_set": split, "model": protocol_label(m["model"], m.get("protocol", "samfit")),
                   "protocol": m.get("protocol", "samfit"), "image_size": m["image_size"], "seed": m["seed"],
                   "headline": m["headline"]["metric"], "lower_is_better": m["headline"]["lower_is_better"],
                   "trainable": m["params"]["trainable"], "encoder_trainable": m["params"]["encoder_trainable"],
                   "percent_of_sam": m["params"]["percent_of_sam"],
                   "train_img_per_s": m["throughput"]["train_img_per_s"],
                   "step_time_s": m["throughput"]["step_time_s"], "eval_img_per_s": m["throughput"]["eval_img_per_s"],
                   "peak_memory_mb": m["peak_memory_mb"], "device": m["device"],
                   "path": str(path.parent.resolve()), "per_image": (path.parent / PER_IMAGE).is_file(),
                   "train_fraction": m.get("train_fraction", 1.0),
                   "selection_value": (m.get("selection") or {}).get("value")}  # the validation score
            row.update({k: v for k, v in scores.items() if isinstance(v, (int, float))})
            rows.append(row)
    if not rows:
        raise SamfitError(f"No runs under {root} (no metrics.json found). Run `samfit run ... --out {root}` first.")
    return pd.DataFrame(rows)


def with_evals(runs: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """`runs` plus one row per run, evaluation (RUN/eval/<name>.json) and split: the run's identity, parameters
    and speed, the evaluation's scores, dataset '<trained on>→<name>' (so runs trained on different datasets are
    never averaged together) and the evaluation's headline metric. With `metric`, evaluations without it are
    left out."""
    rows = []
    for _, run in runs.drop_duplicates(subset="path").iterrows():
        for path in sorted((Path(run["path"]) / "eval").glob("*.json")):
            try:
                e = json.loads(path.read_text())
                head, scores = e["headline"], e["scores"]
            except (json.JSONDecodeError, OSError, KeyError, TypeError) as exc:
                raise SamfitError(f"Unreadable evaluation {path} ({type(exc).__name__}: {exc}). Delete it or "
                                  f"write it again with `samfit evaluate {run['path']} --dataset ... --name "
                                  f"{path.stem}`.") from None
            for split, values in scores.items():
                row = {k: run[k] for k in IDENTITY}
                row.update(dataset=f"{run['dataset']}{EVAL_MARK}{path.stem}", test_set=split,
                           headline=head["metric"], lower_is_better=head["lower_is_better"], per_image=False)
                row.update({k: v for k, v in values.items() if isinstance(v, (int, float))})
                if metric is None or isinstance(row.get(metric), (int, float)):
                    rows.append(row)
    if not rows:
        which = f" with metric '{metric}'" if metric else ""
        raise SamfitError(f"No `samfit evaluate` results{which} in these runs (no RUN/eval/<name>.json). Score a "
                          f"run first with `samfit evaluate RUN --dataset NAME|FOLDER|CSV`, or drop --eval.")
    return pd.concat([runs, pd.DataFrame(rows)], ignore_index=True)


def fraction_label(dataset: str, fraction: float) -> str:
    """A dataset as tables, comparisons and plots key it: with the share of train when below 1
    ('polyp@f0.25'), so runs on different fractions are never averaged or paired together."""
    return dataset if fraction >= 1 else f"{dataset}@f{fraction:g}"


def protocol_label(model: str, protocol: str) -> str:
    """A run's model as reports key it: with its protocol when that is not samfit's ('vit_h (official)'), so runs
    of the two recipes are never averaged, paired or ranked together, and a table mixing them marks each row."""
    return model if protocol == "samfit" else f"{model} ({protocol})"


def model_of(label: str) -> str:
    """The model of a report's model label: 'vit_h (official)' -> 'vit_h' (protocol_label's inverse)."""
    return label.split(" (", 1)[0]


def run_setting(run_dir: str | Path, key: str):
    """One setting of a run: from its config.yaml, else metrics.json, else RunConfig's default (a setting newer
    than the run). `method_args.KEY` reads one method argument."""
    import yaml

    from samfit.config import RunConfig

    run_dir = Path(run_dir)
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    if not saved:
        try:
            saved = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
    if key.startswith("method_args."):
        args = saved.get("method_args") or {}
        return args.get(key.partition(".")[2], "default") if isinstance(args, dict) else "default"
    if key in saved:
        return saved[key]
    defaults = RunConfig.__dataclass_fields__
    if key not in defaults:
        raise SamfitError(f"--select {key}: not a run setting.")
    return defaults[key].default


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
