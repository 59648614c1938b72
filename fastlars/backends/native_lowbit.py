"""The native backend's low-precision step: compiled kernels for bf16 and blockwise int8 optimizer state and
stochastically rounded bf16 weights, on the CPU (csrc/cpu/lowbit_ops.cpp) and on CUDA (csrc/cuda/lowbit.cu,
glue csrc/cuda/lowbit_ops.cpp), both registered for the ops of :mod:`fastlars._ops`.

Same signatures and maths as :mod:`fastlars.backends.reference_lowbit` (THE spec; format in
:mod:`fastlars.backends.quantization`): LAMB in two passes per group of tensors, the first decoding m and
v, updating them in fp32, storing them (blockwise quantised / rounded to bf16) and accumulating ||w||²
and ||u||² of the direction computed from what the stored state decodes to, the second applying
w ← w − lr·r·u with that same u; LARS decodes its momentum, updates it in fp32, stores it quantised and
moves the weights by the fp32 momentum. Lists may mix formats (small tensors keep fp32 state). On CUDA every
device value (lr tensor, step counts, grad scale, found_inf) is read by the kernels: no host synchronisation,
capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlars import _ops  # noqa: F401  (defines the op schemas the kernels register against)
from fastlars.backends import native
from fastlars.backends import quantization as q
from fastlars.backends._common import LambHyper, LarsHyper, Scalar
from fastlars.backends.reference_lowbit import StateBuffer, StochasticRounding

_OPS = ("lamb_lowbit_step_", "lars_lowbit_step_")


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def unavailable_reason(device: torch.device) -> str | None:
    """None when fastlars._C carries the low-precision kernels for ``device``'s type (CPU or CUDA), else why not."""
    key = _DISPATCH_KEYS.get(device.type)
    if key is None:
        return f"the native low-precision kernels are built for the CPU and CUDA only, not for {device.type}"
    reason = native.unavailable_reason(device)
    if reason is not None:
        return reason
    for op in _OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlars::{op}", key):
            return f"fastlars._C has no {key} kernel for fastlars::{op} (an extension built before it: rebuild)"
    return None


def _split(buffers: list[StateBuffer], code_map: q.CodeMap, name: str) -> tuple[list[Tensor], list[Tensor]]:
    """(values, absmax) lists of the op: codes and scales of int8 buffers, the tensor and an empty
    placeholder for bf16/fp32 ones."""
    values, scales = [], []
    for i, b in enumerate(buffers):
        if isinstance(b, q.QuantizedBuffer):
            if b.code_map is not code_map or b.block != q.BLOCK_SIZE:
                raise ValueError(f"{name}[{i}]: the native kernels step the {code_map.name} map in blocks of "
                                 f"{q.BLOCK_SIZE}, got {b.code_map.name} in blocks of {b.block}")
            values.append(b.codes)
            scales.append(b.absmax)
        else:
            values.append(b)
            scales.append(torch.empty(0, device=b.device))
    return values, scales


_KEYS: dict[tuple[int, int], int] = {}


def _rounding_keys(rounding: StochasticRounding | None, master_params: list[Tensor] | None, n: int) -> list[int]:
    """Per-param sr_tensor_key when bf16 params without masters are stochastically rounded, else []
    (with a master list, the reference rounds every param to nearest)."""
    if rounding is None or master_params is not None:
        return []
    if rounding.index_offsets is not None and any(rounding.index_offsets):
        raise ValueError("rounding: the native kernels step whole tensors (index offsets must be 0)")
    keys = []
    for index in rounding.tensor_indices[:n]:
        key = _KEYS.get((rounding.seed, index))
        if key is None:
            key = _KEYS[rounding.seed, index] = q.sr_tensor_key(rounding.seed, index, q.STREAM_PARAM)
        keys.append(key)
    return keys


def _ratios(trust_ratios: Tensor | None, params: list[Tensor]) -> Tensor:
    """Where the op writes the ratios: the caller's tensor, else a fresh one on the params' device (NaN stays
    when the step is skipped)."""
    if trust_ratios is not None:
        return trust_ratios
    device = params[0].device if params else torch.device("cpu")
    return torch.full((len(params),), float("nan"), device=device)


def lamb_op_args(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[StateBuffer],
    exp_avg_sqs: list[StateBuffer],
    master_params: list[Tensor] | None,
    steps: list[Tensor],
    *,
    lr: Scalar,
    h: LambHyper,
    clip_coef: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    rounding: StochasticRounding | None = None,
    trust_ratios: Tensor | None = None,
) -> tuple:
    """The arguments of ``fastlars::lamb_lowbit_step_`` for :func:`lamb_step`'s; the last one is the tensor
    receiving the trust ratios."""
    m_values, m_scales = _split(exp_avgs, q.SIGNED_MAP, "exp_avgs")
    v_values, v_scales = _split(exp_avg_sqs, q.UNSIGNED_MAP, "exp_avg_sqs")
    lr_value, lr_tensor = native._lr(lr)
    return (
        params, grads, m_values, m_scales, v_values, v_scales, master_params or [], steps,
        _rounding_keys(rounding, master_params, len(params)), lr_value, lr_tensor, h.beta1, h.beta2, h.eps,
        h.weight_decay, h.bias_correction, h.grad_averaging, h.decoupled_decay, h.trust_clip, h.adapt,
        native._bounds(h.trust_ratio_bounds), h.maximize, clip_coef, grad_scale, found_inf,
        _ratios(trust_ratios, params),
    )


def lamb_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[StateBuffer],
    exp_avg_sqs: list[StateBuffer],
    master_params: list[Tensor] | None,
    steps: list[Tensor],
    *,
    lr: Scalar,
    h: LambHyper,
    clip_coef: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    rounding: StochasticRounding | None = None,
    trust_ratios: Tensor | None = None,
) -> Tensor:
    """One LAMB update with low-precision state in the compiled kernels of the params' device; returns the
    trust ratios (arguments and maths of :func:`fastlars.backends.reference_lowbit.lamb_step`)."""
    op_args = lamb_op_args(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr=lr, h=h, clip_coef=clip_coef,
                           grad_scale=grad_scale, found_inf=found_inf, rounding=rounding, trust_ratios=trust_ratios)
    torch.ops.fastlars.lamb_lowbit_step_(*op_args)
    return op_args[-1]


def lars_op_args(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[StateBuffer],
    master_params: list[Tensor] | None,
    grad_norms: Tensor,
    steps: list[Tensor] | None = None,
    *,
    lr: Scalar,
    h: LarsHyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    rounding: StochasticRounding | None = None,
    trust_ratios: Tensor | None = None,
) -> tuple:
    """The arguments of ``fastlars::lars_lowbit_step_`` for :func:`lars_step`'s; the last one is the tensor
    receiving the trust ratios."""
    if rounding is not None and steps is None:
        raise ValueError("steps: stochastic rounding keys its bits by the step count; pass steps")
    values, scales = _split(momentum_buffers, q.SIGNED_MAP, "momentum_buffers")
    lr_value, lr_tensor = native._lr(lr)
    return (
        params, grads, values, scales, master_params or [], grad_norms, steps or [],
        _rounding_keys(rounding, master_params, len(params)), lr_value, lr_tensor, h.momentum, h.weight_decay,
        h.trust_coefficient, h.eps, h.nesterov, h.trust_clip, h.momentum_style == "mlperf", h.adapt,
        native._bounds(h.trust_ratio_bounds), h.maximize, grad_scale, found_inf, _ratios(trust_ratios, params),
    )


def lars_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[StateBuffer],
    master_params: list[Tensor] | None,
    grad_norms: Tensor,
    steps: list[Tensor] | None = None,
    *,
    lr: Scalar,
    h: LarsHyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    rounding: StochasticRounding | None = None,
    trust_ratios: Tensor | None = None,
) -> Tensor:
    """One LARS update with a low-precision momentum in the compiled kernels of the params' device; returns
    the trust ratios (arguments and maths of :func:`fastlars.backends.reference_lowbit.lars_step`)."""
    op_args = lars_op_args(params, grads, momentum_buffers, master_params, grad_norms, steps, lr=lr, h=h,
                           grad_scale=grad_scale, found_inf=found_inf, rounding=rounding, trust_ratios=trust_ratios)
    torch.ops.fastlars.lars_lowbit_step_(*op_args)
    return op_args[-1]
