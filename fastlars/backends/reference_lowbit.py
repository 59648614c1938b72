r"""Reference LAMB and LARS with low-precision state: readable PyTorch, THE spec of the quantised steps.

Same maths and argument conventions as :mod:`fastlars.backends.reference` (read it first); what
changes is where the state lives and how the new values are written back. A state buffer is either a
tensor (fp32 or bf16) or a :class:`~fastlars.backends.quantization.QuantizedBuffer` (int8 codes and
per-block scales, format in :mod:`fastlars.backends.quantization`). Per tensor, one update:

1. **load** each buffer as fp32 (``decode(code)·absmax``; bf16 widened exactly);
2. **update** in fp32 exactly as the fp32 reference does;
3. **store** each new buffer (int8: blockwise quantisation; bf16: round to nearest even) and keep
   what the stored buffer now *decodes to*: LAMB's direction u is computed from those decoded values,

   .. code-block:: text

       m̃ = D(Q(β1·D(m) + β3·g)),   ṽ = D(Q(β2·D(v) + (1−β2)·g²))      (D: decode, Q: quantise)
       u = (m̃/(1−β1^t)) / (√(ṽ/(1−β2^t)) + ε) + λ·w                    ("the update it will apply")
       r = ||w|| / ||u||,   w ← w − lr·r·u

   so ||u|| is the norm of exactly the update the weights receive, and a two-pass kernel that
   recomputes u from the stored state in its second pass applies the very u whose norm it took in
   the first. LARS's ratio needs only ||w|| and ||g||; its momentum is quantised for storage, and
   the weights move by the fp32 momentum of this step (one pass: no second look needs it):

   .. code-block:: text

       v = μ·D(momentum) + lr·r·d  (mlperf) ;  momentum ← Q(v) ;  w ← w − v   (nesterov: μ·v + lr·r·d)

4. **write the weights**: fp32 masters, or the parameter itself; a bf16 parameter without a master
   is written by stochastic rounding when ``rounding`` is given (bits from
   :func:`~fastlars.backends.quantization.sr_bits`, keyed by seed, tensor index, step and element
   index), else rounded to nearest even as the fp32-state reference does.

Nothing is written when ``found_inf`` is non-zero (codes, scales, bf16 buffers, weights alike). With
every buffer an fp32 tensor and no stochastic rounding, these functions equal
:func:`fastlars.backends.reference.lamb_step` / ``lars_step`` bit for bit.

Both functions return the per-tensor trust ratios they applied (fp32, one per tensor, on the
parameters' device), so tests can compare them across backends, and write them into ``trust_ratios``
when given (only when the update is committed), as every backend does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from fastlars.backends import quantization as q
from fastlars.backends._common import LambHyper, LarsHyper, Scalar
from fastlars.backends.reference import _commit, _true_grad, l2_norm, lamb_trust_ratio, lars_trust_ratio

StateBuffer = Union[Tensor, q.QuantizedBuffer]
"""An optimizer state buffer: an fp32 or bf16 tensor, or int8 codes with block scales."""


@dataclass(frozen=True)
class StochasticRounding:
    """How bf16 parameters without fp32 masters are rounded: the RNG seed (32 bits, saved in the
    optimizer's state_dict), each tensor's index in the optimizer's parameter list, and, for shards,
    each local tensor's offset in the whole tensor (storage order; None: whole tensors)."""

    seed: int
    tensor_indices: Sequence[int]
    index_offsets: Sequence[int] | None = None

    def round(self, i: int, w_new: Tensor, step: Tensor) -> Tensor:
        """bf16 weights of tensor ``i`` at step t: stochastic rounding of the fp32 ``w_new``."""
        tensor_key = q.sr_tensor_key(self.seed, self.tensor_indices[i], q.STREAM_PARAM)
        offset = 0 if self.index_offsets is None else self.index_offsets[i]
        bits = q.sr_bits(q.sr_key(tensor_key, step.to(w_new.device)), q.element_indices(w_new, offset))
        return q.stochastic_round_bf16(w_new, bits)


def unavailable_reason(device: torch.device) -> str | None:
    """The quantisation-aware reference runs wherever PyTorch runs."""
    return None


def load(buffer: StateBuffer) -> Tensor:
    """fp32 values of a state buffer."""
    return buffer.dequantize() if isinstance(buffer, q.QuantizedBuffer) else buffer.float()


def encode(buffer: StateBuffer, x: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
    """(what ``buffer`` would hold for fp32 values ``x``, what that decodes to), nothing written yet."""
    if isinstance(buffer, q.QuantizedBuffer):
        codes, absmax = buffer.quantize(x)
        return (codes, absmax), q.dequantize_blockwise(codes, absmax, buffer.code_map, buffer.block)
    stored = x.to(buffer.dtype)
    return (stored,), stored.float()


def commit(buffer: StateBuffer, stored: tuple[Tensor, ...], found_inf: Tensor | None) -> None:
    """Write what :func:`encode` produced into ``buffer``, unless ``found_inf`` is set."""
    targets = (buffer.codes, buffer.absmax) if isinstance(buffer, q.QuantizedBuffer) else (buffer,)
    for dst, new in zip(targets, stored):
        _commit(dst, new, found_inf)


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
    """One LAMB update with low-precision state (see the module docstring); returns the trust ratios.

    g = g·clip_coef ;  m = β1·D(m) + β3·g ;  v = β2·D(v) + (1−β2)·g² ;  m̃, ṽ = D(Q(m)), D(Q(v))
    u = (m̃/(1−β1^t)) / (√(ṽ/(1−β2^t)) + ε) + λ·w   (decoupled decay: w = w − lr·λ·w instead of λ·w in u)
    r = lamb_trust_ratio(||w||, ||u||) ;  w = w − lr·r·u
    """
    beta3 = 1.0 - h.beta1 if h.grad_averaging else 1.0
    ratios = []
    for i, param in enumerate(params):
        weight = master_params[i] if master_params is not None else param
        w = weight.float()
        g = _true_grad(grads[i], grad_scale, h.maximize)
        if clip_coef is not None:
            g = g * clip_coef.to(g.device)
        m = h.beta1 * load(exp_avgs[i]) + beta3 * g
        v = h.beta2 * load(exp_avg_sqs[i]) + (1.0 - h.beta2) * g * g
        m_stored, m = encode(exp_avgs[i], m)
        v_stored, v = encode(exp_avg_sqs[i], v)
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
        ratio = lamb_trust_ratio(l2_norm(w), l2_norm(u), h)
        ratios.append(ratio)
        w_new = w - lr * ratio * u
        commit(exp_avgs[i], m_stored, found_inf)
        commit(exp_avg_sqs[i], v_stored, found_inf)
        _write_weights(i, param, weight, master_params, w_new, steps[i], rounding, found_inf)
    return _record(_stack(ratios, params), trust_ratios, found_inf)


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
    """One LARS update with a low-precision momentum buffer; returns the trust ratios.

    d = g + λ·w ;  r = lars_trust_ratio(||w||, ||g||)
    mlperf:  v = μ·D(b) + lr·r·d ;  w = w − v            (nesterov: w − (μ·v + lr·r·d))
    torch:   v = μ·D(b) + r·d    ;  w = w − lr·v         (nesterov: w − lr·(μ·v + r·d))
    b ← Q(v) (the buffer keeps the quantised momentum; the weights move by the fp32 v)

    ``steps`` (t of this update per tensor) is needed only for stochastic rounding.
    """
    if rounding is not None and steps is None:
        raise ValueError("steps: stochastic rounding keys its bits by the step count; pass steps")
    ratios = []
    for i, param in enumerate(params):
        weight = master_params[i] if master_params is not None else param
        w = weight.float()
        g = _true_grad(grads[i], grad_scale, h.maximize)
        d = g + h.weight_decay * w
        ratio = lars_trust_ratio(l2_norm(w), grad_norms[i].to(w.device), lr, h)
        ratios.append(ratio)
        v = load(momentum_buffers[i])
        if h.momentum_style == "mlperf":
            v_new = h.momentum * v + lr * ratio * d
            update = h.momentum * v_new + lr * ratio * d if h.nesterov else v_new
        else:
            v_new = h.momentum * v + ratio * d
            update = lr * (h.momentum * v_new + ratio * d) if h.nesterov else lr * v_new
        stored, _ = encode(momentum_buffers[i], v_new)
        commit(momentum_buffers[i], stored, found_inf)
        step = steps[i] if steps is not None else None
        _write_weights(i, param, weight, master_params, w - update, step, rounding, found_inf)
    return _record(_stack(ratios, params), trust_ratios, found_inf)


def _write_weights(i: int, param: Tensor, weight: Tensor, master_params: list[Tensor] | None, w_new: Tensor,
                   step: Tensor | None, rounding: StochasticRounding | None, found_inf: Tensor | None) -> None:
    """Masters get w_new and the param its nearest-even rounding; a bf16 param without a master gets
    the stochastic rounding of w_new when ``rounding`` is given."""
    if master_params is not None:
        _commit(weight, w_new, found_inf)
        _commit(param, w_new, found_inf)
    elif rounding is not None and param.dtype == torch.bfloat16:
        assert step is not None
        _commit(param, rounding.round(i, w_new, step), found_inf)
    else:
        _commit(param, w_new, found_inf)


def _record(ratios: Tensor, trust_ratios: Tensor | None, found_inf: Tensor | None) -> Tensor:
    if trust_ratios is not None and ratios.numel():
        _commit(trust_ratios, ratios, found_inf)
    return ratios


def _stack(ratios: list[Tensor], params: list[Tensor]) -> Tensor:
    if not ratios:
        return torch.zeros(0, dtype=torch.float32)
    return torch.stack([r.to(params[0].device, torch.float32).reshape(()) for r in ratios])
