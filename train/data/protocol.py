"""What the engine asks of a loader: the train and eval protocols every loader (cpu, gpu, dali,
synthetic) serves."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch import Tensor


class TrainLoader(Protocol):
    """Training micro-batches of one rank in the order of train.data.order.

    num_samples is N, updates_per_epoch(G) = ⌈N / G⌉, and epoch(e, G, start_update) yields, for
    updates u = start_update … U−1, the A = G / (device_batch · world_size) micro-batches
    m = a·world_size + rank (a = 0 … A−1) of this rank: images [device_batch, 3, S, S] on the device,
    normalised (x/255 − mean)/std, in the configured dtype and memory format, and int64 labels.
    resumes_mid_epoch is False when start_update must be 0 (DALI)."""

    num_classes: int
    num_samples: int
    resumes_mid_epoch: bool

    def updates_per_epoch(self, global_batch: int) -> int:
        """U = ⌈N / global_batch⌉."""
        ...

    def epoch(self, epoch: int, global_batch: int, start_update: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's micro-batches of `epoch` from update `start_update` on."""
        ...


class EvalLoader(Protocol):
    """Evaluation batches of one rank: positions rank, rank + W, … of the split, no augmentation."""

    num_samples: int

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) of this rank's shard, same dtype, layout and normalisation as training."""
        ...
