"""samfit's command line (Typer). Thin: parse options, call the library, print with rich."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from samfit.config import allowed_values
from samfit.data.cli import data_app
from samfit.errors import SamfitError
from samfit.options import with_run_options

MODELS = " | ".join(allowed_values("model"))

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark parameter-efficient fine-tuning methods for the Segment Anything Model.")
weights_app = typer.Typer(no_args_is_help=True, help="SAM checkpoints.")
app.add_typer(weights_app, name="weights")
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)


@app.command()
@with_run_options
def run(
    settings: dict,
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of run settings (flags given win)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    print_config: bool = typer.Option(False, "--print-config",
                                      help="Print the resolved settings as YAML and exit without training."),
    nproc: int = typer.Option(1, "--nproc", help="Train on N processes (GPUs) with torchrun; the batch is global."),
):
    """Fine-tune SAM with one method on one dataset, evaluate, and write a run folder.

    Settings, lowest precedence first: samfit's defaults < the dataset's (datasets.yaml) < --config < flags."""
    from samfit.config import make_config

    cfg = make_config(config, **settings)
    if print_config:
        import yaml

        from samfit.data import resolve_dataset

        resolved = cfg.resolved(resolve_dataset(cfg.dataset, cfg.datasets_file))
        sys.stdout.write(yaml.safe_dump(resolved.to_dict(), sort_keys=False))
        return
    if nproc > 1:
        from samfit.engine.distributed import launch

        raise typer.Exit(launch(nproc, sys.argv[1:]))
    from samfit.engine.train import run as run_training

    run_dir = run_training(cfg, resume=resume)
    from samfit.engine.distributed import is_main_process

    if not is_main_process():
        return
    metrics = json.loads((run_dir / "metrics.json").read_text())
    head = metrics["headline"]
    console.print(f"[bold green]done[/] {run_dir}: {head['metric']} on {head['split']} = {head['value']:.4f}, "
                  f"{metrics['params']['trainable']:,} trainable parameters, "
                  f"{metrics['throughput']['train_img_per_s']:.2f} train img/s, "
                  f"peak memory {metrics['peak_memory_mb']:.0f} MB")


@app.command()
def table(
    folder: Path = typer.Argument(..., help="Folder of run folders."),
    fmt: str = typer.Option("rich", "--format", help="rich | markdown | csv | latex | html"),
    metric: Optional[str] = typer.Option(None, help="Metric to show instead of each dataset's headline."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the table to this file."),
    paper: bool = typer.Option(False, "--paper", help="Add the paper's published numbers and the difference."),
    reference: Optional[Path] = typer.Option(None, help="Published numbers CSV (default: benchmarks/paper_reference.csv)."),
    baseline: Optional[str] = typer.Option(None, help="Mark cells significantly better/worse than this method."),
    select: Optional[List[str]] = typer.Option(None, "--select", help="Keep per method, dataset and seed the "
                                               "value of this setting (e.g. lr) best on validation."),
    evals: bool = typer.Option(False, "--eval", help="Add `samfit evaluate`'s scores (RUN/eval/*.json) as columns."),
):
    """Summarise run folders: methods × datasets, headline metric mean ± std over seeds."""
    from samfit.report import collect_runs, comparison_grid, render, summarise
    from samfit.report.cli import marks_for
    from samfit.report.select import apply_select
    from samfit.report.collect import with_evals

    runs = apply_select(collect_runs(folder), [folder], select, lambda text: err.print(text, highlight=False))
    summary = summarise(with_evals(runs, metric) if evals else runs, metric)
    marks, legend = marks_for(runs, baseline, metric) if baseline else ({}, None)
    grid = comparison_grid(summary, marks)
    if paper:
        from samfit.report.paper import add_paper, load_reference

        grid, notes = add_paper(grid, summary, load_reference(reference), runs=runs)
        for note in notes:
            err.print(f"paper: {note}", highlight=False)
    if fmt == "rich":
        t = Table(title=f"samfit results in {folder}", caption=legend)
        for col in grid.columns:
            t.add_column(str(col))
        for _, row in grid.iterrows():
            t.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row))
        console.print(t)
        text = None
    else:
        text = render(grid, fmt) + (f"\n\n{legend}" if legend and fmt == "markdown" else "")
        if legend and fmt != "markdown":
            err.print(legend, highlight=False)
    if text is not None:
        if output:
            from samfit.engine.rundir import write_text

            write_text(output, text)
            console.print(f"wrote {output}")
        else:
            sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))


@app.command()
def plot(
    folder: Path = typer.Argument(..., help="Folder of run folders."),
    out: Optional[Path] = typer.Option(None, help="Where to write the PNGs (default: FOLDER/plots)."),
    metric: Optional[str] = typer.Option(None, help="Metric to plot instead of each dataset's headline."),
):
    """PNG plots per dataset: the metric against trainable parameters and against step time."""
    from samfit.report import collect_runs, summarise
    from samfit.report.plot import plot_summary

    for path in plot_summary(summarise(collect_runs(folder), metric), out or folder / "plots"):
        console.print(f"wrote {path}", highlight=False)


@app.command()
def grid(
    file: Path = typer.Argument(..., help="Grid file, e.g. benchmarks/paper.yaml or benchmarks/smoke.yaml."),
    out: Optional[str] = typer.Option(None, help="Folder of the run folders (default: the file's `out`)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs, their settings and state; run nothing."),
    launcher: str = typer.Option("local", help="local (worker processes here) | slurm (submitit job array)."),
    jobs: Optional[int] = typer.Option(None, help="local: parallel runs (default: one per GPU, or 1 on CPU)."),
    gpus: Optional[str] = typer.Option(None, help="local: GPU indices, e.g. 0,1,2,3, or cpu (default: all)."),
    retries: int = typer.Option(1, help="Extra attempts for a failed run (resuming from its checkpoint)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE for every run (wins over the file)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo runs whose folder holds other settings."),
    partition: Optional[str] = typer.Option(None, help="slurm: partition."),
    time: int = typer.Option(24 * 60, "--time", help="slurm: time limit per run, minutes."),
    gpus_per_task: int = typer.Option(1, help="slurm: GPUs per run."),
    cpus_per_task: int = typer.Option(8, help="slurm: CPUs per run."),
    mem_gb: Optional[float] = typer.Option(64, help="slurm: memory per run, GB."),
    account: Optional[str] = typer.Option(None, help="slurm: account."),
    qos: Optional[str] = typer.Option(None, help="slurm: quality of service."),
    constraint: Optional[str] = typer.Option(None, help="slurm: node constraint (e.g. a100)."),
    array_parallelism: int = typer.Option(64, help="slurm: most runs at once."),
    slurm_setup: Optional[List[str]] = typer.Option(None, "--slurm-setup", help="slurm: shell line before each run."),
    slurm_arg: Optional[List[str]] = typer.Option(None, "--slurm-arg", help="slurm: any sbatch option KEY=VALUE."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="slurm: follow the jobs (and retry) or just submit."),
    slurm_cluster: Optional[str] = typer.Option(None, "--slurm-cluster", hidden=True,
                                                help="submitit executor: slurm (default) | local | debug."),
):
    """Run a grid of runs (methods × datasets × seeds ...): skips finished runs, resumes interrupted ones."""
    from samfit.launch import launch
    from samfit.launch.slurm import SlurmOptions

    from samfit.keyvalue import parse_pairs

    extra = parse_pairs(slurm_arg, "--slurm-arg", "exclude=node3")
    slurm = SlurmOptions(partition=partition, time_min=time, gpus_per_task=gpus_per_task, cpus_per_task=cpus_per_task,
                         mem_gb=mem_gb, account=account, qos=qos, constraint=constraint,
                         array_parallelism=array_parallelism, setup=list(slurm_setup or []), extra=extra,
                         cluster=slurm_cluster)
    launch(file, out=out, dry_run=dry_run, launcher=launcher, jobs=jobs, gpus=gpus, retries=retries,
           settings=set_, overwrite=overwrite, slurm=slurm, wait=wait, console=err)


def _listed(option: str, text: str, allowed) -> list[str]:
    """'a,b' -> ['a', 'b'], each one of `allowed`."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SamfitError(f"{option} {text!r}: give one or more of {', '.join(allowed)}, comma-separated.")
    return values


def _bench_methods(text: str) -> list[str]:
    import samfit

    if text.strip() == "none":
        return []
    names = samfit.list_methods() if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    for name in names:  # an unknown name or placement raises with a suggestion
        method, _, blocks = name.partition("@")
        samfit.get_method(method, **({"blocks": blocks} if blocks else {}))
    return names


@app.command()
def bench(
    methods: str = typer.Option("all", help="Comma-separated methods (a placement as lora@last:3), 'all', or "
                                            "'none' (with --data)."),
    model: str = typer.Option("vit_b", help=f"{MODELS} (random weights: speed and memory do not depend on them)."),
    image_size: int = typer.Option(256, help="Input size: a multiple of 16 (SAM) or 32 (SAM 2)."),
    batch: int = typer.Option(2, help="Images per forward pass."),
    effective_batch: Optional[int] = typer.Option(None, help="Images per optimiser step (accumulation; default: "
                                                             "--batch). A timed step is one optimiser step."),
    num_classes: int = typer.Option(1, help="1: binary (structure loss); >1: mask classification."),
    steps: int = typer.Option(10, help="Timed training steps and evaluation batches per configuration."),
    warmup: int = typer.Option(2, help="Untimed steps per configuration first."),
    baseline: str = typer.Option("lora", help="Method every ratio is to."),
    out: str = typer.Option("results/bench", help="Folder for bench.json, bench_meta.json, bench.md."),
    attention: str = typer.Option("sdpa", help=f"One or more of {', '.join(allowed_values('attention'))}, "
                                               "comma-separated."),
    precision: str = typer.Option("fp32", help=f"One or more of {', '.join(allowed_values('precision'))}, "
                                               "comma-separated."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Checkpoint every encoder block."),
    compare_grad_checkpoint: bool = typer.Option(False, "--compare-grad-checkpoint",
                                                 help="Measure every configuration with and without it."),
    cache: bool = typer.Option(False, "--cache", help="Train from what `samfit run` would cache for the model (the "
                                                      "prefix of a late placement, decoder-only's embeddings) where "
                                                      "it allows one; built before the timed steps."),
    compare_cache: bool = typer.Option(False, "--compare-cache", help="Measure every configuration with and "
                                                                      "without --cache."),
    device: str = typer.Option("auto", help=" | ".join(allowed_values("device"))),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Peak memory (a subprocess per row)."),
    data: Optional[str] = typer.Option(None, help="Also time the input pipeline on this dataset's training split."),
    num_workers: int = typer.Option(2, help="DataLoader workers for --data."),
    data_batches: int = typer.Option(20, help="Batches timed for --data."),
    data_root: Optional[str] = typer.Option(None, help="Data root (default: $SAMFIT_DATA)."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads (default: torch's; on a CPU shared "
                                                     "with other work, fewer threads than cores steadies timing)."),
):
    """Time training steps, evaluation and peak memory of methods side by side (interleaved), with ratios to
    the baseline; optionally the data pipeline's images/s."""
    import torch

    from samfit.engine.bench import Shape, data_throughput, run_bench
    from samfit.engine.step import pick_device, resolve_precision
    from samfit.report.bench import write_bench

    if threads is not None:
        if threads < 1:
            raise SamfitError(f"--threads {threads}: must be >= 1.")
        torch.set_num_threads(threads)
    if device not in allowed_values("device"):
        raise SamfitError(f"--device {device!r}: choose one of {', '.join(allowed_values('device'))}.")
    dev = pick_device(device)
    shape = Shape(model, image_size, batch, dev.type, effective_batch, num_classes)
    attentions = _listed("--attention", attention, allowed_values("attention"))
    precisions = [resolve_precision(p, dev) for p in _listed("--precision", precision, allowed_values("precision"))]
    checkpoints = [False, True] if compare_grad_checkpoint else [grad_checkpoint]
    names = _bench_methods(methods)
    if not names and not data:
        raise SamfitError("Nothing to measure: give --methods and/or --data.")
    caches = [False, True] if compare_cache else [cache]
    records, meta = run_bench(names, shape, steps, warmup, attentions, precisions, checkpoints, memory, baseline,
                              log=lambda msg: err.print(msg), caches=caches) if names else ([], {})
    data_result = data_throughput(data, image_size, batch, num_workers, data_batches, dev.type, data_root) \
        if data else None
    path = write_bench(out, records, meta, data_result)
    sys.stdout.write(path.read_text())
    err.print(f"[green]wrote[/] {path.parent}")


@app.command()
def methods(
    model: str = typer.Option("vit_b", help=MODELS),
    num_classes: int = typer.Option(1, help="1 = binary head; >1 = mask-classification head."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    method_arg: Optional[List[str]] = typer.Option(None, "--method-arg", help="key=value for every method that "
                                                   "has the key (e.g. blocks=last:3); the others are left out."),
    decoder: str = typer.Option("full", help="How much of the decoder trains: full, frozen or lora:R (counts "
                                             "follow; methods that would train nothing are left out)."),
):
    """List the PEFT methods with their trainable parameter counts on MODEL."""
    import dataclasses

    import torch

    import samfit
    from samfit.keyvalue import parse_pairs
    from samfit.model.decoder_lora import apply_decoder, normalise_decoder
    from samfit.methods.base import missing_features
    from samfit.model import total_parameters
    from samfit.model.backbones import get_backbone

    sam_total = total_parameters(model)
    decoder = normalise_decoder(decoder)
    args, rows = parse_pairs(method_arg, "--method-arg", "blocks=last:3"), []
    for name in samfit.list_methods():
        keys = {f.name for f in dataclasses.fields(type(samfit.get_method(name)).Config)}
        if not set(args) <= keys:
            continue
        method = samfit.get_method(name, **args)
        if missing_features(method, model):  # no faithful form on this backbone
            rows.append({"method": name, "applies": False, "summary": method.summary,
                         "needs": missing_features(method, model)})
            continue
        with torch.device("meta"):  # counting needs shapes only
            net = method.apply(samfit.build_model(model, num_classes=num_classes, image_size=256))
            try:
                apply_decoder(net, decoder)
            except SamfitError:  # nothing would train (decoder-only with a frozen decoder)
                continue
        counts = samfit.count_parameters(net)
        rows.append({"method": name, **counts, "percent_of_sam": 100 * counts["trainable"] / sam_total,
                     "hyperparameters": method.describe(), "identical_at_init": method.identical_at_init,
                     "mergeable": method.mergeable, "summary": method.summary, "decoder": decoder})
    if not rows:
        raise SamfitError(f"No method takes every --method-arg key given ({', '.join(args)}); see `samfit methods`.")
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    t = Table(title=f"PEFT methods on {model} ({sam_total:,} parameters), num_classes={num_classes}, "
                    f"decoder {decoder}", caption=get_backbone(model).blocks)
    for col in ("method", "encoder-side", "trainable", "% of SAM", "hyperparameters", "= SAM at init", "mergeable"):
        t.add_column(col, justify="right" if col in ("encoder-side", "trainable", "% of SAM") else "left")
    for r in rows:
        if r.get("applies") is False:
            t.add_row(r["method"], "n/a", "n/a", "n/a", f"needs {', '.join(r['needs'])}", "-", "-")
            continue
        t.add_row(r["method"], f"{r['encoder_trainable']:,}", f"{r['trainable']:,}", f"{r['percent_of_sam']:.3f}",
                  ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items()) or "-",
                  "yes" if r["identical_at_init"] else "no", "yes" if r["mergeable"] else "no")
    console.print(t)


@app.command()
def datasets(datasets_file: Optional[str] = typer.Option(None, help="Extra dataset registry (YAML).")):
    """List the registered datasets and whether each is prepared."""
    from samfit.data.registry import dataset_dir, load_registry

    t = Table(title="datasets")
    for col in ("name", "task", "classes", "test sets", "headline", "epochs", "lr", "prepared at"):
        t.add_column(col)
    for spec in load_registry(datasets_file).values():
        folder = dataset_dir(spec)
        where = "generated on first use" if spec.synthetic else (str(folder) if folder.is_dir() else "not prepared")
        t.add_row(spec.name, spec.task, str(len(spec.classes)), ", ".join(spec.test), spec.headline,
                  str(spec.epochs), f"{spec.lr:g}", where)
    console.print(t)


@weights_app.command("download")
def weights_download(variant: str = typer.Argument(..., help="A model with official weights, e.g. vit_b, "
                                                              "sam2_hiera_t.")):
    """Download a model's official checkpoint, verify its MD5 where one is published, then move it into place."""
    from samfit.download import download_file
    from samfit.model.backbones import checkpoint_dir, get_backbone, record_download, weights_url, where_to_get

    b = get_backbone(variant)
    if not b.has_weights:
        raise SamfitError(f"Model '{variant}' has no official weights (it is random, for tests).")
    if weights_url(variant) is None:
        raise SamfitError(f"samfit cannot download {variant}'s weights. {where_to_get(variant)}")
    dest = checkpoint_dir() / b.weights.file
    download_file(weights_url(variant), dest, md5=b.weights.md5)
    if b.weights.md5 is None:  # nothing published to check against: record what was received
        got = record_download(dest)
        console.print(f"no published checksum for {dest.name}: {got['size']:,} bytes, sha256 {got['sha256']}")
    console.print(f"[green]saved[/] {dest}")


from samfit.report.cli import register as register_compare  # noqa: E402  compare: samfit/report/cli.py
from samfit.use.cli import register  # noqa: E402  predict, evaluate, export: samfit/use/cli.py

register(app)
register_compare(app)


def main() -> None:
    """Entry point: user errors print a message and exit 2, without a traceback."""
    try:
        app()
    except SamfitError as exc:
        from rich.text import Text

        err.print(Text("error: ", style="bold red") + Text(str(exc)))
        sys.exit(2)


if __name__ == "__main__":
    main()
