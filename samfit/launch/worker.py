"""One grid run in its own process: `python -m samfit.launch.worker '<RunConfig as JSON>'`.

The run always starts with `resume=True`: a finished run returns at once, an interrupted one continues from
checkpoints/last.pt, a new one starts. Exit code 0 = done, 2 = a SamfitError (its message is the last line
of the log), 1 = a crash (traceback in the log). The worker dies with the process that launched it.
"""
from __future__ import annotations

import json
import os
import signal
import sys


def die_with_parent(parent: int | None) -> None:
    """Linux: have the kernel send SIGTERM when the launching process dies (even by SIGKILL), so no run
    keeps training, holding its run lock, after its grid is gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            return
    if parent is not None and os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)


def run_one(config: dict) -> str:
    """Train and evaluate one run (resuming if possible); returns the run folder. Also the submitit task."""
    from samfit.config import RunConfig
    from samfit.engine.train import run

    return str(run(RunConfig(**config), resume=True, quiet=True))


def main(argv: list[str]) -> int:
    parent = os.environ.get("SAMFIT_GRID_PARENT")
    die_with_parent(int(parent) if parent else None)
    from samfit.errors import SamfitError

    try:
        print(f"done: {run_one(json.loads(argv[0]))}", flush=True)
    except SamfitError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
