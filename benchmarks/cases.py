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
PEERS = ("reference+compile", "timm", "torch_optimizer", "torch_fused", "apex", "deepspeed", "bitsandbytes", "torchao",
         "optimi")
PEER_MODULES = {"apex": "apex.optimizers", "deepspeed": "deepspeed.ops.lamb", "timm": "timm.optim",
                "torch_optimizer": "torch_optimizer", "bitsandbytes": "bitsandbytes.optim", "torchao": "torchao.optim",
                "optimi": "optimi"}
"""The module each optional peer imports (inside its case only: the GPU image lacks several)."""


@dataclass(frozen=True)
class Case:
    """One implementation of one algorithm; `peer` names what a user would pick instead of fastlars."""

    implementation: str
    peer: bool
    factory: Callable[[list[Tensor], bool], StepAndBytes]


def _with_bytes(opt: torch.optim.Optimizer, params: list[Tensor], names: tuple[str, ...]) -> StepAndBytes:
    opt.step()  # creates the state
    return opt.step, lambda: compulsory_bytes(params, state_lists(opt, params, names), masters(opt, params))


def fastlars_optimizer(algorithm: str, backend: str, params: list[Tensor], master: bool,
                       state: str = "fp32") -> torch.optim.Optimizer:
    """LAMB (lr 1e-3, decay 0.01) or LARS (lr 1, momentum 0.9, decay 5e-5) over one group: every
    tensor decays and adapts, the costliest configuration. ``state``: the group's state_dtype (bf16/int8:
    tensors below the default min_quantized_size, 4096 elements, keep fp32 state)."""
    if algorithm == "lamb":
        return fastlars.LAMB(params, lr=1e-3, weight_decay=0.01, master_weights=master, backend=backend,
                             state_dtype=state)
    return fastlars.LARS(params, lr=1.0, momentum=0.9, weight_decay=5e-5, master_weights=master, backend=backend,
                         state_dtype=state)


def state_label(state: str) -> str:
    """The suffix of a fastlars row with low-precision state: " [int8 state]" ("" for fp32)."""
    return "" if state == "fp32" else f" [{state} state]"


def _all_state(opt: torch.optim.Optimizer, params: list[Tensor]) -> dict[str, list[Tensor]]:
    """Every state tensor of each param but the step count and the master (codes, block scales, fp32 or bf16
    buffers as each param stores them), for its compulsory bytes."""
    out: dict[str, list[Tensor]] = {}
    for i, p in enumerate(params):
        out[str(i)] = [t for k, t in opt.state[p].items()
                       if isinstance(t, Tensor) and k not in ("step", "master_param")]
    return out


def fastlars_case(algorithm: str, backend: str, state: str = "fp32") -> Case:
    """fastlars on ``backend``; with low-precision ``state`` the row is labelled e.g. "fastlars.native [int8
    state]" and its GB/s counts its own bytes: 1-byte codes and their fp32 block scales (or 2-byte bf16
    buffers) read and written once, beside the weights and gradients."""
    def factory(params: list[Tensor], master: bool) -> StepAndBytes:
        opt = fastlars_optimizer(algorithm, backend, params, master, state)
        if state == "fp32":
            return _with_bytes(opt, params, STATE_NAMES[algorithm])
        opt.step()  # creates the state
        return opt.step, lambda: compulsory_bytes(params, _all_state(opt, params), masters(opt, params))

    return Case(f"fastlars.{backend}{state_label(state)}", False, factory)


GRAD_SCALER_SUFFIX = "+GradScaler"
"""Appended to a table's dtype label (e.g. "fp32+GradScaler") when its cases step through a GradScaler."""


def with_grad_scaler(case: Case) -> Case:
    """``case`` stepped as mixed-precision training steps it: ``scaler.step(opt); scaler.update()`` with a
    ``torch.amp.GradScaler`` of its device. The scaler first checks every gradient for NaN/inf (its
    ``_amp_foreach_non_finite_check_and_unscale_`` pass); an optimizer with in-step scaling support
    (fastlars, torch's fused AdamW/SGD) then gets ``grad_scale`` and ``found_inf`` and steps once, dividing
    g by the scale inside its kernels and skipping on the flag, so fastlars takes no gradient-norm pass of
    its own; any other optimizer is unscaled in place (g ← g · 1/scale, a read and write of every gradient)
    and stepped unless found_inf. The scale stays 1.0 (init_scale 1, no growth), so repeated in-place
    unscaling leaves the gradients as they are; a kernel divides by it all the same, as by any scale.
    A case whose step is not an optimizer's (the compiled functional reference) cannot be stepped by a
    GradScaler: building it raises TypeError, which the suite records as the row's reason."""

    def factory(params: list[Tensor], master: bool) -> StepAndBytes:
        step, bytes_of = case.factory(params, master)
        opt = getattr(step, "__self__", None)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError("GradScaler.step needs an optimizer object; this case times a compiled functional step")
        device = params[0].device
        scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
        scaler.scale(torch.ones((), device=device))  # creates the scale and growth tracker

        def scaled_step() -> None:
            scaler.step(opt)
            scaler.update()

        return scaled_step, bytes_of

    return Case(case.implementation, case.peer, factory)


UNCHECKED_SUFFIX = " [skip_nonfinite=False]"
"""Appended to a fastlars row stepped with ``skip_nonfinite = False``."""


def unchecked(case: Case) -> Case:
    """The fastlars ``case`` with ``opt.skip_nonfinite = False``: no pass over the gradients for NaN/inf
    before the update (LARS takes ||g|| in its ||w|| pass), the semantics of torch's fused optimizers, which
    write what a non-finite gradient makes of their state. Labelled with UNCHECKED_SUFFIX."""

    def factory(params: list[Tensor], master: bool) -> StepAndBytes:
        step, bytes_of = case.factory(params, master)
        step.__self__.skip_nonfinite = False
        return step, bytes_of

    return Case(case.implementation + UNCHECKED_SUFFIX, case.peer, factory)


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
    """The reference backend's functional step under torch.compile: what a user gets by compiling.

    Every case's step is the same code object, so dynamo caches each new case's graph beside the earlier
    ones (guarded on the closure's tensors); past torch._dynamo.config.recompile_limit (8) entries it would
    run the step eagerly, as it did for every row after the eighth (the 1-thread rows of a default CPU
    run). So each case starts from a fresh dynamo cache and compiles its own step, for the thread count
    it is timed on (inductor's CPU kernels are built for torch.get_num_threads())."""

    def factory(params: list[Tensor], master: bool) -> StepAndBytes:
        torch._dynamo.reset()
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
    return cases + lowbit_peer_cases(algorithm, wanted)


# ---------------------------------------------------------------------------------- low-precision peers
def _state_tensors(value: Any) -> list[Tensor]:
    """The storages behind one state value: a torchao quantised state's codes and scales (its shared
    256-entry code map is left out, as is bitsandbytes' qmap), else the tensor itself."""
    if hasattr(value, "codes") and hasattr(value, "scale"):
        return [value.codes, value.scale]
    return [value] if isinstance(value, Tensor) else []


def _own_bytes(opt: torch.optim.Optimizer, params: list[Tensor], keys: tuple[str, ...]) -> int:
    """Compulsory bytes of a peer that keeps no master: read w, g and the state under `keys` that each param
    has (codes, block scales, Kahan compensations), write w and that state."""
    state = {k: [t for p in params if k in opt.state[p] for t in _state_tensors(opt.state[p][k])] for k in keys}
    return compulsory_bytes(params, state, None)


def _lowbit_peer(name: str, build: Callable[[list[Tensor]], torch.optim.Optimizer], keys: tuple[str, ...],
                 dtype: torch.dtype | None = None) -> Case:
    """A peer stepping `dtype` copies of the params (with `dtype` grads) when given, else the params."""

    def factory(params: list[Tensor], master: bool) -> StepAndBytes:
        if dtype is not None and any(p.dtype != dtype for p in params):
            copies = [p.detach().to(dtype).requires_grad_(True) for p in params]
            for c, p in zip(copies, params):
                c.grad = p.grad.to(dtype)
            params = copies
        opt = build(params)
        opt.step()  # creates the state (torchao: compiles one step per distinct shape)
        return opt.step, lambda: _own_bytes(opt, params, keys)

    return Case(name, True, factory)


def lowbit_peer_cases(algorithm: str, wanted: tuple[str, ...]) -> list[Case]:
    """The low-precision steps a user would pick instead of an int8/bf16 fastlars LAMB or LARS.

    * bitsandbytes LAMB8bit / LARS8bit (0.50): on the CPU their 8-bit state (tensors of >= 4096 elements;
      256-element blocks, dynamic-tree codes) is stepped by the blockwise Adam / momentum update, which has
      no trust ratio and no update-norm clip (max_unorm must stay 1.0); smaller tensors keep fp32 state and
      take the 32-bit Adam / momentum step with the clip min(1, max_unorm·||w||/||u||) (max_unorm 1.0 /
      0.02), one .item() each. Their CUDA 8-bit table has no "lamb"/"lars" entry, so there the first step
      of a >= 4096-element tensor raises ValueError and the row is recorded as skipped with it.
    * torchao.optim.AdamW8bit (LAMB only: torchao has no 8-bit SGD): AdamW whose m and v are quantised
      when a tensor has >= 4096 elements and a multiple of 256 (fp32 otherwise); one torch.compile'd step
      per tensor, compiled once per distinct shape.
    * optimi.AdamW (LAMB) / optimi.SGD with momentum (LARS) on bf16 weights with Kahan summation (bf16
      m, v and compensation buffers), stepping bf16 copies of the params when the run's are not bf16.

    Their bytes (in the label) are counted from the state each one holds: read w, g and every state
    buffer (codes + block scales, compensations), write w and the buffers; no master is kept.
    """
    cases: list[Case] = []
    if "bitsandbytes" in wanted:
        if algorithm == "lamb":
            def bnb_lamb(params: list[Tensor]) -> torch.optim.Optimizer:
                from bitsandbytes.optim import LAMB8bit

                return LAMB8bit(params, lr=1e-3, weight_decay=0.01)

            cases.append(_lowbit_peer("bitsandbytes.LAMB8bit = 8-bit AdamW, no trust ratio [w,g,m,v codes+scales]",
                                      bnb_lamb, ("state1", "state2", "absmax1", "absmax2")))
        else:
            def bnb_lars(params: list[Tensor]) -> torch.optim.Optimizer:
                from bitsandbytes.optim import LARS8bit

                return LARS8bit(params, lr=1.0, momentum=0.9, weight_decay=5e-5)

            cases.append(_lowbit_peer("bitsandbytes.LARS8bit = 8-bit SGD-momentum, no trust ratio [w,g,m codes+scales]",
                                      bnb_lars, ("state1", "absmax1")))
    if "torchao" in wanted and algorithm == "lamb":
        def torchao_adamw(params: list[Tensor]) -> torch.optim.Optimizer:
            from torchao.optim import AdamW8bit

            return AdamW8bit(params, lr=1e-3, weight_decay=0.01)

        cases.append(_lowbit_peer("torchao.AdamW8bit (compiled) [w,g,m,v codes+scales]", torchao_adamw,
                                  ("exp_avg", "exp_avg_sq")))
    if "optimi" in wanted:
        if algorithm == "lamb":
            def optimi_adamw(params: list[Tensor]) -> torch.optim.Optimizer:
                from optimi import AdamW

                return AdamW(params, lr=1e-3, weight_decay=0.01, kahan_sum=True)

            cases.append(_lowbit_peer("optimi.AdamW(bf16 w, Kahan) [bf16 w,g,m,v,comp]", optimi_adamw,
                                      ("exp_avg", "exp_avg_sq", "kahan_comp"), torch.bfloat16))
        else:
            def optimi_sgd(params: list[Tensor]) -> torch.optim.Optimizer:
                from optimi import SGD

                return SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-5, kahan_sum=True)

            cases.append(_lowbit_peer("optimi.SGD(bf16 w, Kahan, momentum) [bf16 w,g,m,comp]", optimi_sgd,
                                      ("exp_avg", "kahan_comp"), torch.bfloat16))
    return cases


def unavailable_peers(device: torch.device, wanted: tuple[str, ...] | None = None) -> dict[str, str]:
    """Peers (among `wanted`, default all) that cannot run here, with the reason printed next to the table."""
    reasons: dict[str, str] = {}
    for peer, module in PEER_MODULES.items():
        if wanted is not None and peer not in wanted:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:
            reasons[peer] = f"not importable ({type(exc).__name__}: {str(exc)[:80]})"
    if device.type != "cuda":
        for peer in ("apex", "deepspeed"):
            if wanted is None or peer in wanted:
                reasons.setdefault(peer, "CUDA-only")
    return reasons
