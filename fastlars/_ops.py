"""The op contract: torch.library schemas and fake (meta) kernels of the compiled fastlars ops.

Defined in Python so that ``import fastlars`` never depends on the compiled library, and so that
torch.compile can trace the ops (the fakes give output shapes without running a kernel). The
compiled extension registers device kernels for these exact schemas (csrc/cuda/ops.cpp:
``TORCH_LIBRARY_IMPL(fastlars, CUDA, m)``).

Ops (all tensors of one call on one device; maths of fastlars.backends.reference):

* ``grad_norms(grads, grad_scale) -> Tensor``: out[i] = ||grads[i]|| / grad_scale, fp32, deterministic.
* ``lars_step_(params, grads, momentum_buffers, master_params, grad_norms, lr, lr_tensor, ...)``:
  one LARS update in place; ``master_params`` empty means none; ``lr_tensor`` (read on the device)
  replaces ``lr`` when given; nothing is written when ``found_inf`` is non-zero. The CPU kernel also
  takes an empty ``grad_norms``: it then computes ||g|| itself, in the pass that reads w for ||w||.
* ``lamb_step_(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr, lr_tensor, ...)``:
  one LAMB update in place; ``clip_coef`` multiplies the gradients (global clip); same skip rule.

Low-precision state (``LOWBIT_SCHEMAS``; CPU kernels in csrc/cpu/lowbit_ops.cpp, CUDA kernels in csrc/cuda/lowbit.cu;
maths of fastlars.backends.reference_lowbit):

* ``lamb_lowbit_step_(params, grads, exp_avgs, exp_avg_absmax, exp_avg_sqs, exp_avg_sq_absmax, master_params,
  steps, rounding_keys, lr, ...)``: each buffer is a floating tensor (fp32/bf16/fp16 state, its absmax entry
  an unused placeholder) or uint8 codes whose absmax entry holds the fp32 block scales (format of
  fastlars.backends.quantization: m mitchell4_signed, v mitchell8_unsigned, blocks of 256 along rows);
  ``rounding_keys`` (one 32-bit ``sr_tensor_key`` per param, or empty) writes bf16 params without
  masters by stochastic rounding keyed by ``steps``.
* ``lars_lowbit_step_(params, grads, momentum_buffers, momentum_absmax, master_params, grad_norms, steps,
  rounding_keys, lr, ...)``: the same for LARS's momentum (mitchell4_signed); ``steps`` may be empty without
  rounding keys.

Every tensor an op writes (``Tensor(a!)`` in its schema) gets its autograd version counter bumped, as
torch's in-place ops do (csrc/autograd_versions.cpp; the Triton ops through :func:`bump_versions`), so a
backward through a value saved before the step raises instead of reading the updated one.

Both step ops take an optional last argument ``trust_ratios``: a contiguous 1-D fp32 tensor of
len(params) elements on the params' device that receives the trust ratio applied to each tensor
(1 when ``adapt`` is false), written only when the update is (not when ``found_inf`` is non-zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NAMESPACE = "fastlars"

SCHEMAS = {
    "grad_norms": "(Tensor[] grads, Tensor? grad_scale) -> Tensor",
    "lars_step_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, "
        "Tensor grad_norms, float lr, Tensor? lr_tensor, float momentum, float weight_decay, "
        "float trust_coefficient, float eps, bool nesterov, bool trust_clip, bool mlperf_momentum, bool adapt, "
        "float[]? trust_ratio_bounds, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
        "Tensor(d!)? trust_ratios=None) -> ()"
    ),
    "lamb_step_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] master_params, Tensor[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, "
        "float eps, float weight_decay, bool bias_correction, bool grad_averaging, bool decoupled_decay, "
        "bool trust_clip, bool adapt, float[]? trust_ratio_bounds, bool maximize, Tensor? clip_coef, "
        "Tensor? grad_scale, Tensor? found_inf, Tensor(e!)? trust_ratios=None) -> ()"
    ),
}

LOWBIT_SCHEMAS = {
    "lamb_lowbit_step_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_absmax, "
        "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] exp_avg_sq_absmax, Tensor(f!)[] master_params, Tensor[] steps, "
        "int[] rounding_keys, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
        "bool bias_correction, bool grad_averaging, bool decoupled_decay, bool trust_clip, bool adapt, "
        "float[]? trust_ratio_bounds, bool maximize, Tensor? clip_coef, Tensor? grad_scale, Tensor? found_inf, "
        "Tensor(g!)? trust_ratios=None) -> ()"
    ),
    "lars_lowbit_step_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] momentum_absmax, "
        "Tensor(d!)[] master_params, Tensor grad_norms, Tensor[] steps, int[] rounding_keys, float lr, "
        "Tensor? lr_tensor, float momentum, float weight_decay, float trust_coefficient, float eps, bool nesterov, "
        "bool trust_clip, bool mlperf_momentum, bool adapt, float[]? trust_ratio_bounds, bool maximize, "
        "Tensor? grad_scale, Tensor? found_inf, Tensor(e!)? trust_ratios=None) -> ()"
    ),
}

_library = torch.library.Library(NAMESPACE, "FRAGMENT")
for _name, _signature in (*SCHEMAS.items(), *LOWBIT_SCHEMAS.items()):
    if not hasattr(getattr(torch.ops, NAMESPACE), _name):
        _library.define(_name + _signature)


@torch.library.register_fake(f"{NAMESPACE}::grad_norms")
def _grad_norms_fake(grads: list[Tensor], grad_scale: Tensor | None) -> Tensor:
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty(len(grads), dtype=torch.float32, device=device)


@torch.library.register_fake(f"{NAMESPACE}::lars_step_")
def _lars_step_fake(*args: object) -> None:
    return None


@torch.library.register_fake(f"{NAMESPACE}::lamb_step_")
def _lamb_step_fake(*args: object) -> None:
    return None


@torch.library.register_fake(f"{NAMESPACE}::lamb_lowbit_step_")
def _lamb_lowbit_step_fake(*args: object) -> None:
    return None


@torch.library.register_fake(f"{NAMESPACE}::lars_lowbit_step_")
def _lars_lowbit_step_fake(*args: object) -> None:
    return None


def written_arguments(signature: str) -> tuple[tuple[int, str], ...]:
    """(position, name) of each argument that ``signature`` (a schema without its op name) marks as written:
    ``Tensor(a!)``, ``Tensor(a!)?`` and ``Tensor(a!)[]``."""
    schema = torch._C.parse_schema("op" + signature)
    return tuple((i, arg.name) for i, arg in enumerate(schema.arguments)
                 if arg.alias_info is not None and arg.alias_info.is_write)


def bump_versions(*written: Tensor | Sequence[Tensor | None] | None) -> None:
    """Version counter + 1 of each given tensor, or of each tensor of each given list (None skipped),
    that a kernel wrote through its data pointer: what torch's in-place ops tell autograd
    (``torch.autograd.graph.increment_version``; inference tensors have no counter and are left alone)."""
    tensors = [t for w in written if w is not None for t in ((w,) if isinstance(w, Tensor) else w) if t is not None]
    if tensors:
        torch.autograd.graph.increment_version(tensors)
