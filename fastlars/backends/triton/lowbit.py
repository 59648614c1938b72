"""The Triton backend's low-precision step: bf16 and blockwise int8 optimizer state, stochastically
rounded bf16 weights, in multi-tensor Triton kernels (:mod:`fastlars.backends.triton.lowbit_kernels`).

Same signatures and maths as :mod:`fastlars.backends.reference_lowbit` (THE spec; format in
:mod:`fastlars.backends.quantization`). Per group and bucket of tensors whose storage kinds agree
(param, grad, each buffer: fp32 / bf16 / fp16 / int8 codes; lists may mix formats):

* LAMB pass 1, one launch: m, v decoded, updated in fp32, stored (int8: blockwise with the absmax of
  the NEW values) and replaced by what they decode to; u from those values; per-tile Σw'², Σu²;
  then the per-tensor sums in a fixed order (:func:`~fastlars.backends.triton.kernels.sum_chunks_kernel`);
  pass 2, one launch: r = ||w'||/||u|| on the device, u recomputed from the stored state (the same
  bits), w ← w' − lr·r·u written to masters and params, or to a bf16 param by stochastic rounding.
  A group that does not adapt takes pass 1 with r = 1 and writes the weights there (one launch).
* LARS: Σw² per tensor (the fp32 backend's norm kernels), then one launch: the momentum decoded,
  updated in fp32, stored quantised, the weights moved by the fp32 momentum.

No host synchronisation (lr, grad_scale, found_inf and the step counts are read on the device), no
atomics; ``found_inf`` set: nothing is written. The returned trust ratios are computed by small torch
ops from the same per-tensor sums the kernels read. Runs on CUDA, and on CPU tensors under
TRITON_INTERPRET=1 (as :mod:`fastlars.backends.triton`).
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fastlars import _ops
from fastlars.backends import quantization as q
from fastlars.backends import triton as triton_backend
from fastlars.backends._common import LambHyper, LarsHyper, Scalar
from fastlars.backends.reference import lamb_trust_ratio, lars_trust_ratio
from fastlars.backends.reference_lowbit import StateBuffer, StochasticRounding

try:
    import triton.language as tl

    from fastlars.backends.triton import lowbit_kernels as kernels
    from fastlars.backends.triton import ops, tables
except ImportError:  # reported by the fp32 Triton backend's unavailable_reason
    kernels = None

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}
"""Storage kind of an array in the kernels: fp32, bf16, fp16, int8 codes."""

QB = 32 if getattr(kernels, "INTERPRETED", False) else 8
"""Quantisation blocks per program (each of BLOCK elements); the interpreter pays per operation, so
there a program takes more."""
BLOCK = q.BLOCK_SIZE
WARPS = 8


def unavailable_reason(device: torch.device) -> str | None:
    """None where the Triton kernels run (CUDA; CPU under TRITON_INTERPRET=1), else why not."""
    return triton_backend.unavailable_reason(device)


# ---------------------------------------------------------------------------------- checks
def _split(buffers: Sequence[StateBuffer], code_map: q.CodeMap, name: str, params: list[Tensor]
           ) -> tuple[list[Tensor], list[Tensor | None]]:
    """(values, scales) per tensor: codes and absmax of int8 buffers, the tensor and None otherwise."""
    if len(buffers) != len(params):
        raise ValueError(f"{name}: holds {len(buffers)} buffers, params hold {len(params)}")
    values: list[Tensor] = []
    scales: list[Tensor | None] = []
    for i, (b, p) in enumerate(zip(buffers, params)):
        if isinstance(b, q.QuantizedBuffer):
            if b.code_map is not code_map or b.block != BLOCK:
                raise ValueError(f"{name}[{i}]: the Triton kernels step the {code_map.name} map in blocks of {BLOCK}, "
                                 f"got {b.code_map.name} in blocks of {b.block}")
            expected = q.block_layout(p.shape).scale_shape
            s = b.absmax
            if s.dtype != torch.float32 or tuple(s.shape) != expected or not s.is_contiguous() or s.device != p.device:
                raise ValueError(f"{name}[{i}]: absmax must be a contiguous float32 tensor of shape {expected} on "
                                 f"{p.device}, got {s.dtype} {tuple(s.shape)} on {s.device}")
            values.append(b.codes)
            scales.append(s)
        else:
            if not isinstance(b, Tensor) or b.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"{name}[{i}]: expected a QuantizedBuffer or a float32/bfloat16/float16 tensor, "
                                 f"got {type(b).__name__} {getattr(b, 'dtype', '')}")
            values.append(b)
            scales.append(None)
    return values, scales


def _check(params: list[Tensor], grads: list[Tensor], masters: list[Tensor] | None, per_tensor: dict[str, list],
           ordered: list[bool]) -> None:
    """Counts, dtypes, devices and, where ``ordered`` (int8 blocks or stochastic rounding), the storage-order
    layouts, before anything is written."""
    n = len(params)
    for name, lst in (("grads", grads), ("master_params", masters or params), *per_tensor.items()):
        if lst is not None and len(lst) != n:
            raise ValueError(f"{name}: holds {len(lst)} entries, params hold {n}")
    device = params[0].device
    for i, p in enumerate(params):
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"params[{i}]: expected float32, bfloat16 or float16, got {p.dtype}")
        if grads[i].dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"grads[{i}]: expected float32, bfloat16 or float16, got {grads[i].dtype}")
        if p.device != device:
            raise ValueError(f"params[{i}]: on {p.device}, params[0] on {device}")
        if masters is not None and masters[i].dtype != torch.float32:
            raise ValueError(f"master_params[{i}]: expected float32, got {masters[i].dtype}")
        if ordered[i] and p.numel() > 1 and not _storage_order(p):
            raise ValueError(f"params[{i}]: strides {p.stride()} are neither contiguous nor channels_last; int8 blocks "
                             "and stochastic rounding follow the storage order of those layouts only (the reference "
                             "backend takes any layout)")


def _ordered(params: list[Tensor], masters: list[Tensor] | None, rounding: StochasticRounding | None,
             *scales: list[Tensor | None]) -> list[bool]:
    """Per tensor: whether its layout must be the storage order (int8 blocks, stochastically rounded)."""
    rounded = rounding is not None and masters is None
    return [(rounded and p.dtype == torch.bfloat16) or any(s[i] is not None for s in scales)
            for i, p in enumerate(params)]


def _storage_order(t: Tensor) -> bool:
    if t.is_contiguous():
        return True
    return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


# ----------------------------------------------------------------------------------- tables
class Bucket:
    """One launch's tensors: device tables of data pointers, block layouts and the chunk table."""

    def __init__(self, kinds: tuple[int, ...], addr: Tensor, scales: Tensor, row: Tensor, bpr: Tensor,
                 nblocks: Tensor, chunk_tensor: Tensor, chunk_block: Tensor, first_chunk: Tensor, index: Tensor,
                 n_tensors: int, n_chunks: int) -> None:
        self.kinds, self.addr, self.scales = kinds, addr, scales
        self.row, self.bpr, self.nblocks = row, bpr, nblocks
        self.chunk_tensor, self.chunk_block, self.first_chunk = chunk_tensor, chunk_block, first_chunk
        self.index = index
        self.n_tensors, self.n_chunks = n_tensors, n_chunks


_cache: OrderedDict[tuple, Bucket] = OrderedDict()
_CACHE_SIZE = 64


def buckets(lists: list[list[Tensor]], scale_lists: list[list[Tensor | None]]) -> list[Bucket]:
    """Entries i (one tensor of each list, and the block scales of its int8 buffers) grouped by storage kinds,
    with cached device tables. A tensor with an int8 buffer is cut into the format's row blocks; one
    without is a single row of its elements."""
    n = len(lists[0])
    device = lists[0][0].device
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(n):
        entry = [lst[i] for lst in lists]
        tables.check_layout(entry, i)
        groups.setdefault(tuple(KINDS[t.dtype] for t in entry), []).append(i)
    return [_bucket(lists, scale_lists, kinds, idx, device) for kinds, idx in groups.items()]


def _bucket(lists: list[list[Tensor]], scale_lists: list[list[Tensor | None]], kinds: tuple[int, ...],
            idx: list[int], device: torch.device) -> Bucket:
    ptrs = tuple(tuple(lst[i].data_ptr() for i in idx) for lst in lists)
    sptrs = tuple(tuple(0 if s[i] is None else s[i].data_ptr() for i in idx) for s in scale_lists)
    shapes = tuple(tuple(lists[0][i].shape) for i in idx)
    key = (device, QB, kinds, ptrs, sptrs, shapes, tuple(idx))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("triton backend: these tensors have no device table yet and none can be built while a "
                           "CUDA graph is being captured; run one step outside the capture first")
    rows, bprs, nblocks = [], [], []
    chunk_tensor: list[int] = []
    chunk_block: list[int] = []
    first_chunk = [0]
    for k, shape in enumerate(shapes):
        numel = int(np.prod(shape)) if shape else 1
        layout = q.block_layout(shape) if KINDS[torch.uint8] in kinds else q.BlockLayout(1, numel, BLOCK)
        rows.append(layout.row_length)
        bprs.append(layout.blocks_per_row)
        nblocks.append(layout.num_blocks)
        for start in range(0, layout.num_blocks, QB):
            chunk_tensor.append(k)
            chunk_block.append(start)
        first_chunk.append(len(chunk_tensor))

    def on_device(values: object, dtype: torch.dtype) -> Tensor:
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    bucket = Bucket(kinds, on_device(list(ptrs), torch.int64), on_device(list(sptrs) or [[0]], torch.int64),
                    on_device(rows, torch.int64), on_device(bprs, torch.int64), on_device(nblocks, torch.int64),
                    on_device(chunk_tensor or [0], torch.int32), on_device(chunk_block or [0], torch.int64),
                    on_device(first_chunk, torch.int32), on_device(idx, torch.int32), len(idx), len(chunk_tensor))
    _cache[key] = bucket
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return bucket


# ----------------------------------------------------------------------------- shared pieces
_ROUNDING_ARGS: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()


def _rounding_args(rounding: StochasticRounding | None, n: int, device: torch.device, dummy: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """(sr_tensor_key per entry, element-index offset per entry) on the device (dummies without rounding);
    cached, so a step after the first copies nothing to the device."""
    if rounding is None:
        return dummy, dummy
    indices = tuple(rounding.tensor_indices)
    offsets = (0,) * n if rounding.index_offsets is None else tuple(rounding.index_offsets)
    if len(indices) != n:
        raise ValueError(f"rounding: tensor_indices holds {len(indices)} indices, params hold {n}")
    if len(offsets) != n:
        raise ValueError(f"rounding: index_offsets holds {len(offsets)} offsets, params hold {n}")
    cache_key = (device, rounding.seed, indices, offsets)
    hit = _ROUNDING_ARGS.get(cache_key)
    if hit is None:
        keys = [q.sr_tensor_key(rounding.seed, index, q.STREAM_PARAM) for index in indices]
        hit = (torch.tensor(keys, dtype=torch.int64).to(device), torch.tensor(offsets, dtype=torch.int64).to(device))
        _ROUNDING_ARGS[cache_key] = hit
        while len(_ROUNDING_ARGS) > _CACHE_SIZE:
            _ROUNDING_ARGS.popitem(last=False)
    return hit


def _steps(steps: Sequence[Tensor] | None, n: int, device: torch.device, dummy: Tensor) -> Tensor:
    if steps is None:
        return dummy
    if len(steps) != n:
        raise ValueError(f"steps: holds {len(steps)} step counts, params hold {n}")
    return torch.stack([s.reshape(()) for s in steps]).to(device, torch.float32)


def _lr(lr: Scalar, device: torch.device, dummy: Tensor) -> tuple[float, Tensor, bool]:
    lr_value, lr_tensor = triton_backend._lr(lr)
    return ops._lr_args(lr_value, lr_tensor, device, dummy)


def _decay(lr: Scalar, lr_value: float, weight_decay: float) -> float:
    """lr·λ as the reference forms it: in double for a float lr, in fp32 for a tensor lr read on the host."""
    if isinstance(lr, Tensor):
        return float(np.float32(lr_value) * np.float32(weight_decay))
    return float(lr) * weight_decay


def _dtype_args(b: Bucket, names: Sequence[str]) -> dict[str, object]:
    """X_DTYPE (pointer element type) and X_KIND of each array of the bucket."""
    pointer = {0: tl.float32, 1: tl.uint16, 2: tl.float16, 3: tl.uint8}
    out: dict[str, object] = {}
    for name, kind in zip(names, b.kinds):
        out[f"{name}_DTYPE"] = pointer[kind]
        out[f"{name}_KIND"] = kind
    return out


def _record(trust_ratios: Tensor | None, ratios: Tensor, flag: Tensor) -> None:
    """trust_ratios ← ratios unless the step is skipped (decided on the params' device)."""
    if trust_ratios is None:
        return
    if trust_ratios.device == flag.device:
        ops._record(trust_ratios, ratios, flag)
    else:
        staged = trust_ratios.to(flag.device)
        ops._record(staged, ratios, flag)
        trust_ratios.copy_(staged)


def _empty_ratios(params: list[Tensor]) -> Tensor:
    return torch.zeros(0, dtype=torch.float32, device=params[0].device if params else "cpu")


def _on_params_device(step: Callable) -> Callable:
    """Run ``step`` with its params' GPU as the current device: Triton launches on the current device (the
    fp32 ops' guard, here for params given by position or by name)."""

    @functools.wraps(step)
    def run(*args: object, **kwargs: object) -> object:
        params = args[0] if args else kwargs.get("params")
        on_gpu = isinstance(params, list) and params and params[0].is_cuda
        with torch.cuda.device(params[0].device) if on_gpu else contextlib.nullcontext():
            return step(*args, **kwargs)

    return run


# -------------------------------------------------------------------------------------- LAMB
@_on_params_device
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
    """One LAMB update with low-precision state in Triton kernels; returns the trust ratios (see
    :func:`fastlars.backends.reference_lowbit.lamb_step`):

    m = β1·D(m) + β3·g ;  v = β2·D(v) + (1−β2)·g² ;  m̃, ṽ = D(Q(m)), D(Q(v))
    u = (m̃/(1−β1^t)) / (√(ṽ/(1−β2^t)) + ε) + λ·w ;  r = ||w|| / ||u|| ;  w = w − lr·r·u
    """
    if not params:
        return _empty_ratios(params)
    m_values, m_scales = _split(exp_avgs, q.SIGNED_MAP, "exp_avgs", params)
    v_values, v_scales = _split(exp_avg_sqs, q.UNSIGNED_MAP, "exp_avg_sqs", params)
    ordered = _ordered(params, master_params, rounding, m_scales, v_scales)
    _check(params, grads, master_params, {"steps": steps}, ordered)
    n = len(params)
    device = params[0].device
    master = master_params is not None
    lists = [params, grads, m_values, v_values] + ([master_params] if master else [])
    groups = buckets(lists, [m_scales, v_scales])
    flag = ops._flag(found_inf, device)
    scale, has_scale = ops._scalar(grad_scale, device, flag)
    clip, has_clip = ops._scalar(clip_coef, device, flag)
    lr_value, lr_t, lr_is_tensor = _lr(lr, device, flag)
    t = _steps(steps, n, device, flag)
    bc1 = bc2 = flag
    if h.bias_correction:  # bc_k = 1 − β_k^t with torch's pow, as the reference computes it
        bc1, bc2 = 1.0 - h.beta1**t, 1.0 - h.beta2**t
    keys, offsets = _rounding_args(rounding, n, device, flag)
    sums = torch.zeros(2 * n, dtype=torch.float32, device=device) if h.adapt else flag
    lo, hi = h.trust_ratio_bounds if h.trust_ratio_bounds is not None else (0.0, 0.0)
    for b in groups:
        if not b.n_chunks:
            continue
        rounded = rounding is not None and not master and b.kinds[0] == KINDS[torch.bfloat16]
        args = (b.addr, b.scales, b.row, b.bpr, b.nblocks, b.chunk_tensor, b.chunk_block, b.index, b.n_tensors)
        scalars = (sums, n, bc1, bc2, t, keys, offsets, lr_value, lr_t, _decay(lr, lr_value, h.weight_decay),
                   scale, flag, clip, float(h.beta1), float(h.beta2), (1.0 - h.beta1) if h.grad_averaging else 1.0,
                   1.0 - h.beta2, float(h.eps), float(h.weight_decay), float(lo), float(hi))
        options = dict(
            **_dtype_args(b, ("P", "G", "M", "V")), MASTER=master, ROUNDED=rounded, ADAPT=bool(h.adapt),
            BIAS_CORRECTION=bool(h.bias_correction), WEIGHT_DECAY=h.weight_decay != 0.0,
            DECOUPLED=bool(h.decoupled_decay), TRUST_CLIP=bool(h.trust_clip), BOUNDS=h.trust_ratio_bounds is not None,
            MAXIMIZE=bool(h.maximize), LR_TENSOR=lr_is_tensor, HAS_SCALE=has_scale, HAS_CLIP=has_clip, QB=QB,
            BLOCK=BLOCK, num_warps=WARPS, enable_fp_fusion=False,
        )
        if not h.adapt:
            kernels.lamb_lowbit_kernel[(b.n_chunks,)](*args, flag, 0, *scalars, PASS=0, **options)
            continue
        partial = torch.empty(2 * b.n_chunks, dtype=torch.float32, device=device)
        kernels.lamb_lowbit_kernel[(b.n_chunks,)](*args, partial, b.n_chunks, *scalars, PASS=1, **options)
        ops.kernels.sum_chunks_kernel[(b.n_tensors, 2)](
            partial, b.first_chunk, b.index, sums, sums, b.n_chunks, n,
            SQRT=False, HAS_SCALE=False, BLOCK=ops.REDUCE_BLOCK, enable_fp_fusion=False,
        )
        kernels.lamb_lowbit_kernel[(b.n_chunks,)](*args, flag, 0, *scalars, PASS=2, **options)
    _ops.bump_versions(params, master_params, m_values, m_scales, v_values, v_scales)
    if h.adapt:
        norms = torch.sqrt(sums)
        ratios = lamb_trust_ratio(norms[:n], norms[n:], h)
    else:
        ratios = torch.ones(n, dtype=torch.float32, device=device)
    _record(trust_ratios, ratios, flag)
    return ratios


# -------------------------------------------------------------------------------------- LARS
@_on_params_device
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
    """One LARS update with a low-precision momentum in Triton kernels; returns the trust ratios (see
    :func:`fastlars.backends.reference_lowbit.lars_step`):

    d = g + λ·w ;  r = η·||w|| / (||g|| + λ·||w|| + ε)
    mlperf:  v = μ·D(b) + lr·r·d ;  w = w − v        torch:  v = μ·D(b) + r·d ;  w = w − lr·v
    b ← Q(v)
    """
    if rounding is not None and steps is None:
        raise ValueError("steps: stochastic rounding keys its bits by the step count; pass steps")
    if not params:
        return _empty_ratios(params)
    values, scales = _split(momentum_buffers, q.SIGNED_MAP, "momentum_buffers", params)
    _check(params, grads, master_params, {} if steps is None else {"steps": steps},
           _ordered(params, master_params, rounding, scales))
    n = len(params)
    if grad_norms.numel() != n:
        raise ValueError(f"grad_norms: holds {grad_norms.numel()} norms, params hold {n}")
    device = params[0].device
    master = master_params is not None
    lists = [params, grads, values] + ([master_params] if master else [])
    groups = buckets(lists, [scales])
    flag = ops._flag(found_inf, device)
    scale, has_scale = ops._scalar(grad_scale, device, flag)
    lr_value, lr_t, lr_is_tensor = _lr(lr, device, flag)
    gnorm = grad_norms.to(device=device, dtype=torch.float32).reshape(n)
    t = _steps(steps if rounding is not None else None, n, device, flag)  # only stochastic rounding reads t
    keys, offsets = _rounding_args(rounding, n, device, flag)
    wsq = torch.zeros(n, dtype=torch.float32, device=device)
    if h.adapt:
        for wb in tables.buckets([master_params if master else params], ops.CHUNK):
            ops._sumsq_per_tensor(wb, [0], wsq, n)
    lo, hi = h.trust_ratio_bounds if h.trust_ratio_bounds is not None else (0.0, 0.0)
    for b in groups:
        if not b.n_chunks:
            continue
        rounded = rounding is not None and not master and b.kinds[0] == KINDS[torch.bfloat16]
        kernels.lars_lowbit_kernel[(b.n_chunks,)](
            b.addr, b.scales, b.row, b.bpr, b.nblocks, b.chunk_tensor, b.chunk_block, b.index, b.n_tensors,
            gnorm, wsq, t, keys, offsets, lr_value, lr_t, scale, flag,
            float(h.momentum), float(h.weight_decay), float(h.trust_coefficient), float(h.eps), float(lo), float(hi),
            **_dtype_args(b, ("P", "G", "V")), MASTER=master, ROUNDED=rounded, ADAPT=bool(h.adapt),
            NESTEROV=bool(h.nesterov), TRUST_CLIP=bool(h.trust_clip), MLPERF=h.momentum_style == "mlperf",
            BOUNDS=h.trust_ratio_bounds is not None, MAXIMIZE=bool(h.maximize), LR_TENSOR=lr_is_tensor,
            HAS_SCALE=has_scale, QB=QB, BLOCK=BLOCK, num_warps=WARPS, enable_fp_fusion=False,
        )
    _ops.bump_versions(params, master_params, values, scales)
    rate = lr_t.reshape(()) if lr_is_tensor else lr_value
    ratios = lars_trust_ratio(torch.sqrt(wsq), gnorm, rate, h) if h.adapt else torch.ones(n, device=device)
    _record(trust_ratios, ratios, flag)
    return ratios
