"""The live view of a grid: counts of queued, running, done and failed runs, the running ones with their epoch,
and an ETA. On a terminal it is a rich Live table; elsewhere (CI logs, nohup) one line per event."""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from samfit.grid import PlannedRun


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def epochs_done(run: PlannedRun) -> int:
    """Finished epochs, from the run's history.csv (header + one line per epoch)."""
    try:
        return max(0, len((run.run_dir / "history.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


class Monitor:
    """Thread-safe record of what each run is doing; `render()` draws it."""

    def __init__(self, title: str, runs: list[PlannedRun], slots: int, console: Console):
        self.title, self.runs, self.slots, self.console = title, runs, slots, console
        self.lock = threading.Lock()
        self.started = time.time()
        self.begun: dict[str, float] = {}  # run name -> start of the current attempt
        self.where: dict[str, str] = {}
        self.finished: list[PlannedRun] = []
        self.live: Live | None = None

    # events -------------------------------------------------------------------------------------------------
    def start(self, run: PlannedRun, where: str) -> None:
        with self.lock:
            run.state, run.attempts = "running", run.attempts + 1
            self.begun[run.name], self.where[run.name] = time.time(), where
        self._log(f"[cyan]start[/] {run.name} on {where} (attempt {run.attempts})")

    def finish(self, run: PlannedRun, state: str, error: str | None = None) -> None:
        with self.lock:
            run.state, run.error = state, error
            run.seconds = time.time() - self.begun.pop(run.name, time.time())
            self.finished.append(run)
        style = {"done": "green", "failed": "red", "queued": "yellow"}.get(state, "white")
        what = "retry" if state == "queued" else state
        tail = f": {error.splitlines()[-1][:160]}" if error else ""
        self._log(f"[{style}]{what}[/] {run.name} after {hms(run.seconds)}{tail}")

    def _log(self, message: str) -> None:
        if self.live is None:
            self.console.print(f"{hms(time.time() - self.started)} {message}", highlight=False)

    # view ---------------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for run in self.runs:
            out[run.state] = out.get(run.state, 0) + 1
        return out

    def eta(self) -> float | None:
        """Mean duration of the runs finished in this call × the work left, spread over the slots."""
        durations = [r.seconds for r in self.finished if r.state == "done" and r.seconds]
        if not durations:
            return None
        mean = statistics.mean(durations)
        now = time.time()
        running = [max(0.0, mean - (now - t)) for t in self.begun.values()]
        queued = sum(1 for r in self.runs if r.state == "queued")
        return (queued * mean + sum(running)) / max(1, self.slots)

    def summary(self) -> str:
        c = self.counts()
        parts = [f"{c.get(k, 0)} {k}" for k in ("queued", "running", "done", "failed")]
        parts += [f"{v} {k}" for k, v in c.items() if k not in ("queued", "running", "done", "failed")]
        left = c.get("queued", 0) + c.get("running", 0)
        return (f"{self.title}: {len(self.runs)} runs, " + ", ".join(parts) +
                f"; elapsed {hms(time.time() - self.started)}" + (f", ETA {hms(self.eta())}" if left else ""))

    def render(self):
        with self.lock:
            table = Table(title=self.summary(), title_justify="left", expand=False)
            for col in ("run", "state", "where", "attempt", "epoch", "time"):
                table.add_column(col)
            now = time.time()
            for run in self.runs:
                if run.state == "running":
                    table.add_row(run.name, Text("running", "cyan"), self.where.get(run.name, ""),
                                  str(run.attempts), f"{epochs_done(run)}/{run.config.epochs}",
                                  hms(now - self.begun.get(run.name, now)))
            for run in self.finished[-8:]:
                style = "green" if run.state == "done" else "red" if run.state == "failed" else "yellow"
                table.add_row(run.name, Text(run.state if run.state != "queued" else "retrying", style), "",
                              str(run.attempts), "", hms(run.seconds))
            errors = [Text(f"{r.name}: {r.error.splitlines()[-1][:200]}", "red")
                      for r in self.runs if r.state == "failed" and r.error]
            return Group(table, *errors[-5:])

    def __enter__(self) -> "Monitor":
        if self.console.is_terminal:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False,
                             get_renderable=self.render)
            self.live.__enter__()
        else:
            self.console.print(self.summary(), highlight=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None
        self.console.print(self.summary(), highlight=False)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
