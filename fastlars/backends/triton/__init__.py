"""The Triton backend: multi-tensor Triton kernels behind the ops ``fastlars::triton_*``.

Same functions and maths as :mod:`fastlars.backends.reference` (read there). Each stage is one launch
over all tensors of a group (per storage dtype): a chunk table maps programs to (tensor, offset), the
tensors are reached through a table of data pointers, norms are per-chunk sums of squares reduced per
tensor in a fixed order (deterministic), and every update is fp32 in registers with masked stores that
honour ``found_inf`` without a host synchronisation (capturable; lr may be a device tensor).

Where it runs: on CUDA devices whenever ``triton`` imports; on CPU tensors only under the Triton
interpreter, i.e. when ``TRITON_INTERPRET=1`` was set before triton (and fastlars) were imported. That
is how CI checks these kernels without a GPU. Importing this module never fails: without triton the
backend reports itself unavailable with the reason, and naming it explicitly raises that reason.

Low-precision state (bf16 / blockwise int8 moments, stochastically rounded bf16 weights) is stepped by
:mod:`fastlars.backends.triton.lowbit` (the maths of :mod:`fastlars.backends.reference_lowbit`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from fastlars.backends._common import LambHyper, LarsHyper, Scalar

try:
    from fastlars.backends.triton import ops as _ops
except ImportError as exc:  # triton missing or broken: report, never fail the import
    _ops = None
    _IMPORT_ERROR: str | None = (
        f"triton cannot be imported ({exc}); it is installed with torch on Linux x86_64 (pip install triton)"
    )
else:
    _IMPORT_ERROR = None


def unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else a sentence saying why not."""
    if _ops is None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _ops.INTERPRETED:
            return None
        set_now = os.environ.get("TRITON_INTERPRET") == "1"
        return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before triton "
                "and fastlars are imported" + (" (it was set after they were)" if set_now else ""))
    return f"Triton kernels run on CUDA devices (and CPU under TRITON_INTERPRET=1), not on {device.type}"


def _lr(lr: Scalar) -> tuple[float, Tensor | None]:
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


def _bounds(bounds: tuple[float, float] | None) -> list[float] | None:
    return None if bounds is None else [float(bounds[0]), float(bounds[1])]


def grad_norms(grads: list[Tensor], grad_scale: Tensor | None) -> Tensor:
    """Per-tensor fp32 L2 norms of grads / grad_scale: out[i] = √(Σ_k grads[i][k]²) / grad_scale."""
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    return torch.ops.fastlars.triton_grad_norms(grads, grad_scale)


def lars_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    master_params: list[Tensor] | None,
    grad_norms: Tensor,
    *,
    lr: Scalar,
    h: LarsHyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    trust_ratios: Tensor | None = None,
) -> None:
    """LARS over a tensor list in Triton kernels; the maths of ``reference.lars_step``:

    d = g + λ·w ;  r = η·||w|| / (||g|| + λ·||w|| + ε)
    mlperf:  v = μ·v + lr·r·d ;  w = w − v          torch:  v = μ·v + r·d ;  w = w − lr·v
    """
    lr_value, lr_tensor = _lr(lr)
    torch.ops.fastlars.triton_lars_step_(
        params, grads, momentum_buffers, master_params or [], grad_norms, lr_value, lr_tensor,
        h.momentum, h.weight_decay, h.trust_coefficient, h.eps, h.nesterov, h.trust_clip,
        h.momentum_style == "mlperf", h.adapt, _bounds(h.trust_ratio_bounds), h.maximize, grad_scale, found_inf,
        trust_ratios,
    )


def lamb_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    master_params: list[Tensor] | None,
    steps: list[Tensor],
    *,
    lr: Scalar,
    h: LambHyper,
    clip_coef: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    trust_ratios: Tensor | None = None,
) -> None:
    """LAMB over a tensor list in Triton kernels; the maths of ``reference.lamb_step``:

    m = β1·m + (1−β1)·g ;  v = β2·v + (1−β2)·g² ;  u = m̂ / (√v̂ + ε) + λ·w ;  w = w − lr·(||w||/||u||)·u
    """
    lr_value, lr_tensor = _lr(lr)
    torch.ops.fastlars.triton_lamb_step_(
        params, grads, exp_avgs, exp_avg_sqs, master_params or [], steps, lr_value, lr_tensor,
        h.beta1, h.beta2, h.eps, h.weight_decay, h.bias_correction, h.grad_averaging, h.decoupled_decay,
        h.trust_clip, h.adapt, _bounds(h.trust_ratio_bounds), h.maximize, clip_coef, grad_scale, found_inf,
        trust_ratios,
    )
