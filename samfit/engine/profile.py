"""Throughput and peak memory, measured the same way by `samfit run` and `samfit bench`."""
from __future__ import annotations

import resource
import statistics
import time

import torch


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set size (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
