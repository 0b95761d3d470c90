"""`samfit data prepare | check | download`: datasets from their official downloads to the canonical layout."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

data_app = typer.Typer(no_args_is_help=True, help="Datasets: prepare official downloads, check, download.")
console = Console()
err = Console(stderr=True)


@data_app.command("prepare")
def data_prepare(
    name: str = typer.Argument(..., help="Dataset name (datasets.yaml)."),
    source: List[Path] = typer.Option(..., "--source", help="Official zip(s) or unpacked folder."),
    data_root: Optional[str] = typer.Option(None, help="Data root (default: $SAMFIT_DATA)."),
):
    """Convert an official download into samfit's canonical layout under the data root."""
    from samfit.data.prepare import prepare_dataset
    from samfit.data.registry import data_root as root_of

    from samfit.data.registry import ensure_available, missing_tests_note, resolve_dataset

    folder = prepare_dataset(name, source if len(source) > 1 else source[0], root_of(data_root))
    spec = resolve_dataset(name)
    ensure_available(spec, data_root)  # which of the dataset's test sets the download held
    if spec.missing_tests:
        err.print(f"[yellow]{missing_tests_note(spec)}", highlight=False)
    console.print(f"[green]prepared[/] {folder}; check it with `samfit data check {name}`")


@data_app.command("check")
def data_check(
    name: str = typer.Argument(..., help="Dataset name, or a folder in the canonical layout."),
    data_root: Optional[str] = typer.Option(None, help="Data root (default: $SAMFIT_DATA)."),
    datasets_file: Optional[str] = typer.Option(None, help="Extra dataset registry (YAML)."),
):
    """Check a prepared dataset: pairs, readability, sizes, mask values; a table per split."""
    from samfit.data.check import check_dataset, render_reports
    from samfit.data.registry import ensure_available, resolve_dataset

    spec = resolve_dataset(name, datasets_file)
    folder = ensure_available(spec, data_root)  # generates synthetic sets; explains how to get real ones
    splits = [s for s in [spec.train, spec.val, *spec.eval_splits] if s] if spec.root is None else None
    if spec.missing_tests:
        from samfit.data.registry import missing_tests_note

        err.print(f"[yellow]{missing_tests_note(spec)}", highlight=False)
    reports = check_dataset(folder, spec.classes, spec.task, splits=splits, progress=True)
    rendered = render_reports(reports)
    for item in rendered if isinstance(rendered, (list, tuple)) else [rendered]:
        console.print(item)
    console.print(f"[green]{spec.name}: every split is consistent.")


@data_app.command("download")
def data_download(
    name: str = typer.Argument(..., help="Dataset name with direct public URLs (datasets.yaml `downloads`)."),
    data_root: Optional[str] = typer.Option(None, help="Data root (default: $SAMFIT_DATA)."),
):
    """Download a dataset's official archives (verified, resumable), then prepare them."""
    from samfit.data.registry import data_root as root_of
    from samfit.data.registry import resolve_dataset
    from samfit.download import download_dataset

    folder = download_dataset(name, resolve_dataset(name), root_of(data_root))
    console.print(f"[green]prepared[/] {folder}")
