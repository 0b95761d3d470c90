"""Grid files: many runs from one YAML file, and the state of each of those runs on disk.

A grid file (see benchmarks/paper.yaml)::

    name: paper                 # optional; the default output folder is results/<name>
    out: results/paper          # optional; `samfit grid --out` wins
    defaults:                   # any RunConfig field, for every run
      model: vit_h
      image_size: 1024
    axes:                       # the runs are the cartesian product of these lists (last axis varies fastest)
      method: [lora, conv-lora]
      dataset: [isic2017, sbu]
      seed: [0, 1, 2]
    overrides:                  # axis -> value -> RunConfig fields, for the runs having that value
      dataset:
        sbu: {batch_size: 2}
    exclude:                    # optional: drop the runs matching every key of one entry
      - {method: conv-lora, dataset: sbu}
    select: [lr]                # optional: axes `samfit table/compare` select per method, dataset and seed on
                                # the validation headline metric instead of showing (samfit/report/select.py)

Precedence, lowest first: RunConfig defaults < the dataset's defaults in datasets.yaml (they fill only the
fields still unset: image_size, epochs, lr, loss) < `defaults` < `overrides` (in the order of `axes`, so an
override on a later axis wins over one on an earlier axis) < the axis values < `samfit grid --set KEY=VALUE`.
Values replace, they never merge (a `method_args` override replaces the whole dict).

An axis may also run over one method argument, `method_args.KEY: [...]` (e.g. `method_args.blocks: [all,
"last:3"]` for placement); its value joins the run's other method arguments.

Every run gets a stable folder name: RunConfig.run_name() (`dataset_method[@placement]_model_size_sSEED`) plus
`_KEY-VALUE` for each other axis.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from samfit.config import FIELDS, RunConfig, check_keys, coerce
from samfit.engine import rundir
from samfit.errors import SamfitError, closest

TOP_KEYS = ("name", "description", "out", "defaults", "axes", "overrides", "exclude", "select")
NAMED_AXES = ("dataset", "method", "model", "image_size", "seed", "method_args.blocks",  # in RunConfig.run_name()
              "train_fraction", "protocol", "decoder")
METHOD_ARG = "method_args."  # an axis over one method argument, e.g. `method_args.blocks: [all, "last:3"]`
RESERVED = ("name", "out")  # set by the grid itself
IGNORED_IN_COMPARISON = ("out",)  # a run folder is identified by where it is, not by the path used to reach it


@dataclass
class Grid:
    name: str
    path: Path
    out: str | None
    runs: list[RunConfig]  # resolved (dataset defaults filled in), with `name` set
    axes: dict[str, list]
    description: str = ""
    select: list = field(default_factory=list)  # axes `samfit table/compare` select on validation, not show


@dataclass
class PlannedRun:
    """One run of a grid and what is on disk for it."""

    config: RunConfig
    state: str  # new | done | partial | failed | changed | busy
    detail: str = ""
    attempts: int = 0
    error: str | None = None
    seconds: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out) / self.config.name


def _check_keys(where: str, mapping, allowed, kind: str = "setting") -> None:
    if not isinstance(mapping, dict):
        raise SamfitError(f"{where} must be a mapping of {kind}s, got {type(mapping).__name__}.")
    for key in mapping:
        if key not in allowed:
            raise SamfitError(f"{where}: unknown {kind} '{key}'.{closest(str(key), allowed)} "
                              f"Valid: {', '.join(allowed)}.")


def _check_settings(where: str, settings, axes=()) -> dict:
    settings = check_keys(where, settings or {})
    for key in settings:
        if key in RESERVED:
            raise SamfitError(f"{where}: '{key}' is set by the grid (use the grid's top-level `out:` or "
                              f"`samfit grid --out`; run names are derived from the axes).")
        if key in axes:
            raise SamfitError(f"{where}: '{key}' is an axis of this grid; list its values under `axes` instead.")
    return settings


def load_grid(path: str | Path, out: str | None = None, overrides: dict | None = None) -> Grid:
    """Read and validate a grid file and expand it into resolved RunConfigs with stable names."""
    from samfit.data import resolve_dataset

    path = Path(path)
    if not path.is_file():
        raise SamfitError(f"Grid file not found: {path}. The shipped grids are benchmarks/paper.yaml and "
                          f"benchmarks/smoke.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SamfitError(f"{path} is not valid YAML: {exc}") from None
    _check_keys(str(path), data, TOP_KEYS, "top-level key")
    axes = data.get("axes") or {}
    _check_keys(f"{path}: axes", {k: v for k, v in axes.items() if not str(k).startswith(METHOD_ARG)}, FIELDS,
                "axis")
    if not axes:
        raise SamfitError(f"{path}: `axes` is empty; list at least one axis, e.g. `method: [lora, conv-lora]`.")
    for key, values in axes.items():
        if key in RESERVED:
            raise SamfitError(f"{path}: '{key}' cannot be an axis (the grid sets it).")
        if not isinstance(values, list) or not values:
            raise SamfitError(f"{path}: axis '{key}' must be a non-empty list, got {values!r}.")
        if any(isinstance(v, (dict, list)) for v in values):
            raise SamfitError(f"{path}: axis '{key}' values must be plain values (names or numbers); put "
                              f"structured settings under `overrides`.")
        if len(set(map(str, values))) != len(values):
            raise SamfitError(f"{path}: axis '{key}' lists a value twice: {values}.")
        if not key.startswith(METHOD_ARG):  # a method argument's values are checked by the method's Config
            axes[key] = [coerce(key, v, f"{path}: axis ") for v in values]
    defaults = _check_settings(f"{path}: defaults", data.get("defaults"), axes)
    per_axis = data.get("overrides") or {}
    _check_keys(f"{path}: overrides", per_axis, list(axes), "axis")
    by_value: dict[str, dict[str, dict]] = {key: {} for key in axes}  # axis -> str(axis value) -> settings
    for key, table in per_axis.items():
        if not isinstance(table, dict):
            raise SamfitError(f"{path}: overrides.{key} must map values of axis '{key}' to settings.")
        for value, settings in table.items():
            match = [v for v in axes[key] if str(v) == str(value) or v == coerce(key, value, f"{path}: overrides ")]
            if not match:
                raise SamfitError(f"{path}: overrides.{key}.{value}: '{value}' is not a value of axis '{key}' "
                                  f"({', '.join(map(str, axes[key]))}).")
            by_value[key][str(match[0])] = _check_settings(f"{path}: overrides.{key}.{value}", settings, axes)
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list):
        raise SamfitError(f"{path}: `exclude` must be a list of partial runs, e.g. - {{method: lst, dataset: sbu}}.")
    for i, rule in enumerate(exclude):
        _check_keys(f"{path}: exclude[{i}]", rule, list(axes), "axis")
    cli = _check_settings("--set", overrides or {}, axes)
    select = data.get("select") or []
    if not isinstance(select, list) or any(k not in axes or k in ("method", "dataset", "seed") for k in select):
        raise SamfitError(f"{path}: `select` must list axes of this grid other than method, dataset and seed "
                          f"(e.g. select: [lr]), got {select!r}.")

    out_dir = out or data.get("out") or str(Path("results") / (data.get("name") or path.stem))
    out_dir = str(Path(out_dir).expanduser().resolve())
    runs, names, specs = [], {}, {}
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo))
        if any(all(str(point[k]) == str(v) for k, v in rule.items()) for rule in exclude):
            continue
        settings = dict(defaults)
        for key in axes:
            settings.update(by_value[key].get(str(point[key]), {}))
        for key, value in point.items():
            if key.startswith(METHOD_ARG):
                settings["method_args"] = {**settings.get("method_args", {}), key[len(METHOD_ARG):]: value}
            else:
                settings[key] = value
        settings.update(cli)
        where = ", ".join(f"{k}={v}" for k, v in point.items())
        try:
            cfg = RunConfig(**settings)
            key = (cfg.dataset, cfg.datasets_file)
            spec = specs[key] if key in specs else specs.setdefault(key, resolve_dataset(*key))
            cfg = cfg.resolved(spec)
        except SamfitError as exc:
            raise SamfitError(f"{path}: run ({where}): {exc}") from None
        suffix = "".join(f"_{k.removeprefix(METHOD_ARG)}-{point[k]}" for k in axes if k not in NAMED_AXES)
        name = cfg.run_name() + suffix
        if name in names:
            raise SamfitError(f"{path}: runs ({names[name]}) and ({where}) would both write {name}. Make them "
                              f"differ in an axis (e.g. give datasets distinct names).")
        names[name] = where
        runs.append(dataclasses.replace(cfg, name=name, out=out_dir))
    if not runs:
        raise SamfitError(f"{path}: every run is excluded; nothing to do.")
    return Grid(name=data.get("name") or path.stem, path=path, out=out_dir, runs=runs, axes=axes,
                description=data.get("description", ""), select=list(select))


def comparable(config: dict) -> dict:
    """A config as compared with a run folder's config.yaml: a field missing from an older config.yaml has its
    default (it did not exist when that run was made), fields no longer in RunConfig and `out` are left out."""
    full = {**RunConfig().to_dict(), **{k: v for k, v in config.items() if k in FIELDS}}
    return {k: v for k, v in full.items() if k not in IGNORED_IN_COMPARISON}


JobAlive = Callable[[str, "str | None"], bool]  # (job id, cluster) -> whether the scheduler still has the job


def inspect(cfg: RunConfig, job_alive: JobAlive | None = None) -> PlannedRun:
    """What is on disk for this run: done, partial (resumable), failed, changed (other settings), busy, new.
    `job_alive` answers for runs a scheduler holds (status "submitted"); the SLURM launcher passes its own."""

    folder = Path(cfg.out) / cfg.name
    config_file = folder / "config.yaml"
    owner = rundir.lock_owner(folder)
    if owner is not None:
        alive = rundir.owner_alive(*owner)
        if alive or alive is None:
            return PlannedRun(cfg, "busy", f"locked by process {owner[1]} on {owner[0]}")
    status = rundir.read_status(folder)
    if status.get("status") == "submitted" and job_alive is not None:
        if job_alive(str(status.get("job_id")), status.get("cluster")):
            return PlannedRun(cfg, "busy", f"queued or running as job {status.get('job_id')}")
    if not config_file.is_file():
        return PlannedRun(cfg, "new")
    try:
        saved = yaml.safe_load(config_file.read_text()) or {}
    except (yaml.YAMLError, OSError):
        saved = {}
    old, new = comparable(saved), comparable(cfg.to_dict())
    if old != new:
        return PlannedRun(cfg, "changed", "settings differ: " + ", ".join(
            f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(new) if old[k] != new[k]))
    if (folder / "metrics.json").is_file():
        return PlannedRun(cfg, "done")
    has_ckpt = (folder / "checkpoints" / "last.pt").is_file()
    if status.get("status") == "failed":
        return PlannedRun(cfg, "failed", status.get("error") or "", error=status.get("error"))
    return PlannedRun(cfg, "partial", "resumes from checkpoints/last.pt" if has_ckpt else "restarts (no checkpoint)")


def plan(grid: Grid, job_alive: JobAlive | None = None) -> list[PlannedRun]:
    return [inspect(cfg, job_alive) for cfg in grid.runs]


def preflight(runs: list[RunConfig]) -> None:
    """Before launching anything: every dataset is prepared (synthetic ones are generated here, once, not by
    concurrent workers) and every SAM checkpoint is there. Raises SamfitError naming what is missing."""
    from samfit.data import ensure_available, resolve_dataset
    from samfit.model.backbones import get_backbone, resolve_checkpoint

    problems, seen = [], set()
    for cfg in runs:
        key = ("data", cfg.dataset, cfg.datasets_file, cfg.data_root)
        if key not in seen:
            seen.add(key)
            try:
                ensure_available(resolve_dataset(cfg.dataset, cfg.datasets_file), cfg.data_root)
            except SamfitError as exc:
                problems.append(str(exc))
        key = ("model", cfg.model, cfg.checkpoint)
        if get_backbone(cfg.model).has_weights and key not in seen:
            seen.add(key)
            try:
                resolve_checkpoint(cfg.model, cfg.checkpoint)
            except SamfitError as exc:
                problems.append(str(exc))
    if problems:
        raise SamfitError("The grid cannot start:\n\n" + "\n\n".join(problems))


SHOWN = ("method", "dataset", "model", "image_size", "epochs", "lr", "batch_size", "effective_batch", "seed", "loss")


def other_settings(cfg: RunConfig) -> str:
    """Settings that differ from RunConfig's defaults and are not in a column of the listing."""
    base = RunConfig().to_dict()
    skip = set(SHOWN) | {"name", "out"}
    return " ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if k not in skip and v != base[k])


def write_summary(out_dir: str | Path, grid: Grid, runs: list[PlannedRun]) -> Path:
    """<out>/grid.json: each run's state, attempts, error and duration in the last `samfit grid` call."""

    path = Path(out_dir) / "grid.json"
    rundir.write_json(path, {
        "grid": str(grid.path), "name": grid.name, "select": grid.select,
        "runs": [{"name": r.name, "state": r.state, "attempts": r.attempts, "error": r.error,
                  "seconds": r.seconds, **r.extra} for r in runs],
    })
    return path


def config_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict())
