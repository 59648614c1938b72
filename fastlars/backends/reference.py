"""The reference backend: per-tensor PyTorch written for reading. This file IS the spec.

Every other backend is tested against these functions. All arithmetic happens in fp32 whatever the
storage dtype; norms are L2 norms of whole tensors accumulated in fp32 (see :func:`l2_norm`).

Notation (per parameter tensor): ``w`` weight (the fp32 master copy when master weights are kept),
``g`` gradient after unscaling (``g / grad_scale``) and negation when ``maximize``, ``t`` the step
count of this update (1-based, already incremented by the optimizer), ``λ`` weight decay.

An update is *committed* only when ``found_inf`` is absent or zero; otherwise every tensor keeps the
value it had, which is how GradScaler overflow steps and non-finite gradients are skipped without a
host synchronisation.

``trust_ratios`` (optional, every backend): a 1-D fp32 tensor with one element per parameter tensor
that receives the ratio r this update applied to each tensor (1 where the group does not adapt),
computed from the norms the update computes anyway; like every other output it is written only
when the update is committed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlars.backends._common import LambHyper, LarsHyper, Scalar


def unavailable_reason(device: torch.device) -> str | None:
    """The reference backend runs wherever PyTorch runs."""
    return None


def l2_norm(x: Tensor) -> Tensor:
    """||x|| = √(Σ_j x_j²), the squares summed in fp32 by torch.sum's cascade (pairwise) reduction.

    Not torch.linalg.vector_norm: on the CPU it adds fp32 squares into one running accumulator, whose
    relative error grows with the element count (6.5e-4 at 2^24 elements, 5e-3 at 2^26; pytorch#169237).
    """
    return torch.sqrt(torch.sum(torch.square(x.float())))


def grad_norms(grads: list[Tensor], grad_scale: Tensor | None) -> Tensor:
    """Per-tensor fp32 L2 norms of the unscaled gradients: ``out[i] = ||grads[i] / grad_scale||``."""
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    norms = [l2_norm(g) for g in grads]
    out = torch.stack(norms)
    if grad_scale is not None:
        out = out / grad_scale.to(out.device, torch.float32).reshape(())
    return out


def lars_trust_ratio(w_norm: Tensor, g_norm: Tensor, lr: Scalar, h: LarsHyper) -> Tensor:
    """LARS layer-wise ratio.

    ratio = η·||w|| / (||g|| + λ·||w|| + ε); with trust_clip ratio = min(ratio / lr, 1) (LARC "clip");
    then clamped to trust_ratio_bounds; 1 when ||w|| = 0 or ||g|| = 0, or when the group does not adapt.
    """
    if not h.adapt:
        return torch.ones((), dtype=torch.float32, device=w_norm.device)
    ratio = h.trust_coefficient * w_norm / (g_norm + h.weight_decay * w_norm + h.eps)
    if h.trust_clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
    if h.trust_ratio_bounds is not None:
        ratio = torch.clamp(ratio, h.trust_ratio_bounds[0], h.trust_ratio_bounds[1])
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def lamb_trust_ratio(w_norm: Tensor, u_norm: Tensor, h: LambHyper) -> Tensor:
    """LAMB layer-wise ratio: ||w|| / ||u|| (trust_clip: min(ratio, 1)), clamped to bounds; else 1."""
    if not h.adapt:
        return torch.ones((), dtype=torch.float32, device=w_norm.device)
    ratio = w_norm / u_norm
    if h.trust_clip:
        ratio = torch.clamp(ratio, max=1.0)
    if h.trust_ratio_bounds is not None:
        ratio = torch.clamp(ratio, h.trust_ratio_bounds[0], h.trust_ratio_bounds[1])
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


def lamb_clip_coefficient(global_grad_norm: Tensor | None, max_grad_norm: float | None) -> Tensor | None:
    """Global clip: max_grad_norm / ||G|| when ||G|| > max_grad_norm, else 1 (None: disabled)."""
    if global_grad_norm is None or not max_grad_norm:
        return None
    return torch.where(
        global_grad_norm > max_grad_norm,
        max_grad_norm / global_grad_norm,
        torch.ones_like(global_grad_norm),
    )


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
    """One LARS update of a list of tensors.

    d = g + λ·w ;  r = lars_trust_ratio(||w||, ||g||)
    mlperf:  v = μ·v + lr·r·d ;  w = w − v            (nesterov: w − (μ·v + lr·r·d))
    torch:   v = μ·v + r·d    ;  w = w − lr·v         (nesterov: w − lr·(μ·v + r·d))
    """
    for i, param in enumerate(params):
        weight = master_params[i] if master_params is not None else param
        w = weight.float()
        g = _true_grad(grads[i], grad_scale, h.maximize)
        d = g + h.weight_decay * w
        w_norm = l2_norm(w)
        ratio = lars_trust_ratio(w_norm, grad_norms[i].to(w.device), lr, h)
        v = momentum_buffers[i].float()
        if h.momentum_style == "mlperf":
            v_new = h.momentum * v + lr * ratio * d
            update = h.momentum * v_new + lr * ratio * d if h.nesterov else v_new
        else:
            v_new = h.momentum * v + ratio * d
            update = lr * (h.momentum * v_new + ratio * d) if h.nesterov else lr * v_new
        w_new = w - update
        if trust_ratios is not None:
            _commit(trust_ratios[i], ratio, found_inf)
        _commit(momentum_buffers[i], v_new, found_inf)
        _commit(weight, w_new, found_inf)
        if master_params is not None:
            _commit(param, w_new, found_inf)


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
    """One LAMB update of a list of tensors (You et al. 2019, Algorithm 2; NVLAMB form).

    g = g·clip_coef ;  m = β1·m + (1−β1)·g  (grad_averaging=False: β1·m + g) ;  v = β2·v + (1−β2)·g²
    m̂ = m / (1−β1^t), v̂ = v / (1−β2^t)  (bias_correction) ;  u = m̂ / (√v̂ + ε)
    coupled decay:   u = u + λ·w
    decoupled decay: w = w − lr·λ·w  (before the ratio, outside it)
    r = lamb_trust_ratio(||w||, ||u||) ;  w = w − lr·r·u
    """
    beta3 = 1.0 - h.beta1 if h.grad_averaging else 1.0
    for i, param in enumerate(params):
        weight = master_params[i] if master_params is not None else param
        w = weight.float()
        g = _true_grad(grads[i], grad_scale, h.maximize)
        if clip_coef is not None:
            g = g * clip_coef.to(g.device)
        m = h.beta1 * exp_avgs[i].float() + beta3 * g
        v = h.beta2 * exp_avg_sqs[i].float() + (1.0 - h.beta2) * g * g
        if h.bias_correction:
            t = steps[i].to(device=w.device, dtype=torch.float32)
            m_hat, v_hat = m / (1.0 - h.beta1**t), v / (1.0 - h.beta2**t)
        else:
            m_hat, v_hat = m, v
        u = m_hat / (torch.sqrt(v_hat) + h.eps)
        if h.weight_decay != 0.0:
            if h.decoupled_decay:
                w = w - lr * h.weight_decay * w
            else:
                u = u + h.weight_decay * w
        ratio = lamb_trust_ratio(
            l2_norm(w),
            l2_norm(u),
            h,
        )
        w_new = w - lr * ratio * u
        if trust_ratios is not None:
            _commit(trust_ratios[i], ratio, found_inf)
        _commit(exp_avgs[i], m, found_inf)
        _commit(exp_avg_sqs[i], v, found_inf)
        _commit(weight, w_new, found_inf)
        if master_params is not None:
            _commit(param, w_new, found_inf)


def _true_grad(grad: Tensor, grad_scale: Tensor | None, maximize: bool) -> Tensor:
    """fp32 gradient of the loss: unscaled by GradScaler's scale and negated for maximize."""
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale.to(g.device, torch.float32).reshape(())
    return -g if maximize else g


def _commit(dst: Tensor, new: Tensor, found_inf: Tensor | None) -> None:
    """dst ← new, unless found_inf is set (then dst keeps its value)."""
    if found_inf is None:
        dst.copy_(new)
    else:
        skip = found_inf.to(dst.device).reshape(()) != 0
        dst.copy_(torch.where(skip, dst, new.to(dst.dtype)))
