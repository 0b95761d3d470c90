"""The SLURM launcher: one submitit job array, one task per run, each task one GPU.

Every task runs `samfit.launch.worker.run_one` (train with resume=True), so a task that times out or is
preempted is requeued by submitit (the task is `Checkpointable`) and continues from the run's last saved
epoch. With `wait` the launcher follows the jobs in the same live table as the local launcher and resubmits
failed runs up to `retries` times; without it, it submits and returns (call `samfit grid` again later: it
skips finished runs and runs still queued or running). Each submitted run's status.json records its job id.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from samfit.engine import rundir
from samfit.errors import SamfitError
from samfit.grid import PlannedRun
from samfit.launch.monitor import Monitor
from samfit.launch.worker import run_one

try:
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency; this keeps `samfit` importable without it
    Checkpointable = object


class GridTask(Checkpointable):
    """The callable submitit pickles: one run. Requeued as is on timeout or preemption."""

    def __call__(self, config: dict) -> str:
        return run_one(config)


@dataclass
class SlurmOptions:
    partition: str | None = None
    time_min: int = 24 * 60
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    mem_gb: float | None = 64
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 64
    setup: list[str] = field(default_factory=list)  # shell lines run before each task (module load, ...)
    extra: dict = field(default_factory=dict)  # any other sbatch option, e.g. {"exclude": "node12"}
    cluster: str | None = None  # None: slurm; "local" / "debug": submitit's local executors (tests)


def make_executor(folder: Path, opts: SlurmOptions, name: str):
    try:
        import submitit
    except ImportError:
        raise SamfitError("The slurm launcher needs submitit: pip install submitit.") from None
    cluster = opts.cluster or "slurm"
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise SamfitError("--launcher slurm: `sbatch` is not on PATH, so this machine cannot submit SLURM jobs. "
                          "Run from a SLURM login node, or use --launcher local.")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    params = dict(name=f"samfit-{name}", timeout_min=opts.time_min, cpus_per_task=opts.cpus_per_task,
                  tasks_per_node=1, nodes=1, gpus_per_node=opts.gpus_per_task or None, mem_gb=opts.mem_gb,
                  slurm_partition=opts.partition, slurm_account=opts.account, slurm_qos=opts.qos,
                  slurm_constraint=opts.constraint, slurm_array_parallelism=opts.array_parallelism,
                  slurm_setup=opts.setup or None, slurm_additional_parameters=opts.extra or None)
    try:
        executor.update_parameters(**params)
    except (NameError, AssertionError, ValueError) as exc:
        raise SamfitError(f"Invalid SLURM options: {exc}") from None
    return executor


def job_alive(job_id: str, cluster: str | None) -> bool:
    """Is this job still queued or running? (squeue on SLURM; the process for submitit's local executor.)"""
    if cluster in ("local", "debug"):
        try:
            os.kill(int(job_id), 0)
        except (ValueError, ProcessLookupError):
            return False
        except PermissionError:
            return True
        return True
    if shutil.which("squeue") is None:
        return False
    out = subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def run_slurm(runs: list[PlannedRun], opts: SlurmOptions, retries: int, console: Console, title: str,
              folder: Path, wait: bool = True) -> list[PlannedRun]:
    queued = [r for r in runs if r.state == "queued"]
    executor = make_executor(folder, opts, title)
    task = GridTask()

    def submit(batch: list[PlannedRun]) -> dict:
        jobs = executor.map_array(task, [r.config.to_dict() for r in batch])
        for run, job in zip(batch, jobs):
            rundir.set_status(run.run_dir, "submitted", job_id=job.job_id, launcher="slurm",
                              cluster=opts.cluster or "slurm")
        return {job.job_id: (run, job) for run, job in zip(batch, jobs)}

    pending = submit(queued)
    if not wait:
        ids = sorted({job_id.split("_")[0] for job_id in pending})
        console.print(f"submitted {len(queued)} runs as job(s) {', '.join(ids)}; logs in {folder}. Run the same "
                      f"`samfit grid` command again to see progress: it skips finished and queued runs.")
        for run in queued:
            run.state = "submitted"
        return runs
    monitor = Monitor(title, runs, max(1, len(queued)), console)
    for job_id, (run, _) in pending.items():
        monitor.start(run, f"job {job_id}")
    with monitor:
        try:
            while pending:
                time.sleep(1.0)
                for job_id, (run, job) in list(pending.items()):
                    if not job.done():
                        continue
                    del pending[job_id]
                    try:
                        job.result()
                        state, error = "done", None
                    except Exception as exc:  # the task's exception, or the job's death, as submitit reports it
                        state, error = "failed", str(exc).strip()[-2000:]
                    if state == "done" and not (run.run_dir / "metrics.json").is_file():
                        state, error = "failed", f"job {job_id} ended without writing metrics.json"
                    if state == "failed" and run.attempts <= retries:
                        monitor.finish(run, "queued", error)
                        for new_id, (new_run, new_job) in submit([run]).items():
                            pending[new_id] = (new_run, new_job)
                            monitor.start(new_run, f"job {new_id}")
                        continue
                    if state == "failed" and rundir.read_status(run.run_dir).get("status") != "failed":
                        rundir.set_status(run.run_dir, "failed", error=error)
                    monitor.finish(run, state, error)
        except KeyboardInterrupt:
            console.print(f"Stopped following the jobs; they keep running on the cluster (scancel "
                          f"{' '.join(sorted({i.split('_')[0] for i in pending}))} to stop them).")
            raise
    return runs
