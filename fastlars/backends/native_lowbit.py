"""The native backend's low-precision step: compiled CPU kernels (csrc/cpu/lowbit_ops.cpp) for bf16 and
blockwise int8 optimizer state and stochastically rounded bf16 weights.

Same signatures and maths as :mod:`fastlars.backends.reference_lowbit` (THE spec; format in
:mod:`fastlars.backends.quantization`): LAMB in two passes per group of tensors, the first decoding m and
v, updating them in fp32, storing them (blockwise quantised / rounded to bf16) and accumulating ||w||²
and ||u||² of the direction computed from what the stored state decodes to, the second applying
w ← w − lr·r·u with that same u; LARS decodes its momentum, updates it in fp32, stores it quantised and
moves the weights by the fp32 momentum. Lists may mix formats (small tensors keep fp32 state). CPU only:
CUDA groups with low-precision state run on :mod:`fastlars.backends.triton.lowbit` (or the reference).
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


def unavailable_reason(device: torch.device) -> str | None:
    """None on the CPU when fastlars._C carries the low-precision CPU kernels, else why not."""
    if device.type != "cpu":
        return (f"the native low-precision kernels are built for the CPU only (csrc/cpu/lowbit_ops.cpp), "
                f"not for {device.type}")
    reason = native.unavailable_reason(device)
    if reason is not None:
        return reason
    for op in _OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlars::{op}", "CPU"):
            return f"fastlars._C has no CPU kernel for fastlars::{op} (an extension built before it: rebuild)"
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
            scales.append(torch.empty(0))
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
    """Where the op writes the ratios: the caller's tensor, else a fresh one (NaN stays when the step is skipped)."""
    return trust_ratios if trust_ratios is not None else torch.full((len(params),), float("nan"))


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
    """One LAMB update with low-precision state in the CPU kernels; returns the trust ratios (see
    :func:`fastlars.backends.reference_lowbit.lamb_step`)."""
    m_values, m_scales = _split(exp_avgs, q.SIGNED_MAP, "exp_avgs")
    v_values, v_scales = _split(exp_avg_sqs, q.UNSIGNED_MAP, "exp_avg_sqs")
    lr_value, lr_tensor = native._lr(lr)
    out = _ratios(trust_ratios, params)
    torch.ops.fastlars.lamb_lowbit_step_(
        params, grads, m_values, m_scales, v_values, v_scales, master_params or [], steps,
        _rounding_keys(rounding, master_params, len(params)), lr_value, lr_tensor, h.beta1, h.beta2, h.eps,
        h.weight_decay, h.bias_correction, h.grad_averaging, h.decoupled_decay, h.trust_clip, h.adapt,
        native._bounds(h.trust_ratio_bounds), h.maximize, clip_coef, grad_scale, found_inf, out,
    )
    return out


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
    """One LARS update with a low-precision momentum in the CPU kernels; returns the trust ratios (see
    :func:`fastlars.backends.reference_lowbit.lars_step`)."""
    if rounding is not None and steps is None:
        raise ValueError("steps: stochastic rounding keys its bits by the step count; pass steps")
    values, scales = _split(momentum_buffers, q.SIGNED_MAP, "momentum_buffers")
    lr_value, lr_tensor = native._lr(lr)
    out = _ratios(trust_ratios, params)
    torch.ops.fastlars.lars_lowbit_step_(
        params, grads, values, scales, master_params or [], grad_norms, steps or [],
        _rounding_keys(rounding, master_params, len(params)), lr_value, lr_tensor, h.momentum, h.weight_decay,
        h.trust_coefficient, h.eps, h.nesterov, h.trust_clip, h.momentum_style == "mlperf", h.adapt,
        native._bounds(h.trust_ratio_bounds), h.maximize, grad_scale, found_inf, out,
    )
    return out
