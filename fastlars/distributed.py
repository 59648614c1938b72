"""Trust ratios under data-parallel sharding: whole-tensor norms from shards, one collective per stage.

A trust ratio needs ||w|| and ||g|| (LARS) or ||w|| and ||u|| (LAMB) of the WHOLE tensor. When FSDP2
(``fully_shard``) shards a parameter as a DTensor, each rank holds a slice, so each rank computes the
sums of squares of its slices for every tensor of a group into ONE vector, and a single all-reduce
(SUM) over the mesh dimensions that shard the tensor turns them into whole-tensor norms:

    ||x||² = Σ_ranks Σ_{i in local slice} x_i²

The update itself then runs on the local slices. The same mechanism makes the step's global
quantities agree across ranks: the skip flag (a non-finite value anywhere, or any rank's GradScaler
overflow) and LAMB's global gradient norm ||G||.

For ZeroRedundancyOptimizer, which gives each rank whole tensors but only some of them, set the
optimizer's ``stats_group`` (see :func:`zero_redundancy_optimizer`) so that the skip flag and ||G||
are reduced over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

Reducer = Callable[[Tensor], Tensor]
"""Sums a 1-D tensor of partial statistics over the ranks that share them; returns the total."""


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (e.g. a parameter sharded by FSDP2's fully_shard)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: Tensor) -> Tensor:
    """The local slice of a DTensor (a view: writing to it writes the parameter), else the tensor."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_groups(params: Sequence[Tensor]) -> list[Any]:
    """Process groups of the mesh dimensions along which ``params`` (DTensors) are sharded.

    Every parameter of one param group must share one mesh and one placement layout; Replicate
    dimensions (HSDP's replica dimension) hold identical slices and are not reduced over.
    """
    from torch.distributed.tensor import Replicate, Shard

    first = params[0]
    mesh, placements = first.device_mesh, tuple(first.placements)
    for i, p in enumerate(params):
        if not is_sharded(p):
            raise ValueError(f"params[{i}]: a param group mixes DTensor (sharded) and plain parameters")
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise ValueError(f"params[{i}]: all DTensor parameters of a param group must share one device mesh "
                             f"and placements; got {p.placements} on {p.device_mesh}, expected {placements}")
    groups = []
    for dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            groups.append(mesh.get_group(dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(f"placement {placement} is not supported: parameters must be Shard or Replicate")
    return groups


def sum_over(groups: Sequence[Any]) -> Reducer:
    """A reducer that all-reduces (SUM) a statistics vector over each of ``groups`` in turn."""

    def reduce(stats: Tensor) -> Tensor:
        out = stats.clone()
        for group in groups:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    return reduce


def zero_redundancy_optimizer(
    params: Any,
    optimizer_class: type[torch.optim.Optimizer],
    process_group: Any | None = None,
    **defaults: Any,
) -> torch.distributed.optim.ZeroRedundancyOptimizer:
    """``ZeroRedundancyOptimizer(params, optimizer_class=fastlars.LARS/LAMB, ...)`` whose skip flag and
    LAMB global gradient norm are reduced over all ranks, so sharded training equals unsharded training
    even with gradient clipping or a non-finite gradient on one rank's partition."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    zero = ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, process_group=process_group, **defaults)
    zero.optim.stats_group = process_group if process_group is not None else dist.group.WORLD
    return zero
