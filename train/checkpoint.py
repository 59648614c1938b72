"""Checkpoints that survive a kill: written to a temporary file, fsynced, renamed over the old one.

Under FSDP2 each rank holds slices of the parameters and of their optimizer state, so each rank also
writes a shard file (its slices, buffers and RNG states) under ``checkpoint.shards/update<t>/`` before
rank 0 renames ``checkpoint.pt`` naming update t over the old one: a kill at any moment leaves a
``checkpoint.pt`` whose shards are all on disk.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastlars import distributed

FORMAT = 1


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of rng_states()."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to path.tmp, fsync, rename onto path, fsync the folder: a reader sees the old or the
    new checkpoint, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **obj}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load(path: Path) -> dict[str, Any]:
    """A checkpoint written by save_atomic, with a clear error when it is missing or not one of ours."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"--resume: {path} is not a fastlars trainer checkpoint (format {FORMAT})")
    return obj


SHARDS = "checkpoint.shards"


def shard_path(out: Path, update: int, rank: int) -> Path:
    """The shard file rank ``rank`` writes for the checkpoint at ``update``."""
    return out / SHARDS / f"update{update:09d}" / f"rank{rank}.pt"


def remove_shards_before(out: Path, update: int) -> None:
    """Deletes the shard folders of checkpoints older than ``update`` (checkpoint.pt no longer names them)."""
    for folder in sorted((out / SHARDS).glob("update*")):
        if int(folder.name.removeprefix("update")) < update:
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()


def local_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state_dict with each sharded (DTensor) entry replaced by a copy of this rank's slice."""
    return {k: distributed.local(v).detach().clone() for k, v in model.state_dict().items()}


def load_local_model_state(model: nn.Module, saved: dict[str, Tensor]) -> None:
    """Inverse of local_model_state on the same sharding: copies each saved slice into this rank's slice."""
    current = model.state_dict()
    if saved.keys() != current.keys():
        raise ValueError(f"--resume: the shard holds entries {sorted(saved.keys() ^ current.keys())} that the "
                         "model does not (or the other way round)")
    with torch.no_grad():
        for k, v in current.items():
            local = distributed.local(v)
            if local.shape != saved[k].shape:
                raise ValueError(f"--resume: {k}: this rank's slice is {tuple(local.shape)}, the shard holds "
                                 f"{tuple(saved[k].shape)}; resume with the world size that wrote it")
            local.copy_(saved[k])


def local_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """optimizer.state_dict() with each DTensor state entry replaced by a copy of this rank's slice, and
    "sharded_entries" listing the (param id, key) pairs that were DTensors."""
    entries, sharded = {}, []
    for pid, entry in state["state"].items():
        entries[pid] = {}
        for key, value in entry.items():
            if distributed.is_sharded(value):
                sharded.append((pid, key))
                value = value.to_local().detach().clone()
            entries[pid][key] = value
    return {**state, "state": entries, "sharded_entries": sharded}


def sharded_optimizer_state(saved: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """Inverse of local_optimizer_state: each listed slice wrapped as a DTensor laid out as its param
    (``params``: the optimizer's params in state_dict id order)."""
    from torch.distributed.tensor import DTensor

    entries = {pid: dict(entry) for pid, entry in saved["state"].items()}
    for pid, key in saved["sharded_entries"]:
        param = params[pid]
        entries[pid][key] = DTensor.from_local(entries[pid][key].to(distributed.local(param).device),
                                               param.device_mesh, param.placements, run_check=False,
                                               shape=param.shape, stride=param.stride())
    return {k: v for k, v in saved.items() if k != "sharded_entries"} | {"state": entries}
