"""Worker processes for tests/test_distributed.py (imported by name in spawned processes).

Each run trains the same small model on the same data for ``STEPS`` steps: once in one process with
the whole global batch, once in 2 gloo processes (each with half the batch) under DDP, ZeRO or FSDP2.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn

import fastlars

STEPS = 20
GLOBAL_BATCH = 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # The last layer has one output row: under FSDP2 on 2 ranks its weight and bias shards are empty on rank 1.
    return nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Tanh(), nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 1))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 1, generator=gen))
            for _ in range(STEPS)]


INT8_STATE = {"state_dtype": "int8", "min_quantized_size": 0, "backend": "auto"}
"""Options of the "-int8" modes: every adapting tensor's state in int8 (this model's tensors are small)."""


def make_optimizer(algo: str, groups, **options):
    if algo == "lars":
        return fastlars.LARS(groups, **{"lr": 0.5, "momentum": 0.9, "backend": "foreach", **options})
    return fastlars.LAMB(groups, **{"lr": 0.02, "max_grad_norm": 0.5, "backend": "foreach", **options})


def lr_at(step: int, algo: str) -> float:
    base = 0.5 if algo == "lars" else 0.02
    return base * (1.0 + 0.5 * (step % 3))


def train(model: nn.Module, opt, algo: str, rank: int = 0, world: int = 1, poison_step: int | None = None,
          unchecked: bool = False) -> None:
    (opt.optim if hasattr(opt, "optim") else opt).skip_nonfinite = not unchecked
    for step, (x, y) in enumerate(batches()):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, algo)
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        loss = nn.functional.mse_loss(model(x[shard]), y[shard])
        loss.backward()
        if poison_step == step and rank == world - 1:  # NaN in every gradient this rank holds
            for p in model.parameters():
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                if grad.numel():
                    grad.view(-1)[0] = float("nan")
        opt.step()
        opt.zero_grad()


def single_process(algo: str, poison_step: int | None = None, **options) -> list[torch.Tensor]:
    model = make_model()
    opt = make_optimizer(algo, fastlars.param_groups(model, 1e-2), **options)
    train(model, opt, algo, poison_step=poison_step)
    return [p.detach().clone() for p in model.parameters()]


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def worker(rank: int, world: int, init_file: str, mode: str, algo: str, out: str, poison_step: int | None) -> None:
    _init(rank, world, init_file)
    try:
        model = make_model()
        options = {}
        if mode.endswith("-int8"):
            mode, options = mode.removesuffix("-int8"), INT8_STATE
        unchecked = mode.endswith("-unchecked")  # the optimizer steps with skip_nonfinite = False
        mode = mode.removesuffix("-unchecked")
        if mode == "fsdp2-refused":  # low-precision state over DTensor shards must be refused, naming why
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            try:
                make_optimizer(algo, fastlars.param_groups(model, 1e-2), **INT8_STATE)
                message = ""
            except ValueError as exc:
                message = str(exc)
            torch.save({"message": message}, out if rank == 0 else out + f".rank{rank}")
            dist.barrier()
            return
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
            opt = make_optimizer(algo, fastlars.param_groups(model, 1e-2), **options)
            train(wrapped, opt, algo, rank, world, poison_step, unchecked)
        elif mode == "zero":
            wrapped = nn.parallel.DistributedDataParallel(model)
            cls = fastlars.LARS if algo == "lars" else fastlars.LAMB
            probe = make_optimizer(algo, [torch.zeros(1, requires_grad=True)], **options)
            opt = fastlars.distributed.zero_redundancy_optimizer(
                fastlars.param_groups(model, 1e-2), optimizer_class=cls, **probe.defaults)
            train(wrapped, opt, algo, rank, world, poison_step, unchecked)
        elif mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = make_optimizer(algo, fastlars.param_groups(model, 1e-2))
            train(model, opt, algo, rank, world, poison_step, unchecked)
        else:
            raise ValueError(mode)
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
        skipped = opt.optim.skipped_steps if mode == "zero" else opt.skipped_steps
        if rank == 0:
            torch.save({"params": [t.clone() for t in full], "skipped": skipped}, out)
        else:
            torch.save({"params": [t.clone() for t in full], "skipped": skipped}, out + f".rank{rank}")
        # Release DDP/ZeRO (their gloo work and hooks) before the process group goes away.
        del opt, full
        if mode != "fsdp2":
            del wrapped
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()

