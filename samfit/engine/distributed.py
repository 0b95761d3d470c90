"""Data-parallel training of one run over N processes: `torchrun --nproc_per_node=N -m samfit run ...`, or
`samfit run --nproc N`, which starts torchrun for you.

Design: the N processes together do exactly what one process does with the same settings.

- Batches: `--batch-size` stays the *global* micro-batch. Every micro-batch of the one-process run (the same
  images, in the same order, from `sampling.epoch_order`) is split into N equal consecutive shares of
  batch_size / N images (`shard`), and the horizontal flips are drawn for the whole micro-batch from the same
  (seed, epoch, batch) generator, each rank keeping its share's flips (`part` in `sampling.flip_batch`).
  batch_size must be a multiple of N. Gradient accumulation up to `--effective-batch` is unchanged.
- Gradients: no DistributedDataParallel wrapper. After the backward passes of one optimiser step, the
  trainable parameters' gradients are averaged over the ranks in one flat all-reduce (`average_gradients`).
  The mean of N per-share mean losses is the mean over the whole micro-batch, so the averaged gradient is the
  one-process gradient up to floating-point summation order. A parameter without a gradient on every rank
  (e.g. a Conv-LoRA expert no image chose) keeps `grad=None`, as in one process, so AdamW skips it alike.
  One all-reduce of a few MB per optimiser step costs nothing next to SAM's forward pass, and it works for
  every method (unused parameters, a gradient-free LST backbone) without DDP's bookkeeping.
  Exact only for losses that are a mean of per-image terms (structure loss, mask classification); the
  class-balanced BCE (SBU) weights by the share's own pixel counts, and Conv-LoRA's load-balancing loss and
  routing noise are per share, so those runs match one process statistically, not to rounding.
- Evaluation: rank r scores images r, r+N, r+2N, ... (no image twice, none padded); the evaluators' states are
  gathered (`all_gather_object`) and merged, so every rank gets the full-set metrics.
- Writing: only rank 0 writes the run folder and holds its lock (train.py asks `is_main` at each write).
- Backend: gloo on CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from samfit.errors import SamfitError


@dataclass
class Context:
    """This process's place in the run (rank 0 of 1 when not distributed) and the collectives train.py uses."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        """(rank, world): which share of every micro-batch this process trains on."""
        return self.rank, self.world

    def local_batch(self, batch_size: int) -> int:
        return batch_size // self.world

    def shard(self, order: list[int], batch_size: int) -> list[int]:
        """This rank's share of each consecutive micro-batch of `order` (whose length is a multiple of
        batch_size): the images the one-process run trains on, split into `world` consecutive parts."""
        if self.world == 1:
            return order
        n = batch_size // self.world
        return [i for start in range(0, len(order), batch_size)
                for i in order[start + self.rank * n:start + (self.rank + 1) * n]]

    def eval_args(self, n: int) -> dict:
        """`evaluate(..., **ctx.eval_args(len(dataset)))`: this rank's images and the state gatherer."""
        if self.world == 1:
            return {}
        return {"indices": list(range(self.rank, n, self.world)), "gather": self.gather}

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of `params` over the ranks (one flat all-reduce)."""
        if self.world == 1:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params] + [present])
        dist.all_reduce(flat)
        offset = 0
        for p, seen in zip(params, flat[-len(params):].tolist()):
            g = flat[offset:offset + p.numel()].view_as(p).to(p.dtype) / self.world
            offset += p.numel()
            if seen:
                p.grad = g
        assert offset == flat.numel() - len(params)

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's trainable values (they are equal already, from the same seed)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def _reduce(self, value: float, op) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.item()

    def mean(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM) / self.world

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def any(self, flag) -> bool:
        """True on every rank if `flag` is true on one (e.g. a SIGINT seen by one rank)."""
        return bool(self._reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX))

    def images_per_s(self, timer) -> float:
        """Throughput of all ranks together: images over the slowest rank's busy time."""
        slowest = self.max(sum(timer.durations))
        return self.sum(timer.images) / slowest if slowest else float("nan")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def main_first(self, fn, *args, **kwargs):
        """Run fn on rank 0, then on the others (e.g. generate a synthetic dataset once)."""
        if not self.is_main:
            self.barrier()
        result = fn(*args, **kwargs)
        if self.is_main:
            self.barrier()
        return result

    def close(self) -> None:
        global _current
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        _current = Context()


_current = Context()


def current() -> Context:
    return _current


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return env_world()[0] == 0


def setup(device: torch.device, batch_size: int) -> Context:
    """Join the process group torchrun describes (if any) and return this process's Context."""
    global _current
    rank, world, local_rank = env_world()
    if world == 1:
        _current = Context(device=device)
        return _current
    if batch_size % world:
        raise SamfitError(f"--batch-size {batch_size} is the global micro-batch; it must be a multiple of the "
                          f"{world} processes (each trains on batch_size / {world} images of it).")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SamfitError(f"Process {local_rank} on this node has no GPU: {torch.cuda.device_count()} visible, "
                              f"{world} processes. Use --nproc_per_node <= the number of GPUs.")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    _current = Context(device=device, rank=rank, world=world, owns_group=owns)
    return _current


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command for `samfit <argv>` without its --nproc option."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "samfit", *args]


def launch(nproc: int, argv: list[str]) -> int:
    """`samfit run --nproc N ...`: run the same command on N processes under torchrun; returns its exit code."""
    if nproc < 1:
        raise SamfitError(f"--nproc {nproc}: give the number of processes (GPUs), at least 1.")
    if env_world()[1] > 1:
        raise SamfitError("--nproc is for starting a distributed run; this process is already one of "
                          f"{env_world()[1]} (under torchrun). Drop --nproc.")
    return subprocess.call(torchrun_command(nproc, argv))
