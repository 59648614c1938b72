"""An in-memory loader for small grey images held as one uint8 tensor (IDX datasets: Fashion-MNIST).

The recipe for 28×28 images (the CIFAR/MNIST-style one, not ImageNet's): training images are
zero-padded by `PAD` pixels on each side and a random H×W window is cut from them (a shift of up to
±PAD pixels), mirrored with probability 1/2 where the dataset allows it; evaluation sees the whole
image. Grey is replicated to three channels and normalised as every other loader does
((x/255 − mean)/std, augment.finish), and resampled (bilinear) only when --image-size differs from
the images' own size. The shifts and flips of a micro-batch are drawn from its seed
(train.data.order), so the same samples get the same augmentation in any process layout and after a
resume.

`train_subset` keeps a fixed stratified subset of exactly that many training images (stratified_subset),
the same for every run and every seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from train.data import augment, order
from train.data.loaders import EVAL_BATCH, LoaderConfig, flips

PAD = 2


def stratified_subset(labels: Tensor, size: int) -> Tensor:
    """Indices (sorted) of a stratified subset of exactly `size` of the samples with `labels`: class c
    gets ⌊size · n_c / N⌋ samples, the remainder going one each to the classes with the largest
    fractional parts (ties: the smaller class index); each class's are the first of one permutation
    seeded 0."""
    n = len(labels)
    if not 0 < size <= n:
        raise ValueError(f"--train-subset must lie in 1 … {n}, got {size}")
    classes = labels.unique().tolist()
    counts = [int((labels == c).sum()) for c in classes]
    quotas = [size * k // n for k in counts]
    by_remainder = sorted(range(len(classes)), key=lambda i: (-(size * counts[i] % n), i))
    for i in by_remainder[:size - sum(quotas)]:
        quotas[i] += 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    chosen = [perm[labels[perm] == c][:q] for c, q in zip(classes, quotas)]
    return torch.cat(chosen).sort().values


class TensorLoader:
    """Train batches (split "train") or evaluation batches (split "test") of an IDX dataset folder,
    held in memory; serves the TrainLoader and EvalLoader protocols of train.data.protocol."""

    resumes_mid_epoch = True

    def __init__(self, cfg: LoaderConfig, images: np.ndarray, labels: np.ndarray, train: bool,
                 subset: int | None = None) -> None:
        self.cfg = cfg
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))
        self.num_classes = int(self.labels.max()) + 1
        if subset is not None and train:
            keep = stratified_subset(self.labels, subset)
            self.images, self.labels = self.images[keep], self.labels[keep]
        self.num_samples = len(self.labels)
        self.train = train
        self.flip = flips(cfg)
        self._eval: list[tuple[Tensor, Tensor]] | None = None

    def updates_per_epoch(self, global_batch: int) -> int:
        """U = ⌈N / global_batch⌉."""
        return order.updates_per_epoch(self.num_samples, global_batch)

    def epoch(self, epoch: int, global_batch: int, start_update: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's micro-batches of `epoch` from update `start_update` (train.data.order), augmented."""
        cfg = self.cfg
        for mb in order.micro_batches(self.num_samples, global_batch, cfg.device_batch, cfg.rank, cfg.world_size,
                                      cfg.seed, epoch, start_update):
            generator = torch.Generator().manual_seed(mb.seed)
            yield self._finish(shift_and_flip(self.images[mb.indices], generator, self.flip)), \
                self.labels[mb.indices].to(cfg.device)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's shard (positions rank, rank + W, …), whole images; built once and kept."""
        if self._eval is None:
            mine = torch.arange(self.cfg.rank, self.num_samples, self.cfg.world_size)
            self._eval = [(self._finish(self.images[chunk].float()), self.labels[chunk].to(self.cfg.device))
                          for chunk in mine.split(max(self.cfg.device_batch, EVAL_BATCH))]
        return iter(self._eval)

    def _finish(self, batch: Tensor) -> Tensor:
        """float [n, H, W] in 0–255 → normalised [n, 3, S, S] on the device (augment.finish)."""
        cfg = self.cfg
        batch = batch.to(cfg.device)[:, None]
        if batch.shape[-1] != cfg.image_size or batch.shape[-2] != cfg.image_size:
            batch = F.interpolate(batch, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
        return augment.finish(batch.expand(-1, 3, -1, -1).contiguous(), None, cfg.dtype, cfg.channels_last)


def shift_and_flip(images: Tensor, generator: torch.Generator, flip: bool, pad: int = PAD) -> Tensor:
    """Pad-and-crop and optional mirror of uint8 [n, H, W] images: float [n, H, W] where image i is its
    zero-padded copy's window at offset (dy_i, dx_i) ∈ [0, 2·pad]² (a shift by (dy_i − pad, dx_i − pad)),
    mirrored when its coin (p = 1/2, drawn only with `flip`) says so."""
    n, h, w = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    mirror = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    padded = F.pad(images.float(), (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h)  # [n, H]
    cols = offsets[:, 1:] + torch.arange(w)  # [n, W]
    cols = torch.where(mirror[:, None], cols.flip(1), cols)
    return padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
