"""The trainer's optimizers, built over fastlars.param_groups: biases and norm-layer parameters get no
weight decay and (LARS/LAMB) no trust-ratio adaptation, as in the large-batch recipes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import fastlars
from train.config import TrainConfig


def default_weight_decay(optimizer: str) -> float:
    """1e-4 for momentum SGD and LARS (Goyal et al.; MLPerf LARS uses 5e-5 at 32K+), 0.01 for LAMB/AdamW."""
    return 0.01 if optimizer in ("lamb", "adamw") else 1e-4


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float,
                    zero: bool = False) -> torch.optim.Optimizer:
    """cfg.optimizer over `model`'s parameters at learning rate `lr`; with `zero`, wrapped in
    torch's ZeroRedundancyOptimizer (fastlars' version for LARS/LAMB, which reduces the skip flag and
    LAMB's global gradient norm over ranks). LARS/LAMB store their state as cfg.optim_state
    (fastlars' state_dtype) for adapting tensors of at least cfg.optim_state_min_size elements, and skip
    steps with non-finite gradients as cfg.skip_nonfinite says (fastlars' skip_nonfinite)."""
    wd = cfg.weight_decay if cfg.weight_decay is not None else default_weight_decay(cfg.optimizer)
    groups = fastlars.param_groups(model, weight_decay=wd)
    options: dict[str, Any]
    storage = {"state_dtype": cfg.optim_state, "min_quantized_size": cfg.optim_state_min_size}
    if cfg.optimizer == "lars":
        cls: type[torch.optim.Optimizer] = fastlars.LARS
        options = {"momentum": cfg.momentum, "nesterov": cfg.nesterov, "trust_coefficient": cfg.trust_coefficient,
                   "backend": cfg.backend, **storage}
    elif cfg.optimizer == "lamb":
        cls = fastlars.LAMB
        options = {"betas": cfg.betas, "eps": 1e-6 if cfg.eps is None else cfg.eps, "backend": cfg.backend,
                   **storage}
    else:
        if cfg.optim_state != "fp32":
            raise ValueError(f"--optim-state {cfg.optim_state} applies to lars and lamb only; "
                             f"{cfg.optimizer} keeps fp32 state")
        if not cfg.skip_nonfinite:
            raise ValueError(f"--no-skip-nonfinite applies to lars and lamb only; {cfg.optimizer} never checks its "
                             "gradients")
        for group in groups:
            group.pop("adapt", None)
        if cfg.optimizer == "adamw":
            cls = torch.optim.AdamW
            options = {"betas": cfg.betas, "eps": 1e-8 if cfg.eps is None else cfg.eps}
        else:
            cls = torch.optim.SGD
            options = {"momentum": cfg.momentum, "nesterov": cfg.nesterov}
    if cls in (fastlars.LARS, fastlars.LAMB):
        if not zero:
            built = cls(groups, lr=lr, **options)
            built.skip_nonfinite = cfg.skip_nonfinite
            return built
        from fastlars.distributed import zero_redundancy_optimizer

        zero_built = zero_redundancy_optimizer(groups, cls, lr=lr, **options)
        zero_built.optim.skip_nonfinite = cfg.skip_nonfinite
        return zero_built
    if not zero:
        return cls(groups, lr=lr, **options)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, lr=lr, **options)
