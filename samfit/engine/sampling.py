"""Seeds, RNG state, epoch order and flips: everything that makes a run repeatable and resumable.

The order of every epoch and the flip of every image come from generators seeded by (seed, epoch, batch), not
from a running stream, so a resumed run, a cached run and an N-process run see the same images in the same
order with the same flips as one uninterrupted process.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors and plain numbers, so checkpoints load with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(py_state), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class EpochSampler(torch.utils.data.Sampler):
    """Yields `indices`, which the loop sets every epoch: one DataLoader (and its persistent workers) serves
    every epoch in `epoch_order`."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def flip_choices(n: int, seed: int, epoch: int, batch: int, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """(n,) bool: which images of the batch flip_batch flips (the embedding cache replays the same choices)."""
    g = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_000_003 + batch)
    return torch.rand(n * part[1], generator=g)[part[0] * n:(part[0] + 1) * n] < 0.5


def flip_batch(images, targets, seed: int, epoch: int, batch: int, part: tuple[int, int] = (0, 1)):
    """Horizontal flip with p=0.5 per image, from a generator seeded by (seed, epoch, batch). `part` =
    (rank, world): the images are share `rank` of a micro-batch of `world` equal shares (distributed.py), and
    get the flips the whole micro-batch gets in one process."""
    flip = flip_choices(images.shape[0], seed, epoch, batch, part)
    images, targets = images.clone(), targets.clone()
    images[flip] = images[flip].flip(-1)
    targets[flip] = targets[flip].flip(-1)
    return images, targets
