"""`samfit grid`: expand a grid file, decide what each run needs (skip, resume, start), and launch the rest on
a local pool of worker processes (local.py) or as a SLURM job array through submitit (slurm.py). worker.py is
the entry point each run's process executes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from samfit.errors import SamfitError
from samfit.config import parse_set
from samfit.grid import SHOWN, Grid, PlannedRun, load_grid, other_settings, plan, preflight, write_summary
from samfit.launch.slurm import job_alive

STATE_STYLE = {"new": "white", "done": "green", "partial": "yellow", "failed": "red", "changed": "magenta",
               "busy": "cyan"}


def parse_gpus(gpus: str | None) -> list[str]:
    """'0,1,2' -> ['0', '1', '2'] (CUDA_VISIBLE_DEVICES values: indices or GPU-/MIG- UUIDs); 'cpu' -> [] (CPU
    workers); None -> every GPU this process may use (the entries of its own CUDA_VISIBLE_DEVICES, if set)."""
    if gpus is None:
        import torch

        count = torch.cuda.device_count()
        visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        return visible[:count] if visible else [str(i) for i in range(count)]
    if gpus.strip().lower() in ("", "cpu", "none"):
        return []
    items = [g.strip() for g in gpus.split(",") if g.strip()]
    if not all(g.isdigit() or g.startswith(("GPU-", "MIG-")) for g in items):
        raise SamfitError(f"--gpus {gpus!r}: give GPU indices separated by commas (e.g. 0,1,2,3), or 'cpu'.")
    return items


def listing(grid: Grid, runs: list[PlannedRun], console: Console) -> None:
    table = Table(title=f"{grid.name}: {len(runs)} runs from {grid.path} -> {grid.out}", title_justify="left")
    for col in ("#", "run", *SHOWN, "other settings", "state"):
        table.add_column(col.replace("_", " "), overflow="fold")
    for i, run in enumerate(runs, 1):
        cfg = run.config.to_dict()
        table.add_row(str(i), run.name, *(f"{cfg[k]:g}" if k == "lr" else str(cfg[k]) for k in SHOWN),
                      other_settings(run.config), f"[{STATE_STYLE.get(run.state, 'white')}]{run.state}[/]"
                      + (f" ({run.detail})" if run.detail and run.state != "failed" else ""))
    console.print(table)


def counts_line(runs: list[PlannedRun]) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.state] = counts.get(run.state, 0) + 1
    return f"{len(runs)} runs: " + ", ".join(f"{n} {state}" for state, n in counts.items())


def launch(path: str | Path, out: str | None = None, dry_run: bool = False, launcher: str = "local",
           jobs: int | None = None, gpus: str | None = None, retries: int = 1, settings: list[str] | None = None,
           overwrite: bool = False, slurm=None, wait: bool = True, console: Console | None = None) -> list[PlannedRun]:
    """Run (or list) a grid; returns every run with its final state. Raises SamfitError if any run failed."""
    console = console or Console(stderr=True)
    if launcher not in ("local", "slurm"):
        raise SamfitError(f"--launcher {launcher!r}: choose local or slurm.")
    if retries < 0 or (jobs is not None and jobs < 1):
        raise SamfitError("--retries must be >= 0 and --jobs >= 1.")
    grid = load_grid(path, out, parse_set(settings))
    runs = plan(grid, job_alive)
    if dry_run:
        listing(grid, runs, Console(width=None if console.is_terminal else 250))
        console.print(counts_line(runs) + " (dry run: nothing launched)", highlight=False)
        return runs

    changed = [r for r in runs if r.state == "changed"]
    if changed and not overwrite:
        shown = "\n".join(f"  {r.run_dir}: {r.detail}" for r in changed[:5])
        raise SamfitError(f"{len(changed)} run folder(s) hold a run made with other settings than the grid's:\n"
                          f"{shown}{' ...' if len(changed) > 5 else ''}\nUse another --out, or --overwrite to "
                          f"delete those folders and run them again.")
    for run in changed:
        shutil.rmtree(run.run_dir)
        run.state = "new"
    for run in runs:
        if run.state == "busy":
            console.print(f"[cyan]busy[/] {run.name}: {run.detail}; left alone.", highlight=False)
    todo = [r for r in runs if r.state in ("new", "partial", "failed")]
    for run in runs:
        run.state = "queued" if run in todo else "skipped" if run.state == "done" else run.state
    if not todo:
        console.print(f"Nothing to run: {counts_line(runs)}.", highlight=False)
        write_summary(grid.out, grid, runs)
        return runs
    console.print(f"{grid.name}: {len(todo)} to run ({sum(r.state == 'skipped' for r in runs)} already complete) "
                  f"-> {grid.out}", highlight=False)
    preflight([r.config for r in todo])

    try:
        if launcher == "local":
            from samfit.launch.local import run_local

            devices = parse_gpus(gpus)
            run_local(runs, jobs or max(1, len(devices)), devices, retries, console, grid.name)
        else:
            from samfit.launch.slurm import SlurmOptions, run_slurm

            run_slurm(runs, slurm or SlurmOptions(), retries, console, grid.name,
                      Path(grid.out) / ".grid" / "slurm", wait=wait)
    finally:
        write_summary(grid.out, grid, runs)
    failed = [r for r in runs if r.state == "failed"]
    if failed:
        shown = "\n".join(f"  {r.name}: {(r.error or '').strip().splitlines()[-1][:300] if r.error else '?'}"
                          for r in failed[:10])
        raise SamfitError(f"{len(failed)} of {len(runs)} runs failed (after {retries} retries):\n{shown}\n"
                          f"Details: {Path(grid.out) / 'grid.json'} and each run's grid.log. Run the same command "
                          f"again to retry them; finished runs are skipped.")
    return runs
