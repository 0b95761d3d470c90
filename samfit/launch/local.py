"""The local launcher: K worker slots, each running one run at a time in its own process
(`python -m samfit.launch.worker`), pinned to one GPU through CUDA_VISIBLE_DEVICES or to the CPU.

A failed run goes back to the end of the queue until it has been tried 1 + retries times. Each attempt's
output is appended to <run>/grid.log. Ctrl-C stops the grid: the running workers get SIGINT, save their
state at the next optimiser step and stop; calling `samfit grid` again resumes them.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

from rich.console import Console

from samfit.engine import rundir
from samfit.grid import PlannedRun
from samfit.launch.monitor import Monitor, tail


def slot_env(gpu: str | None, jobs: int) -> dict:
    env = dict(os.environ, SAMFIT_GRID_PARENT=str(os.getpid()), PYTHONUNBUFFERED="1")
    if gpu is None:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def outcome(run: PlannedRun, returncode: int, log) -> tuple[str, str | None]:
    """('done', None) or ('failed', error). A worker that died without saying why (killed, out of memory)
    gets its failure written into status.json here."""
    if returncode == 0 and (run.run_dir / "metrics.json").is_file():
        return "done", None
    status = rundir.read_status(run.run_dir)
    if returncode < 0:
        error = f"worker killed by {signal.Signals(-returncode).name}; log tail:\n{tail(log)}"
    elif status.get("status") in ("failed", "interrupted") and status.get("error"):
        error = status["error"]
    else:
        error = f"worker exited with code {returncode}; log tail:\n{tail(log)}"
    owner = rundir.lock_owner(run.run_dir)
    recorded = status.get("status") in ("failed", "interrupted")  # the run wrote its own error
    if not recorded and run.run_dir.is_dir() and (owner is None or not rundir.owner_alive(*owner)):
        rundir.set_status(run.run_dir, "failed", error=error)
    return "failed", error


def run_local(runs: list[PlannedRun], jobs: int, gpus: list[str] | None, retries: int, console: Console,
              title: str) -> list[PlannedRun]:
    """Run `runs` (their state must be 'queued') on `jobs` slots; returns them with their final state."""
    slots = [gpus[i % len(gpus)] if gpus else None for i in range(jobs)]
    queue = collections.deque(r for r in runs if r.state == "queued")
    lock, stop = threading.Lock(), threading.Event()
    procs: dict[int, subprocess.Popen] = {}
    monitor = Monitor(title, runs, len(slots), console)

    def work(slot: int, gpu: str | None) -> None:
        where = f"GPU {gpu}" if gpu is not None else "CPU"
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                run = queue.popleft()
            log = run.run_dir / "grid.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            monitor.start(run, where)
            with open(log, "a") as f:
                f.write(f"=== samfit grid: attempt {run.attempts} on {where}, {time.ctime()} ===\n")
                f.flush()
                proc = subprocess.Popen([sys.executable, "-m", "samfit.launch.worker", json.dumps(run.config.to_dict())],
                                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=slot_env(gpu, len(slots)))
                procs[slot] = proc
                returncode = proc.wait()
                procs.pop(slot, None)
            state, error = outcome(run, returncode, log)
            if state == "failed" and stop.is_set():
                state = "interrupted"
            if state == "failed" and run.attempts <= retries and not stop.is_set():
                monitor.finish(run, "queued", error)
                with lock:
                    queue.append(run)
            else:
                monitor.finish(run, state, error)

    threads = [threading.Thread(target=work, args=(i, gpu), daemon=True) for i, gpu in enumerate(slots)]
    with monitor:
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                time.sleep(0.2)
        except KeyboardInterrupt:
            stop.set()
            for proc in list(procs.values()):
                proc.send_signal(signal.SIGINT)
            for t in threads:
                t.join()
            for run in runs:
                if run.state == "queued":
                    run.state = "not started"
            console.print("Interrupted: the running runs saved their progress. Run the same `samfit grid` command "
                          "again to continue; finished runs are skipped.")
            raise
    return runs
