"""The Triton ops: ``fastlars::triton_grad_norms``, ``triton_lars_step_``, ``triton_lamb_step_``.

Their schemas are those of the native ops (:data:`fastlars._ops.SCHEMAS`, mutations declared), with a
fake kernel each, so torch.compile puts them in a graph as single opaque nodes. The kernels are
registered with ``torch.library`` for the CPU and CUDA dispatch keys and launch the Triton kernels of
:mod:`fastlars.backends.triton.kernels` directly. ``torch.library.triton_op`` is not used: it traces
the launch code with fake tensors, which have no data pointers, and the multi-tensor kernels read
their tensors through a table of data pointers.

Launches per group and storage-dtype bucket (all on the caller's stream, no host synchronisation):
grad_norms 2 (Σg² per chunk, per-tensor sum); LARS 3 (Σw², per-tensor sum, update; 1 when the group
does not adapt); LAMB 3 (pass 1, per-tensor sums, pass 2; 1 when the group does not adapt). With the
optional ``trust_ratios`` output, a few small torch ops on n-element vectors compute the ratios from
the same per-tensor sums the update kernels read (reference formulas) and copy them in unless skipped.

Block sizes: one fixed configuration (2048-element blocks, 8 warps on a GPU), not autotuned: the
order in which Σx² is added depends on the block size and warp count, so a per-process autotuner
choice would make the norms, and the trust ratios, differ between runs and between DDP ranks.
The update kernels write parameters and state in place, so they could not be timed by re-running
anyway. Every op runs under a device guard for its tensors' GPU, on that device's current stream.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import triton
from torch import Tensor

from fastlars import _ops
from fastlars.backends._common import LambHyper, LarsHyper
from fastlars.backends.reference import lamb_trust_ratio, lars_trust_ratio
from fastlars.backends.triton import kernels, tables

PREFIX = "triton_"

_TL_DTYPES = {
    torch.float32: triton.language.float32,
    torch.float16: triton.language.float16,
    torch.bfloat16: triton.language.bfloat16,
}

INTERPRETED = kernels.INTERPRETED

# Elements per chunk (one program each) and per inner block. The interpreter runs a block as numpy
# arrays at a high fixed cost per operation, so there a chunk is one block, kept small so that tests
# reach several chunks per tensor with small tensors.
CHUNK = 4_096 if INTERPRETED else 65_536
UPDATE_BLOCK = 4_096 if INTERPRETED else 2_048
UPDATE_WARPS = 8
REDUCE_BLOCK = 256
# Every launch passes enable_fp_fusion=False and the kernels divide and take square roots with
# tl.div_rn / tl.sqrt_rn: the reference's IEEE rounding, op by op, as the native kernels' -fmad=false.
# Compiled for a GPU, a*b + c otherwise becomes one fma and x / y div.full.f32 (2 ulp), and the
# trajectories drift apart by a few ulp where a weight passes near zero (seen on an H200).


def _sumsq(grid, *args, **kw) -> None:
    kernels.sumsq_partials_kernel[grid](*args, BLOCK=UPDATE_BLOCK, num_warps=UPDATE_WARPS, enable_fp_fusion=False, **kw)


def _tl(dtype: torch.dtype) -> object:
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"triton backend: tensors must be float32, float16 or bfloat16, not {dtype}") from None


_zero_flags: dict[torch.device, Tensor] = {}


def _capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on the current stream (never for CPU tensors)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _flag(found_inf: Tensor | None, device: torch.device) -> Tensor:
    """found_inf as an fp32 scalar on ``device``; a cached zero when there is none."""
    if found_inf is not None:
        return found_inf.to(device=device, dtype=torch.float32).reshape(1)
    if _capturing(device):
        return torch.zeros(1, device=device)
    zero = _zero_flags.get(device)
    if zero is None:
        zero = _zero_flags[device] = torch.zeros(1, device=device)
    return zero


def _scalar(value: Tensor | None, device: torch.device, dummy: Tensor) -> tuple[Tensor, bool]:
    """(tensor to pass, present?) for an optional device scalar."""
    if value is None:
        return dummy, False
    return value.to(device=device, dtype=torch.float32).reshape(1), True


def _lr_args(lr: float, lr_tensor: Tensor | None, device: torch.device, dummy: Tensor) -> tuple[float, Tensor, bool]:
    """(lr float, lr tensor, read the tensor?): a tensor lr is read on the device unless it lives on the host.

    A host tensor is read once, as a float; during CUDA-graph capture that float would be frozen into
    the graph and later changes of the tensor ignored on replay, so it is refused (as the native op does).
    """
    if lr_tensor is None:
        return float(lr), dummy, False
    if lr_tensor.device.type == "cpu" and device.type != "cpu":
        if _capturing(device):
            raise RuntimeError("triton backend: lr_tensor: on the CPU while a CUDA graph is being captured; its value "
                               "would be frozen into the graph (put lr on the params' device)")
        return float(lr_tensor), dummy, False  # a host tensor: reading it costs no device sync
    return 0.0, lr_tensor.to(device=device, dtype=torch.float32).reshape(1), True


def _sumsq_per_tensor(b: tables.Bucket, rows: list[int], out: Tensor, n_out: int) -> None:
    """out[k·n_out + index[i]] = Σ x² of tensor i of table row rows[k] (same dtype for every row)."""
    partial = torch.empty(len(rows) * max(b.n_chunks, 1), dtype=torch.float32, device=out.device)
    for k, row in enumerate(rows):
        if b.n_chunks:
            _sumsq((b.n_chunks,), b.addr, b.numel, b.chunk_tensor, b.chunk_start, partial[k * b.n_chunks:],
                   b.n_tensors, row, DTYPE=_tl(b.dtypes[row]), ALIGNED=b.aligned, CHUNK=CHUNK)
    kernels.sum_chunks_kernel[(b.n_tensors, len(rows))](
        partial, b.first_chunk, b.index, out, out, b.n_chunks, n_out, SQRT=False, HAS_SCALE=False, BLOCK=REDUCE_BLOCK,
        enable_fp_fusion=False,
    )


def grad_norms_impl(grads: list[Tensor], grad_scale: Tensor | None) -> Tensor:
    """out[i] = ||grads[i]|| / grad_scale, fp32: per-chunk Σg², then a fixed-order sum per tensor."""
    device = grads[0].device if grads else torch.device("cpu")
    out = torch.empty(len(grads), dtype=torch.float32, device=device)
    for b in tables.buckets([grads], CHUNK) if grads else []:
        scale, has_scale = _scalar(grad_scale, device, out)
        partial = torch.empty(max(b.n_chunks, 1), dtype=torch.float32, device=device)
        if b.n_chunks:
            _sumsq((b.n_chunks,), b.addr, b.numel, b.chunk_tensor, b.chunk_start, partial, b.n_tensors, 0,
                   DTYPE=_tl(b.dtypes[0]), ALIGNED=b.aligned, CHUNK=CHUNK)
        kernels.sum_chunks_kernel[(b.n_tensors, 1)](
            partial, b.first_chunk, b.index, out, scale, b.n_chunks, len(grads),
            SQRT=True, HAS_SCALE=has_scale, BLOCK=REDUCE_BLOCK, enable_fp_fusion=False,
        )
    return out


def lars_step_impl(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], master_params: list[Tensor],
    grad_norms: Tensor, lr: float, lr_tensor: Tensor | None, momentum: float, weight_decay: float,
    trust_coefficient: float, eps: float, nesterov: bool, trust_clip: bool, mlperf_momentum: bool, adapt: bool,
    trust_ratio_bounds: list[float] | None, maximize: bool, grad_scale: Tensor | None, found_inf: Tensor | None,
    trust_ratios: Tensor | None = None,
) -> None:
    """LARS in place (maths of fastlars.backends.reference.lars_step); see kernels.lars_update_kernel."""
    if not params:
        return
    device = params[0].device
    lists = [params, grads, momentum_buffers] + ([master_params] if master_params else [])
    master = bool(master_params)
    gnorm = grad_norms.to(device=device, dtype=torch.float32)
    wsq = torch.empty(len(params), dtype=torch.float32, device=device) if adapt else gnorm
    flag = _flag(found_inf, device)
    scale, has_scale = _scalar(grad_scale, device, flag)
    lr_value, lr_t, lr_is_tensor = _lr_args(lr, lr_tensor, device, flag)
    lo, hi = trust_ratio_bounds if trust_ratio_bounds is not None else (0.0, 0.0)
    for b in tables.buckets(lists, CHUNK):
        if adapt:
            _sumsq_per_tensor(b, [3 if master else 0], wsq, len(params))
        if not b.n_chunks:
            continue
        kernels.lars_update_kernel[(b.n_chunks,)](
            b.addr, b.numel, b.chunk_tensor, b.chunk_start, b.index, b.n_tensors,
            gnorm, wsq, lr_value, lr_t, scale, flag,
            float(momentum), float(weight_decay), float(trust_coefficient), float(eps), float(lo), float(hi),
            P_DTYPE=_tl(b.dtypes[0]), G_DTYPE=_tl(b.dtypes[1]), V_DTYPE=_tl(b.dtypes[2]), MASTER=master,
            ADAPT=bool(adapt), NESTEROV=bool(nesterov), TRUST_CLIP=bool(trust_clip), MLPERF=bool(mlperf_momentum),
            BOUNDS=trust_ratio_bounds is not None, MAXIMIZE=bool(maximize), LR_TENSOR=lr_is_tensor,
            HAS_SCALE=has_scale, ALIGNED=b.aligned, CHUNK=CHUNK, BLOCK=UPDATE_BLOCK, num_warps=UPDATE_WARPS,
            enable_fp_fusion=False,
        )
    if trust_ratios is not None:
        h = LarsHyper(momentum, weight_decay, trust_coefficient, eps, nesterov, trust_clip,
                      "mlperf" if mlperf_momentum else "torch", adapt, _pair(trust_ratio_bounds), maximize)
        rate = lr_t.reshape(()) if lr_is_tensor else lr_value
        ratios = lars_trust_ratio(wsq.sqrt(), gnorm, rate, h) if adapt else torch.ones_like(trust_ratios)
        _record(trust_ratios, ratios, flag)


def lamb_step_impl(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    master_params: list[Tensor], steps: list[Tensor], lr: float, lr_tensor: Tensor | None, beta1: float,
    beta2: float, eps: float, weight_decay: float, bias_correction: bool, grad_averaging: bool,
    decoupled_decay: bool, trust_clip: bool, adapt: bool, trust_ratio_bounds: list[float] | None, maximize: bool,
    clip_coef: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None,
    trust_ratios: Tensor | None = None,
) -> None:
    """LAMB in place (maths of fastlars.backends.reference.lamb_step); see kernels.lamb_kernel."""
    if not params:
        return
    device = params[0].device
    n_out = len(params)
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([master_params] if master_params else [])
    master = bool(master_params)
    flag = _flag(found_inf, device)
    scale, has_scale = _scalar(grad_scale, device, flag)
    clip, has_clip = _scalar(clip_coef, device, flag)
    lr_value, lr_t, lr_is_tensor = _lr_args(lr, lr_tensor, device, flag)
    bc1 = bc2 = flag
    if bias_correction:  # bc_k = 1 − β_k^t with torch's pow, exactly as the reference computes it
        t = torch.stack([s.reshape(()) for s in steps]).to(device, torch.float32)
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    # zeros when recording: a bucket of empty tensors has no chunks, so no kernel writes its sums (ratio 1)
    new_sums = torch.zeros if trust_ratios is not None else torch.empty
    sums = new_sums(2 * n_out, dtype=torch.float32, device=device) if adapt else flag
    lo, hi = trust_ratio_bounds if trust_ratio_bounds is not None else (0.0, 0.0)
    for b in tables.buckets(lists, CHUNK):
        if not b.n_chunks:
            continue
        store_moments = bool(adapt) and b.dtypes[2] == torch.float32 and b.dtypes[3] == torch.float32
        scalars = (
            sums, n_out, bc1, bc2, lr_value, lr_t, scale, flag, clip,
            float(beta1), float(beta2), (1.0 - beta1) if grad_averaging else 1.0, 1.0 - beta2,
            float(eps), float(weight_decay), float(lo), float(hi),
        )
        options = dict(
            P_DTYPE=_tl(b.dtypes[0]), G_DTYPE=_tl(b.dtypes[1]), S_DTYPE=_tl(b.dtypes[2]), MASTER=master,
            STORE_MOMENTS=store_moments, ADAPT=bool(adapt), BIAS_CORRECTION=bool(bias_correction),
            DECOUPLED=bool(decoupled_decay), TRUST_CLIP=bool(trust_clip), BOUNDS=trust_ratio_bounds is not None,
            MAXIMIZE=bool(maximize), LR_TENSOR=lr_is_tensor, HAS_SCALE=has_scale, HAS_CLIP=has_clip,
            ALIGNED=b.aligned, CHUNK=CHUNK, BLOCK=UPDATE_BLOCK, num_warps=UPDATE_WARPS, enable_fp_fusion=False,
        )
        table = (b.addr, b.numel, b.chunk_tensor, b.chunk_start, b.index, b.n_tensors)
        if b.dtypes[2] != b.dtypes[3]:
            raise TypeError(f"triton backend: exp_avg is {b.dtypes[2]} but exp_avg_sq is {b.dtypes[3]}")
        if adapt:
            partial = torch.empty(2 * b.n_chunks, dtype=torch.float32, device=device)
            kernels.lamb_kernel[(b.n_chunks,)](*table, partial, b.n_chunks, *scalars, PASS=1, FROM_MOMENTS=False,
                                               **options)
            kernels.sum_chunks_kernel[(b.n_tensors, 2)](
                partial, b.first_chunk, b.index, sums, sums, b.n_chunks, n_out,
                SQRT=False, HAS_SCALE=False, BLOCK=REDUCE_BLOCK, enable_fp_fusion=False,
            )
        kernels.lamb_kernel[(b.n_chunks,)](*table, flag, 0, *scalars, PASS=2, FROM_MOMENTS=store_moments,
                                           **options)
    if trust_ratios is not None:
        h = LambHyper(beta1, beta2, eps, weight_decay, bias_correction, grad_averaging, decoupled_decay, trust_clip,
                      adapt, _pair(trust_ratio_bounds), maximize)
        norms = sums.sqrt()
        ratios = lamb_trust_ratio(norms[:n_out], norms[n_out:], h) if adapt else torch.ones_like(trust_ratios)
        _record(trust_ratios, ratios, flag)


def _pair(bounds: list[float] | None) -> tuple[float, float] | None:
    return None if bounds is None else (float(bounds[0]), float(bounds[1]))


def _record(trust_ratios: Tensor, ratios: Tensor, flag: Tensor) -> None:
    """trust_ratios ← ratios, kept where the skip flag is set (the update kernels' rule); no host sync."""
    trust_ratios.copy_(torch.where(flag.reshape(()) != 0, trust_ratios, ratios.to(trust_ratios.device)))


def _on_tensor_device(impl: Callable) -> Callable:
    """Run ``impl`` with its tensors' GPU as the current device: Triton launches on the current device's
    current stream, which torch.library does not set for Python kernels (params on cuda:1 while cuda:0
    is current would otherwise be launched on the wrong GPU)."""

    @functools.wraps(impl)
    def run(tensors: list[Tensor], *args: object, **kwargs: object) -> object:
        guard = torch.cuda.device(tensors[0].device) if tensors and tensors[0].is_cuda else contextlib.nullcontext()
        with guard:
            return impl(tensors, *args, **kwargs)

    return run


def _bumping_written(impl: Callable, signature: str) -> Callable:
    """``impl``, then the version counters of the arguments its schema writes (fastlars._ops.bump_versions:
    the kernels write through data pointers, which autograd does not see)."""
    written = _ops.written_arguments(signature)

    @functools.wraps(impl)
    def run(*args: object, **kwargs: object) -> object:
        out = impl(*args, **kwargs)
        _ops.bump_versions(*(args[i] if i < len(args) else kwargs.get(name) for i, name in written))
        return out

    return run


# ---------------------------------------------------------------------------------- op contract
_library = torch.library.Library(_ops.NAMESPACE, "FRAGMENT")
_IMPLS = {"grad_norms": grad_norms_impl, "lars_step_": lars_step_impl, "lamb_step_": lamb_step_impl}
for _name, _signature in _ops.SCHEMAS.items():
    _op_name = PREFIX + _name
    if not hasattr(getattr(torch.ops, _ops.NAMESPACE), _op_name):
        _library.define(_op_name + _signature)
        for _key in ("CPU", "CUDA"):
            _library.impl(_op_name, _on_tensor_device(_bumping_written(_IMPLS[_name], _signature)), _key)


@torch.library.register_fake(f"{_ops.NAMESPACE}::{PREFIX}grad_norms")
def _grad_norms_fake(grads: list[Tensor], grad_scale: Tensor | None) -> Tensor:
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty(len(grads), dtype=torch.float32, device=device)


@torch.library.register_fake(f"{_ops.NAMESPACE}::{PREFIX}lars_step_")
def _lars_step_fake(*args: object) -> None:
    return None


@torch.library.register_fake(f"{_ops.NAMESPACE}::{PREFIX}lamb_step_")
def _lamb_step_fake(*args: object) -> None:
    return None
