"""The `dali` loader: NVIDIA DALI decodes JPEGs on the GPU (nvjpeg, "mixed" device), random-resized
crops, flips and normalises there and hands NHWC fp16 (or fp32) batches to torch; DALI has no
bfloat16, so bf16 runs get its fp16 output cast on the device.

DALI's random state cannot be saved, so each epoch builds its pipeline with seeds derived from
(seed, epoch, rank) and a resume restarts at the last epoch boundary (resumes_mid_epoch = False).
The reader shards the files over ranks (shard_id = rank) and pads the last batch; an epoch serves
exactly the U·A micro-batches the engine asks for, wrapping around the shard when it needs more.
The order is the reader's own (a shuffle buffer per shard), not train.data.order's, so a run with
W ranks is not sample-for-sample one process with W-fold accumulation, as it is with cpu and gpu.
Without a GPU the same pipeline runs with CPU operators (device_id None), which is how it is tested.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from train.data import augment, order
from train.data.folders import scan_split
from train.data.loaders import LoaderConfig, flips

PACKAGE_HINT = ("pip install nvidia-dali-cuda130 (CUDA 13; nvidia-dali-cuda120 for CUDA 12), or "
                "pip install 'fastlars[dali]'; --loader gpu needs no DALI")


def require_dali() -> Any:
    """The nvidia.dali module, or a ValueError naming the pip package."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--loader dali: NVIDIA DALI is not installed ({exc}); {PACKAGE_HINT}") from exc
    return dali


class DaliLoader:
    """Train batches (random-resized crop, flip, normalise) or eval batches (resize, center crop) of one
    ImageFolder split through a DALI pipeline."""

    resumes_mid_epoch = False

    def __init__(self, cfg: LoaderConfig, split: str) -> None:
        require_dali()
        assert cfg.root is not None
        self.cfg = cfg
        self.images = scan_split(cfg.root, split)
        self.num_samples = len(self.images)
        self.num_classes = len(self.images.classes)

    def updates_per_epoch(self, global_batch: int) -> int:
        """U = ⌈N / global_batch⌉."""
        return order.updates_per_epoch(self.num_samples, global_batch)

    def _pipeline(self, seed: int, training: bool, files: list[str], labels: list[int], batch: int,
                  sharded: bool = True) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.cfg
        on_gpu = cfg.device.type == "cuda"
        out_type = {torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16}.get(cfg.dtype, types.FLOAT)
        mean = [m * 255 for m in augment.IMAGENET_MEAN]
        std = [s * 255 for s in augment.IMAGENET_STD]
        size = cfg.image_size

        device_id = None  # CPU operators only
        if on_gpu:
            device_id = cfg.device.index if cfg.device.index is not None else torch.cuda.current_device()

        @pipeline_def(batch_size=batch, num_threads=max(1, cfg.workers), device_id=device_id,
                      seed=seed & 0x7FFFFFFF, prefetch_queue_depth=2)
        def pipe() -> Any:
            jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=cfg.rank if sharded else 0,
                                           num_shards=cfg.world_size if sharded else 1,
                                           random_shuffle=training, pad_last_batch=True, name="Reader")
            decoder = "mixed" if on_gpu else "cpu"
            if training:
                images = fn.decoders.image_random_crop(
                    jpegs, device=decoder, output_type=types.RGB, num_attempts=10,
                    random_area=[0.25 if size < 64 else 0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
                images = fn.resize(images, resize_x=size, resize_y=size)
                mirror = fn.random.coin_flip(probability=0.5) if flips(cfg) else 0
            else:
                images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
                images = fn.resize(images, resize_shorter=size if size < 64 else round(size * 8 / 7))
                mirror = 0
            images = fn.crop_mirror_normalize(images, dtype=out_type, output_layout="HWC", crop=(size, size),
                                              mean=mean, std=std, mirror=mirror)
            return images, label.gpu() if on_gpu else label

        built = pipe()
        built.build()
        return built

    def _serve(self, pipeline: Any, count: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policy = LastBatchPolicy.FILL if count is not None else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator(pipeline, ["images", "labels"], reader_name="Reader",
                                       last_batch_policy=policy, auto_reset=True)
        served = 0
        while count is None or served < count:
            for item in iterator:
                images = item[0]["images"].permute(0, 3, 1, 2)  # NHWC storage, NCHW view
                images = images.to(self.cfg.device, self.cfg.dtype)
                if not self.cfg.channels_last:
                    images = images.contiguous()
                yield images, item[0]["labels"].reshape(-1).to(self.cfg.device, torch.int64)
                served += 1
                if count is not None and served >= count:
                    return
            if count is None:
                return

    def epoch(self, epoch: int, global_batch: int, start_update: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """U·A micro-batches of `epoch` (start_update must be 0: DALI resumes at epoch boundaries)."""
        if start_update:
            raise ValueError("--loader dali resumes only at epoch boundaries")
        steps = order.accumulation(global_batch, self.cfg.device_batch, self.cfg.world_size)
        pipeline = self._pipeline(order.mix_seed(self.cfg.seed, epoch, self.cfg.rank), True, self.images.paths(),
                                  self.images.labels.tolist(), self.cfg.device_batch)
        return self._serve(pipeline, self.updates_per_epoch(global_batch) * steps)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's shard of the split (positions rank, rank + W, ...), eval transform, no padding."""
        files, labels = self.images.paths(), self.images.labels.tolist()
        size = max(self.cfg.device_batch, 256)
        shard = list(range(len(files)))[self.cfg.rank::self.cfg.world_size]
        pipeline = self._pipeline(0, False, [files[i] for i in shard], [labels[i] for i in shard], size,
                                  sharded=False)
        return self._serve(pipeline, None)
