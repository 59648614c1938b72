"""Functional LARS and LAMB: one signature per algorithm, the single dispatch point to the backends.

These functions hold no state: the caller owns the buffers, counts steps and decides what to skip.
The optimizer classes in :mod:`fastlars.optim` are thin wrappers over them. The maths is written out
in :mod:`fastlars.backends.reference`.

State buffers may be low-precision (:mod:`fastlars.backends.quantization`): bf16 tensors, or int8
codes with block scales as :class:`~fastlars.backends.quantization.QuantizedBuffer`; bf16 weights
without masters may be stochastically rounded (``rounding``). Such calls go to the backend's
low-precision module (:func:`fastlars.backends.resolve_low_precision`; the maths in
:mod:`fastlars.backends.reference_lowbit`); a backend without one raises.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from fastlars import backends
from fastlars.backends._common import LambHyper, LarsHyper, Scalar
from fastlars.backends.quantization import QuantizedBuffer
from fastlars.backends.reference import lamb_clip_coefficient
from fastlars.backends.reference_lowbit import StateBuffer, StochasticRounding


def grad_norms(grads: list[Tensor], grad_scale: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """Per-tensor fp32 L2 norms of unscaled gradients, as one 1-D tensor on the gradients' device.

    out[i] = ||grads[i]|| / grad_scale   (grad_scale = 1 when None)
    """
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    name = backends.resolve(backend, grads[0].device)
    return backends.load(name).grad_norms(grads, grad_scale)


def global_norm(per_tensor_norms: list[Tensor]) -> Tensor:
    """||G|| = sqrt(Σ_i ||g_i||²) over several vectors of per-tensor norms (possibly on several devices)."""
    device = per_tensor_norms[0].device
    sums = [n.to(device, non_blocking=True).float().square().sum() for n in per_tensor_norms]
    return torch.stack(sums).sum().sqrt()


def lars_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[StateBuffer],
    *,
    lr: Scalar,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    nesterov: bool = False,
    trust_clip: bool = False,
    momentum_style: str = "mlperf",
    adapt: bool | None = None,
    trust_ratio_bounds: tuple[float, float] | None = None,
    maximize: bool = False,
    master_params: list[Tensor] | None = None,
    grad_norms: Tensor | None = None,
    weight_norms: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    trust_ratios: Tensor | None = None,
    steps: list[Tensor] | None = None,
    rounding: StochasticRounding | None = None,
    low_precision: bool | None = None,
    backend: str = "auto",
) -> None:
    """One LARS update of ``params`` (and their ``momentum_buffers``) in place.

    d = g + λ·w ;  r = η·||w|| / (||g|| + λ·||w|| + ε)  (1 if either norm is 0 or not adapting)
    mlperf:  v = μ·v + lr·r·d ;  w = w − v      torch:  v = μ·v + r·d ;  w = w − lr·v

    ``grad_norms`` may carry precomputed ||g|| (of the unscaled gradients); ``master_params`` are fp32
    copies updated instead of low-precision params, which then receive the rounded result. Nothing is
    written when ``found_inf`` is non-zero. ``weight_norms`` (foreach backend only) carries
    precomputed whole-tensor ||w|| when the tensors are shards (fastlars.distributed).
    ``trust_ratios`` (a 1-D fp32 tensor of len(params) on their device) receives each tensor's r.
    ``rounding`` stochastically rounds bf16 params without masters, keyed by ``steps`` (t per tensor);
    ``low_precision`` says whether the call carries low-precision state (None: look at the buffers).
    """
    if not params:
        return
    _check_ratio_output(trust_ratios, params)
    if low_precision is None:
        low_precision = _carries_low_precision(params, master_params, rounding, momentum_buffers)
    hyper = LarsHyper(
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        nesterov=nesterov,
        trust_clip=trust_clip,
        momentum_style=momentum_style,
        adapt=(weight_decay != 0.0) if adapt is None else adapt,
        trust_ratio_bounds=trust_ratio_bounds,
        maximize=maximize,
    )
    if low_precision:
        name = backends.resolve_low_precision(backend, params[0].device)
        if weight_norms is not None:
            raise ValueError("weight_norms: sharded parameters take fp32 state only")
        impl = backends.load(name)
        if grad_norms is None:
            grad_norms = impl.grad_norms(grads, grad_scale)
        backends.load_low_precision(name).lars_step(
            params, grads, momentum_buffers, master_params, grad_norms, steps, lr=lr, h=hyper,
            grad_scale=grad_scale, found_inf=found_inf, rounding=rounding, trust_ratios=trust_ratios)
        return
    impl = backends.load(backends.resolve(backend, params[0].device))
    if grad_norms is None:
        folds = getattr(impl, "folds_grad_norms", None)
        if folds is not None and folds(params[0].device):  # ||g|| beside ||w|| in the kernel's norm pass
            grad_norms = torch.empty(0, dtype=torch.float32, device=params[0].device)
        else:
            grad_norms = impl.grad_norms(grads, grad_scale)
    extra = {} if weight_norms is None else {"weight_norms": _needs_foreach(impl, "weight_norms", weight_norms)}
    if trust_ratios is not None:
        extra["trust_ratios"] = trust_ratios
    impl.lars_step(
        params,
        grads,
        momentum_buffers,
        master_params,
        grad_norms,
        lr=lr,
        h=hyper,
        grad_scale=grad_scale,
        found_inf=found_inf,
        **extra,
    )


def lamb_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[StateBuffer],
    exp_avg_sqs: list[StateBuffer],
    steps: list[Tensor],
    *,
    lr: Scalar = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    bias_correction: bool = True,
    grad_averaging: bool = True,
    max_grad_norm: float | None = None,
    global_grad_norm: Tensor | None = None,
    decoupled_decay: bool = False,
    trust_clip: bool = False,
    adapt: bool | None = None,
    trust_ratio_bounds: tuple[float, float] | None = None,
    maximize: bool = False,
    master_params: list[Tensor] | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    reduce_sumsq: Callable[[Tensor], Tensor] | None = None,
    trust_ratios: Tensor | None = None,
    rounding: StochasticRounding | None = None,
    low_precision: bool | None = None,
    backend: str = "auto",
) -> None:
    """One LAMB update of ``params``, ``exp_avgs`` (m) and ``exp_avg_sqs`` (v) in place.

    g = g · max_grad_norm/||G|| if ||G|| > max_grad_norm ;  m = β1·m + (1−β1)·g ;  v = β2·v + (1−β2)·g²
    u = (m/(1−β1^t)) / (√(v/(1−β2^t)) + ε) + λ·w ;  r = ||w||/||u|| ;  w = w − lr·r·u

    ``steps[i]`` holds t for this update (already counted by the caller). ``global_grad_norm`` is
    ||G|| over every gradient the clip covers; when None and clipping is on, it is computed from
    ``grads``. Nothing is written when ``found_inf`` is non-zero. ``reduce_sumsq`` (foreach backend
    only) sums the per-tensor Σw², Σu² of shards over ranks, giving whole-tensor norms.
    ``trust_ratios`` (a 1-D fp32 tensor of len(params) on their device) receives each tensor's r.
    ``rounding`` stochastically rounds bf16 params without masters; ``low_precision`` says whether the
    call carries low-precision state (None: look at the buffers).
    """
    if not params:
        return
    _check_ratio_output(trust_ratios, params)
    if low_precision is None:
        low_precision = _carries_low_precision(params, master_params, rounding, exp_avgs, exp_avg_sqs)
    hyper = LambHyper(
        beta1=betas[0],
        beta2=betas[1],
        eps=eps,
        weight_decay=weight_decay,
        bias_correction=bias_correction,
        grad_averaging=grad_averaging,
        decoupled_decay=decoupled_decay,
        trust_clip=trust_clip,
        adapt=(weight_decay != 0.0) if adapt is None else adapt,
        trust_ratio_bounds=trust_ratio_bounds,
        maximize=maximize,
    )
    name = (backends.resolve_low_precision if low_precision else backends.resolve)(backend, params[0].device)
    impl = backends.load(name)
    clip_coef = None
    if max_grad_norm:
        if global_grad_norm is None:
            global_grad_norm = global_norm([impl.grad_norms(grads, grad_scale)])
        clip_coef = lamb_clip_coefficient(global_grad_norm, max_grad_norm)
    if low_precision:
        if reduce_sumsq is not None:
            raise ValueError("reduce_sumsq: sharded parameters take fp32 state only")
        backends.load_low_precision(name).lamb_step(
            params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr=lr, h=hyper, clip_coef=clip_coef,
            grad_scale=grad_scale, found_inf=found_inf, rounding=rounding, trust_ratios=trust_ratios)
        return
    extra = {} if reduce_sumsq is None else {"reduce_sumsq": _needs_foreach(impl, "reduce_sumsq", reduce_sumsq)}
    if trust_ratios is not None:
        extra["trust_ratios"] = trust_ratios
    impl.lamb_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        master_params,
        steps,
        lr=lr,
        h=hyper,
        clip_coef=clip_coef,
        grad_scale=grad_scale,
        found_inf=found_inf,
        **extra,
    )


def _carries_low_precision(params: list[Tensor], master_params: list[Tensor] | None,
                           rounding: StochasticRounding | None, *buffer_lists: list[StateBuffer]) -> bool:
    """Whether a call needs a low-precision step: stochastic rounding, an int8 buffer, or a buffer whose
    dtype is not the fp32 path's (fp32 beside a master, else the param's dtype)."""
    if rounding is not None:
        return True
    for buffers in buffer_lists:
        for i, (b, p) in enumerate(zip(buffers, params)):
            if isinstance(b, QuantizedBuffer):
                return True
            has_master = master_params is not None and master_params[i] is not p
            if b.dtype != (torch.float32 if has_master else p.dtype):
                return True
    return False


def _check_ratio_output(trust_ratios: Tensor | None, params: list[Tensor]) -> None:
    """The optional trust-ratio output must be a contiguous 1-D fp32 tensor, one element per param."""
    if trust_ratios is None:
        return
    device = params[0].device
    if not (isinstance(trust_ratios, Tensor) and trust_ratios.dtype == torch.float32 and trust_ratios.dim() == 1
            and trust_ratios.numel() == len(params) and trust_ratios.device == device
            and trust_ratios.is_contiguous()):
        got = (f"{trust_ratios.dtype} of shape {tuple(trust_ratios.shape)} on {trust_ratios.device}"
               if isinstance(trust_ratios, Tensor) else type(trust_ratios).__name__)
        raise ValueError(f"trust_ratios: expected a contiguous 1-D float32 tensor of {len(params)} elements on "
                         f"{device}, got {got}")


def _needs_foreach(impl: ModuleType, name: str, value: Any) -> Any:
    """Sharded-norm arguments exist in the foreach backend only."""
    if impl is not backends.load("foreach"):
        raise ValueError(f"{name}: only the foreach backend accepts it (used for sharded parameters)")
    return value
