"""Score a finished run on another dataset or test folder (transfer), with the run's own evaluation protocol.

Written to RUN/eval/<name>.json (scores per split, images scored, protocol) and RUN/eval/<name>_images.csv (one
row per image: binary IoU and Dice, multi-class pixel accuracy, then the per-image scores and sufficient
statistics of a run's per_image.csv); the run's metrics.json is never touched.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from samfit.errors import SamfitError


def _available_splits(spec, folder: Path) -> list[str]:
    if spec.csv:
        return sorted(spec.csv)
    return sorted(p.name for p in folder.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir())


def evaluate_run(run_dir, dataset: str, splits: list[str] | None = None, name: str | None = None,
                 datasets_file: str | None = None, data_root: str | None = None, batch_size: int | None = None,
                 device: str = "auto", precision: str = "auto", limit: int | None = None,
                 console: Console | None = None, prompts: str | None = None) -> Path:
    """Score the run on `dataset` (a registry name, a canonical folder or a CSV); returns the JSON's path.
    `prompts="box"`: SAM's promptable decoder on the adapted and on plain SAM's encoder (samfit/use/promptable.py),
    written to <name>.json (default name: '<dataset>_box')."""
    from samfit.data import SegmentationFolder, ensure_available, resolve_dataset, split_pairs
    from samfit.engine import rundir
    from samfit.engine.evaluate import make_evaluator, per_image_rows, predict_batches, score_at
    from samfit.engine.step import autocast_for, pick_device, resolve_precision
    from samfit.use.load import load_run, read_run
    from samfit.use.promptable import PROMPTS, evaluate_prompts

    run_dir = Path(run_dir).expanduser()
    if run_dir.is_file():
        raise SamfitError(f"{run_dir} is a file (an adapter?), but evaluate writes RUN/eval/<name>.json into a run "
                          f"folder. Give the run folder; to segment images with the file, use `samfit predict "
                          f"{run_dir} IMAGES --out DIR`.")
    if prompts is not None and prompts not in PROMPTS:
        raise SamfitError(f"--prompts {prompts!r}: choose {', '.join(PROMPTS)} (one box per ground-truth object), "
                          f"or leave it out to score the run's own decoder.")
    record = read_run(run_dir)
    model = None if prompts else load_run(run_dir, device=device, merge=True)  # plain SAM's inference cost
    spec = resolve_dataset(dataset, datasets_file)
    if spec.num_classes != record.num_classes:
        kind = "binary" if record.num_classes == 1 else f"{record.num_classes} classes"
        raise SamfitError(
            f"Run {run_dir} segments {kind}, but dataset '{spec.name}' is {spec.task} with {len(spec.classes)} "
            f"classes ({', '.join(spec.classes)}). Evaluate it on a dataset of the same task and classes.")
    name = name or (f"{spec.name}_{prompts}" if prompts else spec.name)
    if not name or "/" in name or name.startswith("."):
        raise SamfitError(f"--name {name!r}: give a plain file name (no '/', not starting with '.').")
    folder = ensure_available(spec, data_root)
    available = _available_splits(spec, folder)
    splits = list(splits or spec.eval_splits)
    for split in splits:
        if split not in available:
            raise SamfitError(f"Dataset '{spec.name}' has no split '{split}' (in {folder}). Available: "
                              f"{', '.join(available) or 'none'}; pass one with --split.")
    if batch_size is not None and batch_size < 1:
        raise SamfitError(f"--batch-size {batch_size}: must be >= 1.")
    if limit is not None and limit < 1:
        raise SamfitError(f"--limit {limit}: must be >= 1.")
    cfg = dataclasses.replace(record.config, batch_size=batch_size or record.config.batch_size, num_workers=0)
    scores, rows, counts, meta = {}, [], {}, {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console or Console(stderr=True), transient=True,
                  disable=console is None) as progress:
        if prompts:
            scores, rows, counts, meta = evaluate_prompts(record, spec, folder, splits, device, limit, progress)
            spec = dataclasses.replace(spec, headline="iou", lower_is_better=False)
        else:
            dev = next(model.parameters()).device
            autocast = autocast_for(precision, dev)[0]
        for split in ([] if prompts else splits):
            data = SegmentationFolder(split_pairs(spec, folder, split), cfg.image_size, spec.task, spec.num_classes,
                                      limit=limit, model=cfg.model)
            evaluator = make_evaluator(spec)
            task = progress.add_task(f"evaluate {spec.name}/{split}", total=len(data))
            split_rows = []
            for index, s in predict_batches(model, data, list(range(len(data))), cfg.batch_size, dev, autocast):
                pred, gt = score_at(s, data.gt(index), cfg.eval_resolution, cfg.image_size)
                evaluator.update(pred, gt)
                row = {"split": split, "image": str(data.pairs[index][0])}
                if spec.task == "binary":
                    row.update(iou=evaluator.iou[-1], dice=evaluator.dice[-1])
                else:
                    known = gt != 255
                    row["pixel_accuracy"] = float((pred[known] == gt[known]).mean()) if known.any() else None
                split_rows.append(row)
                progress.advance(task)
            for row, stats in zip(split_rows, per_image_rows(evaluator, spec, data, list(range(len(data))))):
                row.update({k: v for k, v in stats.items() if k != "image"})  # what pooled metrics sum, too
            rows += split_rows
            result = evaluator.compute()
            if "iou_per_class" in result:
                result["iou_per_class"] = dict(zip(spec.classes, result["iou_per_class"]))
            scores[split], counts[split] = result, len(data)
    out = run_dir / "eval" / f"{name}.json"
    import pandas as pd

    rundir.write_text(out.with_name(f"{name}_images.csv"), pd.DataFrame(rows).to_csv(index=False))
    dev = next(model.parameters()).device if model is not None else pick_device(device)
    rundir.write_json(out, {
        "run": record.config.run_name(), "dataset": spec.name, "prompts": prompts, "source": str(dataset),
        "task": spec.task,
        "headline": {"metric": spec.headline, "lower_is_better": spec.lower_is_better,
                     "value": scores[splits[0]].get(spec.headline), "split": splits[0]},
        "scores": scores, "images": counts, "eval_resolution": "image" if prompts else cfg.eval_resolution,
        "image_size": 1024 if prompts else cfg.image_size, "device": str(dev),
        "precision": "fp32" if prompts else resolve_precision(precision, dev),
        "merged": _mergeable(record.config) if prompts else model.merged,  # folded into SAM's weights first
        **meta,  # --prompts: the pipeline (SamPredictor, MedSAM_Inference, SAM2ImagePredictor), each column's decoder
        "per_image": out.with_name(f"{name}_images.csv").name})
    return out


def _mergeable(cfg) -> bool:
    from samfit.methods import get_method

    return get_method(cfg.method, **cfg.method_args).mergeable


def headline_line(path: Path) -> str:
    """'<metric> on <split> = <value>' from an evaluation JSON."""
    from samfit.engine.rundir import read_json

    result = read_json(path)
    head = result["headline"]
    value = head["value"]
    line = f"{head['metric']} on {head['split']} = {value:.4f}" if isinstance(value, float) else str(head)
    if result.get("prompts"):  # say which decoder each number went through
        scores = result["scores"][head["split"]]
        sam = {"MedSAM_Inference": "MedSAM", "SAM2ImagePredictor": "SAM 2"}.get(result.get("pipeline"), "SAM")
        line += (f" (adapted encoder, {sam}'s original decoder); plain {sam} {scores['sam_iou']:.4f} "
                 f"(change {scores['iou_change']:+.4f}); adapted encoder with the run's trained decoder parts "
                 f"(the exported checkpoint) {scores['tuned_iou']:.4f}")
    return line


__all__ = ["evaluate_run", "headline_line"]
