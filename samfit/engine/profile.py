"""Throughput and peak memory, measured the same way by `samfit run` and `samfit bench`."""
from __future__ import annotations

import ctypes
import resource
import statistics
import time

import torch

_cpu_baseline_kb: int | None = None


def _rss_kb(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in kB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim), so that later allocations show in the RSS
    instead of silently reusing resident free memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory measurement. CUDA: reset the max-allocated counter. CPU: remember the current
    resident set size as the baseline and reset the process's RSS high-water mark (/proc/self/clear_refs),
    so the peak counts what the work after this call needs, not the model built before it."""
    global _cpu_baseline_kb
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    _cpu_baseline_kb = _rss_kb("VmRSS")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: peak resident set size since the last reset above the
    RSS at the reset (without a reset: the process's whole peak RSS). Where the high-water mark cannot be
    reset (not Linux), the process's lifetime peak (ru_maxrss) stands in for it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak_kb = _rss_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, peak_kb - (_cpu_baseline_kb or 0)) / 1024


def peak_memory_kind(device: torch.device) -> str:
    """What peak_memory_mb measures, for the record."""
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_above_baseline"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock durations of repeated steps; `median` and images/s over everything timed."""

    def __init__(self, device: torch.device):
        self.device, self.durations, self.images = device, [], 0

    def __enter__(self):
        synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def add_images(self, n: int) -> None:
        self.images += n

    def __exit__(self, *exc):
        synchronize(self.device)
        self.durations.append(time.perf_counter() - self.start)

    @property
    def median(self) -> float:
        return statistics.median(self.durations) if self.durations else float("nan")

    @property
    def images_per_s(self) -> float:
        total = sum(self.durations)
        return self.images / total if total else float("nan")
