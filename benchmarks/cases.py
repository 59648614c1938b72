"""What is timed: one optimizer step of fastlars on each backend, and of the peers a user would pick
instead. A case factory takes the parameters (with their gradients) and whether fp32 master weights
are kept, builds the optimizer with its state, and returns (step, compulsory_bytes)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import fastlars
from benchmarks.measure import compulsory_bytes, masters, state_lists
from fastlars import functional

StepAndBytes = tuple[Callable[[], Any], Callable[[], int]]
STATE_NAMES = {"lamb": ("exp_avg", "exp_avg_sq"), "lars": ("momentum_buffer",)}
PEERS = ("reference+compile", "timm", "torch_optimizer", "torch_fused", "apex", "deepspeed")


@dataclass(frozen=True)
class Case:
    """One implementation of one algorithm; `peer` names what a user would pick instead of fastlars."""

    implementation: str
    peer: bool
    factory: Callable[[list[Tensor], bool], StepAndBytes]


def _with_bytes(opt: torch.optim.Optimizer, params: list[Tensor], names: tuple[str, ...]) -> StepAndBytes:
    opt.step()  # creates the state
    return opt.step, lambda: compulsory_bytes(params, state_lists(opt, params, names), masters(opt, params))


def fastlars_optimizer(algorithm: str, backend: str, params: list[Tensor], master: bool) -> torch.optim.Optimizer:
    """LAMB (lr 1e-3, decay 0.01) or LARS (lr 1, momentum 0.9, decay 5e-5) over one group: every
    tensor decays and adapts, the costliest configuration."""
    if algorithm == "lamb":
        return fastlars.LAMB(params, lr=1e-3, weight_decay=0.01, master_weights=master, backend=backend)
    return fastlars.LARS(params, lr=1.0, momentum=0.9, weight_decay=5e-5, master_weights=master, backend=backend)


def fastlars_case(algorithm: str, backend: str) -> Case:
    def factory(params: list[Tensor], master: bool) -> StepAndBytes:
        return _with_bytes(fastlars_optimizer(algorithm, backend, params, master), params, STATE_NAMES[algorithm])

    return Case(f"fastlars.{backend}", False, factory)


def native_plan_case(algorithm: str, plan: str) -> Case:
    """fastlars native CUDA under FASTLARS_CUDA_PLAN=``plan`` (csrc/cuda/launch_plan.h): "wave" closes a
    launch group at half the L2 so pass 2 re-reads from L2 (many launches), "onepass" only when the
    kernel-argument table is full (3 launches per step for BERT-Large LAMB, pass 2 from DRAM). The GPU
    benchmark records both so the default is picked by measurement."""
    inner = fastlars_case(algorithm, "native").factory

    def factory(params: list[Tensor], master: bool) -> StepAndBytes:
        step, bytes_of = inner(params, master)

        def run() -> None:
            before = {k: os.environ.pop(k, None) for k in ("FASTLARS_CUDA_PLAN", "FASTLARS_CUDA_WAVE_BYTES")}
            os.environ["FASTLARS_CUDA_PLAN"] = plan
            try:
                step()
            finally:
                del os.environ["FASTLARS_CUDA_PLAN"]
                os.environ.update({k: v for k, v in before.items() if v is not None})

        return run, bytes_of

    return Case(f"fastlars.native({plan} plan)", False, factory)


def compiled_reference_case(algorithm: str) -> Case:
    """The reference backend's functional step under torch.compile: what a user gets by compiling."""

    def factory(params: list[Tensor], master: bool) -> StepAndBytes:
        opt = fastlars_optimizer(algorithm, "reference", params, master)
        opt.step()
        group, grads = opt.param_groups[0], [p.grad for p in params]
        state = state_lists(opt, params, STATE_NAMES[algorithm])
        kept = masters(opt, params)
        steps = [opt.state[p]["step"] for p in params]

        @torch.no_grad()
        def step() -> None:
            if algorithm == "lamb":
                torch._foreach_add_(steps, 1.0)
                functional.lamb_step(params, grads, state["exp_avg"], state["exp_avg_sq"], steps, lr=group["lr"],
                                     weight_decay=group["weight_decay"], master_params=kept, backend="reference")
            else:
                functional.lars_step(params, grads, state["momentum_buffer"], lr=group["lr"], momentum=0.9,
                                     weight_decay=group["weight_decay"], master_params=kept, backend="reference")

        return torch.compile(step), lambda: compulsory_bytes(params, state, kept)

    return Case("fastlars.reference+torch.compile", True, factory)


def _peer(name: str, build: Callable[[list[Tensor]], torch.optim.Optimizer], names: tuple[str, ...]) -> Case:
    return Case(name, True, lambda params, master: _with_bytes(build(params), params, names))


def peer_cases(algorithm: str, wanted: tuple[str, ...]) -> list[Case]:
    """The peers of `algorithm` among `wanted` (names from PEERS). Peers without a master-weight
    option run on the params as they are; their bytes are counted for what they touch."""
    cases: list[Case] = []
    names = STATE_NAMES[algorithm]
    if "reference+compile" in wanted:
        cases.append(compiled_reference_case(algorithm))
    if "timm" in wanted:
        def timm_opt(params: list[Tensor]) -> torch.optim.Optimizer:
            from timm.optim import Lamb, Lars

            if algorithm == "lamb":
                return Lamb(params, lr=1e-3, weight_decay=0.01)
            return Lars(params, lr=1.0, momentum=0.9, weight_decay=5e-5)

        cases.append(_peer(f"timm.{algorithm.capitalize()}", timm_opt, names))
    if "torch_optimizer" in wanted and algorithm == "lamb":
        def torch_optimizer_lamb(params: list[Tensor]) -> torch.optim.Optimizer:
            import torch_optimizer

            return torch_optimizer.Lamb(params, lr=1e-3, weight_decay=0.01)

        cases.append(_peer("torch_optimizer.Lamb", torch_optimizer_lamb, names))
    if "torch_fused" in wanted:
        if algorithm == "lamb":
            cases.append(_peer("torch.AdamW(fused) [same 28 B]", lambda p: torch.optim.AdamW(
                p, lr=1e-3, weight_decay=0.01, fused=True), names))
        else:
            cases.append(_peer("torch.SGD(fused, momentum) [same 20 B]", lambda p: torch.optim.SGD(
                p, lr=0.1, momentum=0.9, weight_decay=5e-5, fused=True), names))
    if "apex" in wanted and algorithm == "lamb":
        def apex_lamb(params: list[Tensor]) -> torch.optim.Optimizer:
            from apex.optimizers import FusedLAMB

            return FusedLAMB(params, lr=1e-3, weight_decay=0.01)

        cases.append(_peer("apex.FusedLAMB", apex_lamb, names))
    if "deepspeed" in wanted and algorithm == "lamb":
        def deepspeed_lamb(params: list[Tensor]) -> torch.optim.Optimizer:
            from deepspeed.ops.lamb import FusedLamb

            return FusedLamb(params, lr=1e-3, weight_decay=0.01)

        cases.append(_peer("deepspeed.FusedLamb", deepspeed_lamb, names))
    return cases


def unavailable_peers(device: torch.device) -> dict[str, str]:
    """Peers that cannot run here, with the reason printed next to the table."""
    reasons: dict[str, str] = {}
    for module, peer in (("apex.optimizers", "apex"), ("deepspeed.ops.lamb", "deepspeed"), ("timm.optim", "timm"),
                         ("torch_optimizer", "torch_optimizer")):
        try:
            importlib.import_module(module)
        except Exception as exc:
            reasons[peer] = f"not importable ({type(exc).__name__}: {str(exc)[:80]})"
    if device.type != "cuda":
        for peer in ("apex", "deepspeed"):
            reasons.setdefault(peer, "CUDA-only")
    return reasons
