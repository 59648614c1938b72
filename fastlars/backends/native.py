"""The native backend: compiled multi-tensor kernels from csrc/, called through the ops of fastlars._ops.

Importing this module never fails: when the extension is missing (or was built without kernels for
a device type) the backend reports itself unavailable with the reason, and ``backend="auto"`` moves
on to the next candidate. The learning rate goes to the kernels as a float, or as a tensor they read
on the device (capturable, CUDA-graph safe).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlars import _ops  # noqa: F401  (defines the op schemas the kernels register against)
from fastlars._extension import extension, extension_error
from fastlars.backends._common import LambHyper, LarsHyper, Scalar


def unavailable_reason(device: torch.device) -> str | None:
    """None when fastlars._C is built with kernels for ``device``'s type, else why not."""
    ext = extension()
    if ext is None:
        return extension_error()
    kernels = getattr(ext, "kernel_devices", lambda: [])()
    if device.type not in kernels:
        built = ", ".join(kernels) or "no device"
        return f"fastlars._C has kernels for {built}, not for {device.type}"
    return None


def _lr(lr: Scalar) -> tuple[float, Tensor | None]:
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


def _bounds(bounds: tuple[float, float] | None) -> list[float] | None:
    return None if bounds is None else [float(bounds[0]), float(bounds[1])]


def folds_grad_norms(device: torch.device) -> bool:
    """Whether lars_step computes ||g|| itself when given no grad_norms (the CPU kernels do, in the pass
    that reads w for ||w||, so the gradients are read from memory once less)."""
    return device.type == "cpu"


def grad_norms(grads: list[Tensor], grad_scale: Tensor | None) -> Tensor:
    """Per-tensor fp32 L2 norms of grads / grad_scale, one deterministic multi-tensor launch."""
    return torch.ops.fastlars.grad_norms(grads, grad_scale)


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
    """LARS over a tensor list in the compiled kernels; the maths of ``reference.lars_step``."""
    lr_value, lr_tensor = _lr(lr)
    torch.ops.fastlars.lars_step_(
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
    """LAMB over a tensor list in the compiled kernels; the maths of ``reference.lamb_step``."""
    lr_value, lr_tensor = _lr(lr)
    torch.ops.fastlars.lamb_step_(
        params, grads, exp_avgs, exp_avg_sqs, master_params or [], steps, lr_value, lr_tensor,
        h.beta1, h.beta2, h.eps, h.weight_decay, h.bias_correction, h.grad_averaging, h.decoupled_decay,
        h.trust_clip, h.adapt, _bounds(h.trust_ratio_bounds), h.maximize, clip_coef, grad_scale, found_inf,
        trust_ratios,
    )
