"""param_groups(): the usual large-batch split of a model's parameters into decay / no-decay groups."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import nn


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into two groups for LARS/LAMB.

    * decay group: ``{"params": [...], "weight_decay": weight_decay}``; adapts by the default rule
      (weight_decay ≠ 0).
    * no-decay group: ``{"params": [...], "weight_decay": 0.0, "adapt": False}``: every tensor with
      fewer than two dimensions (biases, BatchNorm/LayerNorm gains and shifts) and every parameter
      whose name matches a pattern of ``exclude`` (fnmatch globs such as ``"*.pos_embed"``, or exact
      names). These get neither weight decay nor a trust ratio, as in MLPerf ResNet-50, apex and timm.

    Empty groups are left out. Parameters with ``requires_grad=False`` are skipped.
    """
    patterns = list(exclude or [])
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        excluded = param.ndim <= 1 or any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        (no_decay if excluded else decay).append(param)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "adapt": False})
    return groups
