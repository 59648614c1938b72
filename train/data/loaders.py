"""The torch loaders: `cpu` (decode and augment whole micro-batches in DataLoader workers), `gpu`
(workers read the files; nvjpeg decode and the same batched augmentation on the GPU, prefetched on a
side stream) and `synthetic` (one random batch generated on the device, for throughput runs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from train.data import augment, order
from train.data.decoded import DecodedImages
from train.data.files import FileReader
from train.data.folders import dataset_flips, scan_split

EVAL_BATCH = 256
KEPT_EVAL_BYTES = 256 << 20


@dataclass(frozen=True)
class LoaderConfig:
    """What a loader produces: micro-batches of `device_batch` images of image_size² on `device`,
    normalised, in `dtype` (NHWC memory when channels_last), for `rank` of `world_size`. `flip`:
    mirror half of the training images; None leaves it to the dataset (folders.dataset_flips)."""

    root: Path | None
    loader: str
    device: torch.device
    device_batch: int
    image_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    workers: int = 2
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    synthetic_classes: int = 1000
    synthetic_samples: int = 1_281_167
    flip: bool | None = None
    train_subset: int | None = None


def flips(cfg: LoaderConfig) -> bool:
    """cfg.flip, or the dataset's own choice when it is None."""
    if cfg.flip is not None:
        return cfg.flip
    return cfg.root is not None and dataset_flips(cfg.root)


@dataclass(frozen=True)
class _Task:
    indices: Tensor  # int64 positions in the split
    seed: int | None  # None: evaluation transform


class _Files(Dataset):
    """DataLoader dataset whose item i is a whole micro-batch: task i's files read (and, when
    `transform`, decoded and augmented) in the worker; with `decoded`, images decoded in an earlier
    epoch are taken from it instead of decoded again."""

    def __init__(self, files: FileReader, tasks: list[_Task], cfg: LoaderConfig, transform: bool,
                 decoded: DecodedImages | None = None) -> None:
        self.files, self.images, self.tasks, self.cfg, self.transform = files, files.images, tasks, cfg, transform
        self.decoded = decoded
        self.flip = flips(cfg)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Any:
        task = self.tasks[i]
        labels = self.images.labels[task.indices]
        with _one_thread():
            if self.transform and self.decoded is not None:
                return _transform(self.decoded.get(task.indices.tolist()), task.seed, self.cfg, self.flip), labels
            paths = [self.images.path(j) for j in task.indices.tolist()]
            encoded = [self.files.read(j) for j in task.indices.tolist()]
            if not self.transform:
                return encoded, paths, labels, task.seed
            return _transform(augment.decode(encoded, paths), task.seed, self.cfg, self.flip), labels


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run a micro-batch's small tensor ops on one thread, as a DataLoader worker does: with
    workers=0 on a busy machine, each op's thread barrier otherwise costs more than the op (an epoch
    of the 16×16 digits took 1 s instead of 0.2 s on 2 shared cores)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _transform(images: list[Tensor], seed: int | None, cfg: LoaderConfig, flip: bool) -> Tensor:
    if seed is None:
        return augment.eval_transform(images, cfg.image_size, cfg.dtype, cfg.channels_last)
    generator = torch.Generator().manual_seed(seed)
    return augment.train_transform(images, cfg.image_size, generator, flip, cfg.dtype, cfg.channels_last)


class FolderLoader:
    """Train and eval batches from an ImageFolder split through the `cpu` or `gpu` path.

    A split small enough to be held in memory (FileReader) is decoded once per process on the cpu
    path (DecodedImages), and its evaluation batches, which no random draw changes, are built once
    and served again while they total at most KEPT_EVAL_BYTES."""

    resumes_mid_epoch = True

    def __init__(self, cfg: LoaderConfig, split: str) -> None:
        assert cfg.root is not None
        self.cfg = cfg
        self.images = scan_split(cfg.root, split)
        self.files = FileReader(self.images)
        self.num_samples = len(self.images)
        self.num_classes = len(self.images.classes)
        self._decoded = DecodedImages(self.files) if self.files.buffer is not None and cfg.loader == "cpu" else None
        self._eval_batches: list[tuple[Tensor, Tensor]] | None = None

    def updates_per_epoch(self, global_batch: int) -> int:
        """U = ⌈N / global_batch⌉."""
        return order.updates_per_epoch(self.num_samples, global_batch)

    def epoch(self, epoch: int, global_batch: int, start_update: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's micro-batches of `epoch` from update `start_update` (see train.data.order)."""
        cfg = self.cfg
        tasks = [_Task(mb.indices, mb.seed) for mb in order.micro_batches(
            self.num_samples, global_batch, cfg.device_batch, cfg.rank, cfg.world_size, cfg.seed, epoch,
            start_update)]
        return self._run(tasks)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's shard of the split (positions rank, rank + W, ...), evaluation transform."""
        if self._eval_batches is not None:
            return iter(self._eval_batches)
        mine = torch.arange(self.cfg.rank, self.num_samples, self.cfg.world_size)
        batches = self._run([_Task(chunk, None) for chunk in mine.split(max(self.cfg.device_batch, EVAL_BATCH))])
        itemsize = torch.empty(0, dtype=self.cfg.dtype).element_size()
        if self._decoded is None or len(mine) * 3 * self.cfg.image_size ** 2 * itemsize > KEPT_EVAL_BYTES:
            return batches
        self._eval_batches = list(batches)
        return iter(self._eval_batches)

    def _run(self, tasks: list[_Task]) -> Iterator[tuple[Tensor, Tensor]]:
        cfg = self.cfg
        gpu = cfg.loader == "gpu"
        loader = DataLoader(_Files(self.files, tasks, cfg, transform=not gpu, decoded=self._decoded),
                            batch_size=None, shuffle=False,
                            num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None,
                            pin_memory=cfg.device.type == "cuda" and not gpu, collate_fn=_identity)
        if gpu:
            return _gpu_batches(loader, cfg)
        return ((x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)) for x, y in loader)


def _identity(item: Any) -> Any:
    return item


def _gpu_batches(loader: DataLoader, cfg: LoaderConfig) -> Iterator[tuple[Tensor, Tensor]]:
    """Decode (nvjpeg) and augment micro-batch k+1 on a side stream while micro-batch k trains on the
    current one. On a CPU device (only reachable by building FolderLoader directly, as the tests do)
    the same steps run without streams."""
    stream = torch.cuda.Stream(cfg.device) if cfg.device.type == "cuda" else None
    flip = flips(cfg)

    def produce(item: Any) -> tuple[Tensor, Tensor]:
        encoded, paths, labels, seed = item
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            images = augment.decode(encoded, paths, device=cfg.device)
            return _transform(images, seed, cfg, flip), labels.to(cfg.device, non_blocking=True)

    pending = None
    for item in loader:
        ready = produce(item)
        if pending is not None:
            yield _hand_over(pending, stream)
        pending = ready
    if pending is not None:
        yield _hand_over(pending, stream)


def _hand_over(batch: tuple[Tensor, Tensor], stream: torch.cuda.Stream | None) -> tuple[Tensor, Tensor]:
    """Make the consumer's stream wait for the side stream, and keep the batch's memory from being
    reused by the side stream until the consumer is done with it."""
    if stream is None:
        return batch
    current = torch.cuda.current_stream(batch[0].device)
    current.wait_stream(stream)
    for t in batch:
        t.record_stream(current)
    return batch


class SyntheticLoader:
    """Random normalised images and labels, generated once on the device and served every step."""

    resumes_mid_epoch = True

    def __init__(self, cfg: LoaderConfig) -> None:
        self.cfg = cfg
        self.num_classes = cfg.synthetic_classes
        self.num_samples = cfg.synthetic_samples
        generator = torch.Generator().manual_seed(order.mix_seed(cfg.seed, cfg.rank))
        images = torch.randn(cfg.device_batch, 3, cfg.image_size, cfg.image_size, generator=generator)
        self.images = images.to(cfg.device, cfg.dtype)
        if cfg.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, cfg.synthetic_classes, (cfg.device_batch,), generator=generator).to(cfg.device)

    def updates_per_epoch(self, global_batch: int) -> int:
        """U = ⌈N / global_batch⌉."""
        return order.updates_per_epoch(self.num_samples, global_batch)

    def epoch(self, epoch: int, global_batch: int, start_update: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The same batch, U·A − start_update·A times (A = accumulation)."""
        steps = order.accumulation(global_batch, self.cfg.device_batch, self.cfg.world_size)
        return iter([(self.images, self.labels)] * ((self.updates_per_epoch(global_batch) - start_update) * steps))


class SyntheticEval:
    """The synthetic batch as a one-batch validation set."""

    def __init__(self, train: SyntheticLoader) -> None:
        self.train = train
        self.num_samples = len(train.labels)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The one batch."""
        return iter([(self.train.images, self.train.labels)])
