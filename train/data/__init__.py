"""The trainer's data: ImageFolder datasets (or the bundled digits) and the loaders that feed the engine.

Every loader serves the same protocol: `num_classes`, `num_samples`, `resumes_mid_epoch`,
`updates_per_epoch(G)`, `epoch(e, G, start_update)` yielding this rank's micro-batches in training
order (train.data.order), and `batches()` yielding this rank's evaluation shard.
"""

from __future__ import annotations

import torch

from train.data import idx
from train.data.folders import (
    IMAGE_SUFFIXES,
    default_dataset,
    default_image_size,
    digits_fold_of,
    is_default_data,
    native_image_size,
    resolve_data,
)
from train.data.loaders import FolderLoader, LoaderConfig, SyntheticEval, SyntheticLoader
from train.data.protocol import EvalLoader, TrainLoader

LOADERS = ("dali", "gpu", "cpu", "synthetic")

__all__ = ["IMAGE_SUFFIXES", "LOADERS", "EvalLoader", "LoaderConfig", "TrainLoader", "build_loaders",
           "default_dataset", "default_image_size", "digits_fold_of", "is_default_data", "native_image_size",
           "resolve_data"]


def build_loaders(cfg: LoaderConfig) -> tuple[TrainLoader, EvalLoader]:
    """(train loader, eval loader) for cfg.loader, or a ValueError that names the flag and the fix:
    an unknown loader, no --data, `dali` without the nvidia-dali wheel, `gpu` without CUDA."""
    if cfg.loader == "synthetic":
        loader = SyntheticLoader(cfg)
        return loader, SyntheticEval(loader)
    if cfg.loader not in LOADERS:
        raise ValueError(f"--loader must be one of {', '.join(LOADERS)}, got {cfg.loader!r}")
    if cfg.root is None:
        raise ValueError(f"--loader {cfg.loader} needs --data")
    if idx.idx_files(cfg.root) is not None:
        if cfg.loader == "dali":
            raise ValueError(f"--loader dali reads ImageFolder JPEGs; {cfg.root} is an IDX dataset (use --loader cpu)")
        from train.data.tensors import TensorLoader

        return (TensorLoader(cfg, *idx.load_split(cfg.root, "train"), train=True, subset=cfg.train_subset),
                TensorLoader(cfg, *idx.load_split(cfg.root, "test"), train=False))
    if cfg.train_subset is not None:
        raise ValueError("--train-subset applies to IDX datasets (e.g. Fashion-MNIST) only")
    if cfg.loader == "gpu" and cfg.device.type != "cuda":
        raise ValueError("--loader gpu decodes with nvjpeg on a CUDA device; this process runs on "
                         f"{cfg.device} (use --loader cpu)")
    if cfg.loader == "dali":
        from train.data.dali import DaliLoader

        return DaliLoader(cfg, "train"), DaliLoader(cfg, "val")
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    return FolderLoader(cfg, "train"), FolderLoader(cfg, "val")
