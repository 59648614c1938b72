"""Which samples each rank reads, as pure functions of (seed, epoch, update, micro-batch).

Epoch e visits P_e = randperm(N) (seeded by (seed, e)), extended by wrap-around to U·G positions,
U = ⌈N/G⌉ updates of exactly G samples. Update u is cut into micro-batches of `device_batch`
samples; micro-batch m = a·world_size + rank (a = accumulation index) takes positions
[u·G + m·b, u·G + (m+1)·b). So one process with accumulation A·W sees the same micro-batches, in the
same order, as W processes with accumulation A, and any update can be regenerated on resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

_MIX = 1_000_003
_MASK = (1 << 62) - 1


def mix_seed(*parts: int) -> int:
    """A 62-bit seed from integers (polynomial hash), so (seed, epoch, update, micro) never collide
    for the ranges a run uses."""
    value = 0
    for part in parts:
        value = (value * _MIX + int(part) + 1) & _MASK
    return value


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of this rank: sample indices and the seed of its augmentation."""

    update: int
    accumulation_index: int
    indices: Tensor
    seed: int


def updates_per_epoch(num_samples: int, global_batch: int) -> int:
    """U = ⌈N / G⌉."""
    return math.ceil(num_samples / global_batch)


def accumulation(global_batch: int, device_batch: int, world_size: int) -> int:
    """A = G / (b · W), or a ValueError naming the flags when it does not divide."""
    per_step = device_batch * world_size
    if global_batch % per_step:
        raise ValueError(f"--global-batch {global_batch} is not a multiple of --device-batch × world size = "
                         f"{device_batch} × {world_size} = {per_step}")
    return global_batch // per_step


def epoch_positions(num_samples: int, global_batch: int, seed: int, epoch: int) -> Tensor:
    """P_e extended by wrap-around to U·G sample indices (int64)."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    total = updates_per_epoch(num_samples, global_batch) * global_batch
    return order.repeat(math.ceil(total / num_samples))[:total]


def micro_batches(num_samples: int, global_batch: int, device_batch: int, rank: int, world_size: int,
                  seed: int, epoch: int, start_update: int = 0) -> Iterator[MicroBatch]:
    """This rank's micro-batches of epoch `epoch` from update `start_update` on, in training order."""
    steps = accumulation(global_batch, device_batch, world_size)
    positions = epoch_positions(num_samples, global_batch, seed, epoch)
    for u in range(start_update, updates_per_epoch(num_samples, global_batch)):
        for a in range(steps):
            m = a * world_size + rank
            start = u * global_batch + m * device_batch
            yield MicroBatch(u, a, positions[start:start + device_batch], mix_seed(seed, epoch, u, m))
