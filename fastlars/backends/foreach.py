"""The foreach backend: the reference maths expressed with ``torch._foreach_*`` multi-tensor ops.

Same formulas as :mod:`fastlars.backends.reference` (see there), computed in fp32 over whole tensor
lists: a handful of multi-tensor launches per stage instead of a dozen launches per tensor. The
per-tensor factors (trust ratios, bias corrections) are computed as one vector; off the CPU each is
expanded into one flat buffer whose pieces have the tensors' shapes (:func:`per_tensor`), so that the
multi-tensor op that applies it takes its fast path: a list of 0-d tensors would cost one launch per
tensor. A step is then a fixed number of launches whatever the tensor count (tests/test_foreach_ops.py
counts them), at the price of one fp32 element per parameter element per factor, written and read once.

Skipping (``found_inf``): a flag on the CPU is read directly, which costs no device synchronisation;
a flag on an accelerator (or any flag while torch.compile traces) is applied with a per-tensor
``torch.where`` so nothing waits on the device (foreach has no masked copy, and every foreach op
propagates the NaN of a skipped step's gradients): the one part of a step whose launch count grows
with the tensor count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from fastlars.backends._common import LambHyper, LarsHyper, Scalar
from fastlars.backends.reference import l2_norm, lamb_trust_ratio, lars_trust_ratio


def unavailable_reason(device: torch.device) -> str | None:
    """torch._foreach_* runs on every device PyTorch supports."""
    return None


def norms(tensors: list[Tensor]) -> Tensor:
    """``out[i] = ||tensors[i]||`` in fp32: one torch._foreach_norm on an accelerator; on the CPU, whose
    fp32 norm kernel loses precision with size (see reference.l2_norm), the reference's norm per tensor."""
    if tensors[0].device.type == "cpu":
        return torch.stack([l2_norm(t) for t in tensors])
    return torch.stack(torch._foreach_norm(tensors, dtype=torch.float32))


def per_tensor(values: Tensor, like: list[Tensor]) -> list[Tensor]:
    """``out[i]`` = a tensor shaped like ``like[i]`` filled with ``values[i]`` (fp32), for multi-tensor ops.

    Off the CPU (outside torch.compile): one ``repeat_interleave`` into a flat buffer of Σ numel(like[i])
    elements, split into views, so that ``_foreach_mul(like, out)`` takes the fast path (equal shapes): a
    fixed number of launches. On the CPU, or while torch.compile traces (Inductor fuses the broadcast),
    the 0-d elements of ``values``: no buffer (the CPU has no launches to save). A ``like[i]`` that is not
    contiguous (channels_last) still gets correct results, on the per-tensor path.
    """
    values = values.to(torch.float32)
    if like[0].device.type == "cpu" or torch.compiler.is_compiling():
        return list(values.unbind(0))
    return expand_per_tensor(values, like)


def expand_per_tensor(values: Tensor, like: list[Tensor]) -> list[Tensor]:
    """``per_tensor``'s flat form on any device: contiguous views of one buffer, ``out[i]`` shaped like
    ``like[i]`` and filled with ``values[i]``."""
    numels = tuple(t.numel() for t in like)
    flat = torch.repeat_interleave(values, _repeats(like[0].device, numels)[1], output_size=sum(numels))
    return [piece.view(t.shape) for piece, t in zip(flat.split(numels), like)]


@functools.lru_cache(maxsize=64)
def _repeats(device: torch.device, numels: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(host, device) copies of the element counts, made once per tensor list: a pinned host tensor
    moved without waiting, so no step synchronises with the device. The host copy is kept alive with
    the device one because a CUDA graph captured around the first use replays the copy from it."""
    host = torch.tensor(numels, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    return host, host.to(device, non_blocking=True)


def grad_norms(grads: list[Tensor], grad_scale: Tensor | None) -> Tensor:
    """Per-tensor fp32 L2 norms of the unscaled gradients: ``out[i] = ||grads[i] / grad_scale||``."""
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    out = norms(grads)
    if grad_scale is not None:
        out = out / grad_scale.to(out.device, torch.float32).reshape(())
    return out


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
    weight_norms: Tensor | None = None,
    trust_ratios: Tensor | None = None,
) -> None:
    """LARS over a tensor list; the maths of ``reference.lars_step``.

    ``weight_norms``: whole-tensor ||w|| computed elsewhere (the tensors are shards), else computed here.
    """
    if not params or _skip_on_host(found_inf):
        return
    weights = master_params if master_params is not None else params
    w = _as_fp32(weights)
    g = _true_grads(grads, grad_scale, h.maximize)
    d = torch._foreach_add(g, w, alpha=h.weight_decay) if h.weight_decay != 0.0 else g
    if weight_norms is None:
        weight_norms = norms(w)
    ratios = lars_trust_ratio(weight_norms, grad_norms.to(weight_norms.device), lr, h)
    ratios = ratios.expand(len(params))
    if trust_ratios is not None:
        _commit([trust_ratios], [ratios], found_inf)
    v = torch._foreach_mul(_as_fp32(momentum_buffers), h.momentum)
    if h.momentum_style == "mlperf":
        step_d = torch._foreach_mul(d, per_tensor(lr * ratios, d))
        torch._foreach_add_(v, step_d)
        update = torch._foreach_add(step_d, v, alpha=h.momentum) if h.nesterov else v
    else:
        ratio_list = per_tensor(ratios, d)
        torch._foreach_addcmul_(v, d, ratio_list)
        if h.nesterov:
            update = torch._foreach_mul(d, ratio_list)
            torch._foreach_add_(update, v, alpha=h.momentum)
        else:
            update = v
        update = torch._foreach_mul(update, lr)
    w_new = torch._foreach_sub(w, update)
    _commit(momentum_buffers, v, found_inf)
    _commit(weights, w_new, found_inf)
    if master_params is not None:
        _commit(params, w_new, found_inf)


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
    reduce_sumsq: Callable[[Tensor], Tensor] | None = None,
    trust_ratios: Tensor | None = None,
) -> None:
    """LAMB over a tensor list; the maths of ``reference.lamb_step``.

    ``reduce_sumsq``: the tensors are shards; it sums the vector [Σw_i², Σu_i²] over the ranks so the
    ratio uses whole-tensor norms (one collective for the whole group).
    """
    if not params or _skip_on_host(found_inf):
        return
    weights = master_params if master_params is not None else params
    w = _as_fp32(weights)
    g = _true_grads(grads, grad_scale, h.maximize)
    if clip_coef is not None:
        g = torch._foreach_mul(g, clip_coef.to(g[0].device).reshape(()))
    beta3 = 1.0 - h.beta1 if h.grad_averaging else 1.0
    m = torch._foreach_mul(_as_fp32(exp_avgs), h.beta1)
    torch._foreach_add_(m, g, alpha=beta3)
    v = torch._foreach_mul(_as_fp32(exp_avg_sqs), h.beta2)
    torch._foreach_addcmul_(v, g, g, value=1.0 - h.beta2)
    if h.bias_correction:
        t = torch.stack([s.to(w[0].device, torch.float32).reshape(()) for s in steps])
        m_hat = torch._foreach_div(m, per_tensor(1.0 - h.beta1**t, m))
        denom = torch._foreach_sqrt(torch._foreach_div(v, per_tensor(1.0 - h.beta2**t, v)))
    else:
        m_hat = m
        denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, h.eps)
    u = torch._foreach_div(m_hat, denom)
    if h.weight_decay != 0.0:
        if h.decoupled_decay:
            w = torch._foreach_sub(w, torch._foreach_mul(w, lr * h.weight_decay))
        else:
            torch._foreach_add_(u, w, alpha=h.weight_decay)
    w_norms = norms(w)
    u_norms = norms(u)
    if reduce_sumsq is not None:
        n = len(params)
        totals = reduce_sumsq(torch.cat([w_norms.square(), u_norms.square()])).sqrt()
        w_norms, u_norms = totals[:n], totals[n:]
    ratios = lamb_trust_ratio(w_norms, u_norms, h).expand(len(params))
    if trust_ratios is not None:
        _commit([trust_ratios], [ratios], found_inf)
    torch._foreach_mul_(u, per_tensor(lr * ratios, u))
    w_new = torch._foreach_sub(w, u)
    _commit(exp_avgs, m, found_inf)
    _commit(exp_avg_sqs, v, found_inf)
    _commit(weights, w_new, found_inf)
    if master_params is not None:
        _commit(params, w_new, found_inf)


def _as_fp32(tensors: list[Tensor]) -> list[Tensor]:
    """fp32 views of a list (no copy for fp32 tensors: never mutate the result in place)."""
    return [t.float() for t in tensors]


def _true_grads(grads: list[Tensor], grad_scale: Tensor | None, maximize: bool) -> list[Tensor]:
    """fp32 gradients of the loss as a NEW list (safe to mutate): unscaled, negated for maximize."""
    scale = 1.0 if grad_scale is None else grad_scale.to(grads[0].device, torch.float32).reshape(())
    g = torch._foreach_div(_as_fp32(grads), scale)
    if maximize:
        torch._foreach_neg_(g)
    return g


def _flag_read_on_host(found_inf: Tensor | None) -> bool:
    """Whether the skip flag is read in Python: only a CPU flag outside torch.compile tracing."""
    return found_inf is not None and found_inf.device.type == "cpu" and not torch.compiler.is_compiling()


def _skip_on_host(found_inf: Tensor | None) -> bool:
    """True when a host-read flag says to skip; device flags are never read on the host."""
    return _flag_read_on_host(found_inf) and bool(found_inf.reshape(-1)[0] != 0)


def _commit(dst: list[Tensor], new: list[Tensor], found_inf: Tensor | None) -> None:
    """dst ← new, keeping dst wherever a flag that is not read on the host is set."""
    if found_inf is None or _flag_read_on_host(found_inf):
        torch._foreach_copy_(dst, new)
        return
    skip = found_inf.reshape(()) != 0
    for d, n in zip(dst, new):
        d.copy_(torch.where(skip.to(d.device), d, n.to(d.dtype)))
