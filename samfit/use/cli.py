"""The commands that use a trained run: `samfit predict`, `samfit evaluate`, `samfit export` (registered on
samfit's Typer app by `register`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from samfit.config import allowed_values
from samfit.errors import SamfitError

console = Console()
err = Console(stderr=True)
DEVICES = " | ".join(allowed_values("device"))
PRECISIONS = " | ".join(allowed_values("precision"))


def _check_choice(option: str, value: str, key: str) -> None:
    if value not in allowed_values(key):
        raise SamfitError(f"{option} {value!r}: choose one of {', '.join(allowed_values(key))}.")


def predict(
    run: Path = typer.Argument(..., help="A finished run folder (holding config.yaml, metrics.json, checkpoints/), "
                                         "or its `samfit export --format adapter` file."),
    images: List[str] = typer.Argument(..., help="Image folders, files or glob patterns (quoted)."),
    out: Path = typer.Option(..., "--out", help="Folder for masks/ (and overlays/, probabilities/); never among "
                                                "the inputs."),
    threshold: float = typer.Option(0.5, help="Binary: a pixel is foreground where its probability exceeds this."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write overlays/<stem>.jpg: the mask over the image."),
    probabilities: bool = typer.Option(False, "--probabilities",
                                       help="Also write probabilities/<stem>.png, 16-bit (p · 65535)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per forward pass (default: the run's)."),
    device: str = typer.Option("auto", help=DEVICES),
    precision: str = typer.Option("auto", help=f"{PRECISIONS} (auto: fp16 on CUDA, fp32 on CPU)."),
    image_size: Optional[int] = typer.Option(None, help="Input size (default: the run's; positions interpolated)."),
):
    """Segment new images with a trained run: one mask PNG per image, at the image's own size."""
    from samfit.use.images import check_output_folder, collect_images
    from samfit.use.load import load_run
    from samfit.use.predict import predict_images

    _check_choice("--precision", precision, "precision")
    files, roots = collect_images(images)
    target = check_output_folder(out, roots, files)
    model = load_run(run, device=device, image_size=image_size)
    summary = predict_images(model, files, target, threshold=threshold, overlay=overlay,
                             probabilities=probabilities, batch_size=batch_size, precision=precision, console=err)
    for path, why in summary.skipped:
        err.print(f"[yellow]skipped[/] {path}: {why}", highlight=False)
    skipped = f"; {len(summary.skipped)} skipped" if summary.skipped else ""
    if not summary.written:
        raise SamfitError(f"No image could be read ({len(summary.skipped)} given, all unreadable): nothing was "
                          f"written. Check that the inputs are PNG/JPEG/TIFF/BMP images.")
    console.print(f"[green]wrote[/] {len(summary.written)} mask(s) to {target / 'masks'}{skipped}", highlight=False)


def evaluate(
    run: Path = typer.Argument(..., help="A finished run folder."),
    dataset: str = typer.Option(..., "--dataset", help="Registry name, a folder in the canonical layout, or a CSV "
                                                       "of image,label pairs."),
    split: Optional[List[str]] = typer.Option(None, "--split", help="Split(s) to score (default: the dataset's "
                                                                    "test splits). Repeatable."),
    name: Optional[str] = typer.Option(None, help="Result name: RUN/eval/<name>.json (default: the dataset's)."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N images of each split."),
    batch_size: Optional[int] = typer.Option(None, help="Images per forward pass (default: the run's)."),
    device: str = typer.Option("auto", help=DEVICES),
    precision: str = typer.Option("auto", help=PRECISIONS),
    datasets_file: Optional[str] = typer.Option(None, help="Extra dataset registry (YAML)."),
    data_root: Optional[str] = typer.Option(None, help="Data root (default: $SAMFIT_DATA)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="box: SAM's own promptable decoder, one box per "
                                          "ground-truth object, on the adapted and on plain SAM's encoder (vit_*; "
                                          "medsam_vit_b through MedSAM's own inference path; sam2_hiera_* "
                                          "through SAM2ImagePredictor)."),
):
    """Score a finished run on another dataset or test folder: RUN/eval/<name>.json (metrics.json untouched)."""
    from samfit.use.evaluate import evaluate_run, headline_line

    _check_choice("--precision", precision, "precision")
    path = evaluate_run(run, dataset, split, name=name, datasets_file=datasets_file, data_root=data_root,
                        batch_size=batch_size, device=device, precision=precision, limit=limit, console=err,
                        prompts=prompts)
    console.print(f"[green]wrote[/] {path}: {headline_line(path)}", highlight=False)


def export(
    run: Path = typer.Argument(..., help="A finished run folder."),
    out: Path = typer.Option(..., "--out", help="The file to write (.pth/.pt for sam, .safetensors for adapter)."),
    fmt: str = typer.Option("sam", "--format", help="sam: a plain SAM checkpoint, the method merged (mergeable "
                                                    "methods; a SAM 2 run: its SAM 2.1 file for sam2's build_sam2) "
                                                    "| adapter: the trained parameters only (safetensors)."),
):
    """Export a run: a checkpoint segment_anything (SAM 2 runs: sam2) loads as official weights, or the trained
    parameters."""
    from samfit.use.export import export_run

    path = export_run(run, out, fmt)
    console.print(f"[green]wrote[/] {path} ({path.stat().st_size / 2**20:.1f} MB)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the commands to samfit's command line."""
    app.command()(predict)
    app.command()(evaluate)
    app.command()(export)
