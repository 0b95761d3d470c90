"""A run folder: atomic writes, status, and a lock so two processes never write the same run."""
from __future__ import annotations

import errno
import io
import json
import os
import socket
import tempfile
import warnings
from pathlib import Path

import torch
import yaml

from samfit.errors import SamfitError


def ensure_writable_dir(folder: Path) -> None:
    """Create `folder` or explain why it cannot be written (permissions, a file in the way, read-only disk)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".samfit-probe-")
        probe.close()
    except OSError as exc:
        raise SamfitError(f"Output folder {folder} is not writable ({exc.strerror or exc}). "
                          f"Choose another with --out, or fix its permissions.") from None


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see old or new, never half."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise SamfitError(f"Disk full while writing {path}; the previous version of the file is kept. "
                              f"Free space on {path.parent} and run again with --resume.") from None
        raise SamfitError(f"Could not write {path}: {exc.strerror}.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_yaml(path: Path, data) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def save_torch(path: Path, obj) -> None:
    """Serialise in memory first, so that a full disk surfaces as ENOSPC from our own write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic(path, lambda f: f.write(buffer.getbuffer()))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def set_status(run_dir: Path, state: str, **extra) -> None:
    write_json(Path(run_dir) / "status.json", {"status": state, **extra})


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / "status.json"
    return read_json(path) if path.is_file() else {"status": "new"}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_owner(run_dir: Path) -> tuple[str, int] | None:
    """(host, pid) written in the run folder's lock, or None when there is no (readable) lock."""
    try:
        host, _, pid = (Path(run_dir) / "run.lock").read_text().strip().partition(" ")
    except OSError:
        return None
    return (host, int(pid)) if pid.isdigit() else None


def owner_alive(host: str, pid: int) -> bool | None:
    """True/False for a process on this host; None when the owner is on another host (cannot tell)."""
    return pid_alive(pid) if host == socket.gethostname() else None


class RunLock:
    """`run.lock` holding the owner's host and pid, created with O_EXCL. A lock left by a dead process on
    this host is taken over with a warning; a live owner is an error."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "run.lock"
        self.owned = False

    def acquire(self) -> "RunLock":
        ensure_writable_dir(self.path.parent)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                host, _, pid = self.path.read_text().strip().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                    warnings.warn(f"Taking over stale lock {self.path} of dead process {pid}.", stacklevel=2)
                    self.path.unlink(missing_ok=True)
                    continue
                raise SamfitError(f"Run folder {self.path.parent} is in use by process {pid} on {host} "
                                  f"(lock {self.path}). Wait for it, or delete the lock if that process is gone.")
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.owned = True
            return self
        raise SamfitError(f"Could not take the lock {self.path}.")

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
