"""Process topology: one process, or one per device under torchrun (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """This process's place: rank of world_size, local_rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    """"auto" → cuda:local_rank when CUDA is available, else cpu; "cuda" → cuda:local_rank."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if requested != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda, got {requested!r}")
    return torch.device("cpu")


def init(requested_device: str) -> tuple[Topology, bool]:
    """The topology from torchrun's environment, initialising the default process group (NCCL on CUDA,
    gloo on CPU) when WORLD_SIZE > 1 and none exists. Returns (topology, whether this call created it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    created = False
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return Topology(rank, world_size, local_rank, device), created
