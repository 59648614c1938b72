# ruff: noqa: N803, SIM102, SIM108, SIM300  (Triton style: UPPER-CASE constexpr arguments; constexpr branches)
"""Multi-tensor Triton kernels: sums of squares per chunk, per-tensor reductions, LARS and LAMB updates.

Every kernel walks a *chunk table* (see :mod:`fastlars.backends.triton.tables`): program ``c`` handles
elements ``[start[c], start[c] + CHUNK)`` of tensor ``tensor[c]``, whose address it reads from an int64
table of data pointers (one row per tensor list: params, grads, buffers, masters) and casts to a typed
pointer. One launch therefore covers every tensor of a group, whatever their sizes; empty tensors own
no chunk. Indices are int64. All arithmetic is fp32 whatever the storage dtype; stores round to
nearest-even. Reductions are deterministic: a fixed-shape tree inside a chunk, then a fixed-order
sum over a tensor's chunks (:func:`sum_chunks_kernel`), no atomics.

Skip rule: when ``*found_inf`` is non-zero the update kernels store nothing (masked stores),
so a GradScaler overflow or a non-finite gradient costs no host synchronisation.

Vector loads: a chunk is walked as full BLOCKs without an element mask, then at most one masked tail
block. With ALIGNED (every data pointer of the bucket is 16-byte aligned, which the chunk table
guarantees by bucketing on it) the pointers carry ``tl.multiple_of(ptr, 16)`` and block offsets
``tl.multiple_of``/``tl.max_contiguous`` hints, so the full blocks compile to 128-bit loads and stores
(``ld.global.v4``: 4 fp32 or 8 bf16/fp16 per instruction; tests check the sm_90 PTX). The tail block
keeps element masks (``idx < numel``) and scalar accesses.
"""

from __future__ import annotations

from collections.abc import Callable

import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
"""True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 when triton was imported)."""


def device_function(fn: Callable) -> Callable:
    """``triton.jit`` for helpers called from kernels; the plain function under the interpreter.

    The interpreter re-patches triton.language on every call of a jitted helper (about 1 ms each), so
    there helpers run as the Python they already are, with the same semantics.
    """
    return fn if INTERPRETED else triton.jit(fn)


_block_sum = tl.sum.fn if INTERPRETED else tl.sum  # the same reasoning for the block reduction


if INTERPRETED:

    def _trip(x):
        """A loaded scalar as a ``range`` bound: a Python int under the interpreter (triton 3.6's
        interpreter converts a 1-element array with int(), which numpy >= 2.5 refuses)."""
        return int(x.handle.data.item())

else:

    @triton.jit
    def _trip(x):
        """A loaded scalar as a ``range`` bound (the identity when compiled)."""
        return x


@device_function
def _typed(addr_table, row, i, n_tensors, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to tensor ``i`` of table row ``row`` (``addr_table`` is int64 [rows, n_tensors]);
    ALIGNED: declared 16-byte aligned (the bucket guarantees it), which 128-bit accesses need."""
    ptr = tl.load(addr_table + row * n_tensors + i).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@device_function
def _block_index(base, BLOCK: tl.constexpr):
    """Element indices ``base + [0, BLOCK)``; base is a multiple of BLOCK (chunk starts are multiples of
    CHUNK, itself a multiple of BLOCK), which with an aligned pointer makes the block vectorisable."""
    return tl.max_contiguous(tl.multiple_of(base + tl.arange(0, BLOCK), BLOCK), BLOCK)


@device_function
def _ld(ptr, idx, mask, FULL: tl.constexpr):
    """ptr[idx] as fp32: a full block loads unmasked (vectorisable), a tail block masked (0 beyond)."""
    if FULL:
        x = tl.load(ptr + idx)
    else:
        x = tl.load(ptr + idx, mask=mask, other=0.0)
    return x.to(tl.float32)


@device_function
def _full_len(n, start, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """(elements of this chunk, of which in full blocks): min(n − start, CHUNK) and that rounded down to BLOCK."""
    n_here = tl.minimum(n - start, CHUNK)
    return n_here, n_here // BLOCK * BLOCK


@triton.jit
def sumsq_partials_kernel(
    addr_table, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, partial_ptr, n_tensors, row,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """partial[c] = Σ x² over chunk c of the tensors in table row ``row`` (fp32 accumulation)."""
    c = tl.program_id(0)
    i = tl.load(chunk_tensor_ptr + c)
    start = tl.load(chunk_start_ptr + c)
    n = tl.load(numel_ptr + i)
    x_ptr = _typed(addr_table, row, i, n_tensors, DTYPE, ALIGNED)
    acc = tl.zeros([BLOCK], tl.float32)
    n_here, n_full = _full_len(n, start, CHUNK, BLOCK)
    for off in range(0, _trip(n_full), BLOCK):
        x = _ld(x_ptr, _block_index(start + off, BLOCK), None, True)
        acc += x * x
    for off in range(_trip(n_full), _trip(n_here), BLOCK):  # the tail: at most one masked block
        idx = _block_index(start + off, BLOCK)
        x = _ld(x_ptr, idx, idx < n, False)
        acc += x * x
    tl.store(partial_ptr + c, _block_sum(acc, 0))


@triton.jit
def sum_chunks_kernel(
    partial_ptr, first_chunk_ptr, index_ptr, out_ptr, scale_ptr, n_chunks, n_out,
    SQRT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[k·n_out + index[i]] = Σ_{c ∈ chunks(i)} partial[k·n_chunks + c] (program (i, k)).

    SQRT: out = √Σ, then divided by *scale when HAS_SCALE (the gradient norms ||g / scale||).
    """
    i = tl.program_id(0)
    k = tl.program_id(1)
    lo = tl.load(first_chunk_ptr + i)
    hi = tl.load(first_chunk_ptr + i + 1)
    base = partial_ptr + k.to(tl.int64) * n_chunks
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(_trip(lo), _trip(hi), BLOCK):
        idx = s + tl.arange(0, BLOCK)
        acc += tl.load(base + idx, mask=idx < hi, other=0.0)
    total = _block_sum(acc, 0)
    if SQRT:
        total = tl.sqrt_rn(total)
        if HAS_SCALE:
            total = tl.div_rn(total, tl.load(scale_ptr).to(tl.float32))
    tl.store(out_ptr + k.to(tl.int64) * n_out + tl.load(index_ptr + i), total)


@device_function
def _load_scalars(lr, lr_ptr, inf_ptr, LR_TENSOR: tl.constexpr):
    """(lr, keep): lr read on the device when it is a tensor; keep = (found_inf == 0)."""
    if LR_TENSOR:
        lr_v = tl.load(lr_ptr).to(tl.float32)
    else:
        lr_v = lr
    keep = tl.load(inf_ptr).to(tl.float32) == 0.0
    return lr_v, keep


if INTERPRETED:

    def _round(x, DTYPE):
        """x (fp32) in the storage dtype, rounded to nearest-even.

        The interpreter converts fp32 to bf16 by truncation, so the rounding is done on the bits first:
        add 0x7FFF plus the lowest kept bit and clear the 16 dropped bits, then the truncation is exact.
        """
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x if DTYPE == tl.float32 else x.to(DTYPE)

else:

    @triton.jit
    def _round(x, DTYPE: tl.constexpr):
        """x (fp32) in the storage dtype; compiled conversions round to nearest-even."""
        return x.to(DTYPE)


@device_function
def _clamp_ratio(r, w_norm, other_norm, lo, hi, BOUNDS: tl.constexpr):
    """Clamp to trust_ratio_bounds, then 1 where either norm is zero."""
    if BOUNDS:
        r = tl.minimum(tl.maximum(r, lo), hi)
    return tl.where((w_norm > 0.0) & (other_norm > 0.0), r, 1.0)


@triton.jit
def lars_update_kernel(
    addr_table, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, index_ptr, n_tensors,
    gnorm_ptr, wsq_ptr, lr, lr_ptr, scale_ptr, inf_ptr,
    momentum, weight_decay, trust_coefficient, eps, lo, hi,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, MASTER: tl.constexpr,
    ADAPT: tl.constexpr, NESTEROV: tl.constexpr, TRUST_CLIP: tl.constexpr, MLPERF: tl.constexpr,
    BOUNDS: tl.constexpr, MAXIMIZE: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """LARS on chunk c; table rows: 0 params, 1 grads, 2 momentum buffers, 3 fp32 masters (MASTER).

    r = η·||w|| / (||g|| + λ·||w|| + ε)  (TRUST_CLIP: min(r / lr, 1)), clamped to [lo, hi] (BOUNDS),
    1 when ||w|| = 0 or ||g|| = 0 or not ADAPT; ||w||² and ||g|| (unscaled) of entry j = index[i] come
    from wsq[j] and gnorm[j].
    g = ±grad / scale ;  d = g + λ·w
    MLPERF: v = μ·v + lr·r·d ; w = w − v         (NESTEROV: w − (μ·v + lr·r·d))
    else:   v = μ·v + r·d    ; w = w − lr·v      (NESTEROV: w − lr·(μ·v + r·d))
    """
    c = tl.program_id(0)
    i = tl.load(chunk_tensor_ptr + c)
    start = tl.load(chunk_start_ptr + c)
    n = tl.load(numel_ptr + i)
    lr_v, keep = _load_scalars(lr, lr_ptr, inf_ptr, LR_TENSOR)
    if ADAPT:
        j = tl.load(index_ptr + i)
        w_norm = tl.sqrt_rn(tl.load(wsq_ptr + j))
        g_norm = tl.load(gnorm_ptr + j).to(tl.float32)
        r = tl.div_rn(trust_coefficient * w_norm, g_norm + weight_decay * w_norm + eps)
        if TRUST_CLIP:
            r = tl.minimum(tl.div_rn(r, lr_v), 1.0)
        ratio = _clamp_ratio(r, w_norm, g_norm, lo, hi, BOUNDS)
    else:
        ratio = 1.0
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.div_rn(tl.full((), 1.0, tl.float32), tl.load(scale_ptr).to(tl.float32))
    p_ptr = _typed(addr_table, 0, i, n_tensors, P_DTYPE, ALIGNED)
    g_ptr = _typed(addr_table, 1, i, n_tensors, G_DTYPE, ALIGNED)
    v_ptr = _typed(addr_table, 2, i, n_tensors, V_DTYPE, ALIGNED)
    if MASTER:
        w_ptr = _typed(addr_table, 3, i, n_tensors, tl.float32, ALIGNED)
    else:
        w_ptr = p_ptr
    n_here, n_full = _full_len(n, start, CHUNK, BLOCK)
    for off in range(0, _trip(n_full), BLOCK):
        _lars_block(
            _block_index(start + off, BLOCK), n, keep, p_ptr, g_ptr, v_ptr, w_ptr, lr_v, ratio, inv_scale,
            momentum, weight_decay, P_DTYPE, V_DTYPE, MASTER, NESTEROV, MLPERF, MAXIMIZE, HAS_SCALE, True,
        )
    for off in range(_trip(n_full), _trip(n_here), BLOCK):
        _lars_block(
            _block_index(start + off, BLOCK), n, keep, p_ptr, g_ptr, v_ptr, w_ptr, lr_v, ratio, inv_scale,
            momentum, weight_decay, P_DTYPE, V_DTYPE, MASTER, NESTEROV, MLPERF, MAXIMIZE, HAS_SCALE, False,
        )


@device_function
def lars_momentum(v, d, lr_v, ratio, momentum, NESTEROV: tl.constexpr, MLPERF: tl.constexpr):
    """LARS's momentum step on d = g + λ·w (reference.lars_step): MLPerf form v' = μ·v + lr·r·d, update v'
    (Nesterov: μ·v' + lr·r·d); torch form v' = μ·v + r·d, update lr·v' (Nesterov: lr·(μ·v' + r·d)).
    Returns (v', update)."""
    if MLPERF:
        step_d = lr_v * ratio * d
        v_new = momentum * v + step_d
        if NESTEROV:
            update = momentum * v_new + step_d
        else:
            update = v_new
    else:
        v_new = momentum * v + ratio * d
        if NESTEROV:
            update = lr_v * (momentum * v_new + ratio * d)
        else:
            update = lr_v * v_new
    return v_new, update


@device_function
def _lars_block(
    idx, n, keep, p_ptr, g_ptr, v_ptr, w_ptr, lr_v, ratio, inv_scale, momentum, weight_decay,
    P_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, MASTER: tl.constexpr, NESTEROV: tl.constexpr,
    MLPERF: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, FULL: tl.constexpr,
):
    """One block of lars_update_kernel: FULL blocks load unmasked and store under ``keep`` alone."""
    mask = idx < n
    if FULL:
        store = keep
    else:
        store = idx < tl.where(keep, n, 0)  # n, or 0 when the step is skipped
    w = _ld(w_ptr, idx, mask, FULL)
    g = _ld(g_ptr, idx, mask, FULL)
    v = _ld(v_ptr, idx, mask, FULL)
    if HAS_SCALE:
        g = g * inv_scale
    if MAXIMIZE:
        g = -g
    d = g + weight_decay * w
    v_new, update = lars_momentum(v, d, lr_v, ratio, momentum, NESTEROV, MLPERF)
    w_new = w - update
    tl.store(v_ptr + idx, _round(v_new, V_DTYPE), mask=store)
    tl.store(p_ptr + idx, _round(w_new, P_DTYPE), mask=store)
    if MASTER:
        tl.store(w_ptr + idx, w_new, mask=store)


@device_function
def _lamb_direction(
    w, g, m, v, lr_v, bc1, bc2, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay,
    FROM_MOMENTS: tl.constexpr, DECOUPLED: tl.constexpr,
):
    """(m', v', u, w'): new moments, direction and (decoupled-decayed) weight, all fp32.

    m' = β1·m + β3·g ;  v' = β2·v + (1−β2)·g²   (FROM_MOMENTS: m, v already are m', v'; g unused)
    (1−β2) comes from the host, computed in double and rounded once, like β3: 1 − β2 formed here in fp32
    from the rounded β2 is 1 − 0.999f = 0.00099998713 (1.3e-5 relative low) on a GPU.
    u = (m'/bc1) / (√(v'/bc2) + ε) ;  coupled: u += λ·w ;  decoupled: w' = w − lr·λ·w
    """
    if FROM_MOMENTS:
        m_new = m
        v_new = v
    else:
        m_new = beta1 * m + beta3 * g
        v_new = beta2 * v + one_minus_beta2 * g * g
    u = tl.div_rn(tl.div_rn(m_new, bc1), tl.sqrt_rn(tl.div_rn(v_new, bc2)) + eps)
    if DECOUPLED:
        w = w - lr_v * weight_decay * w
    else:
        u = u + weight_decay * w
    return m_new, v_new, u, w


@triton.jit
def lamb_kernel(
    addr_table, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, index_ptr, n_tensors,
    partial_ptr, n_chunks, sums_ptr, n_out, bc1_ptr, bc2_ptr, lr, lr_ptr, scale_ptr, inf_ptr, clip_ptr,
    beta1, beta2, beta3, one_minus_beta2, eps, weight_decay, lo, hi,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MASTER: tl.constexpr,
    PASS: tl.constexpr, STORE_MOMENTS: tl.constexpr, FROM_MOMENTS: tl.constexpr, ADAPT: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, DECOUPLED: tl.constexpr, TRUST_CLIP: tl.constexpr, BOUNDS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """LAMB on chunk c; table rows: 0 params, 1 grads, 2 exp_avg m, 3 exp_avg_sq v, 4 fp32 masters.

    g = ±grad / scale · clip ;  (m', v', u, w') = _lamb_direction(...) with bc_k = 1 − β_k^t
    (bc1[j], bc2[j] computed by the caller, j = index[i]; 1 without BIAS_CORRECTION).
    PASS 1 (ADAPT only): partial[c] = Σ w'², partial[n_chunks + c] = Σ u² over the chunk; with
        STORE_MOMENTS (fp32 moments) m', v' are written here so pass 2 need not read g.
    PASS 2: r = ||w'|| / ||u||  (TRUST_CLIP: min(r, 1)), clamped to [lo, hi], 1 if a norm is 0 or not
        ADAPT (sums[j], sums[n_out + j] hold the squared norms of entry j = index[i]);
        w = w' − lr·r·u; m', v' written unless pass 1 wrote them (FROM_MOMENTS: pass 2 reads those
        m', v' instead of g). Moments in bf16/fp16 are recomputed from g in pass 2, so u is always
        formed from unrounded fp32 moments.
    """
    c = tl.program_id(0)
    i = tl.load(chunk_tensor_ptr + c)
    start = tl.load(chunk_start_ptr + c)
    n = tl.load(numel_ptr + i)
    lr_v, keep = _load_scalars(lr, lr_ptr, inf_ptr, LR_TENSOR)
    j = tl.load(index_ptr + i)
    if BIAS_CORRECTION:
        bc1 = tl.load(bc1_ptr + j)
        bc2 = tl.load(bc2_ptr + j)
    else:
        bc1 = tl.full((), 1.0, tl.float32)
        bc2 = tl.full((), 1.0, tl.float32)
    g_mul = tl.full((), 1.0, tl.float32)
    if HAS_SCALE:
        g_mul = tl.div_rn(g_mul, tl.load(scale_ptr).to(tl.float32))
    if MAXIMIZE:
        g_mul = -g_mul
    clip = 1.0
    if HAS_CLIP:
        clip = tl.load(clip_ptr).to(tl.float32)
    ratio = 1.0
    if PASS == 2:
        if ADAPT:
            w_norm = tl.sqrt_rn(tl.load(sums_ptr + j))
            u_norm = tl.sqrt_rn(tl.load(sums_ptr + n_out + j))
            r = tl.div_rn(w_norm, u_norm)
            if TRUST_CLIP:
                r = tl.minimum(r, 1.0)
            ratio = _clamp_ratio(r, w_norm, u_norm, lo, hi, BOUNDS)
    p_ptr = _typed(addr_table, 0, i, n_tensors, P_DTYPE, ALIGNED)
    g_ptr = _typed(addr_table, 1, i, n_tensors, G_DTYPE, ALIGNED)
    m_ptr = _typed(addr_table, 2, i, n_tensors, S_DTYPE, ALIGNED)
    v_ptr = _typed(addr_table, 3, i, n_tensors, S_DTYPE, ALIGNED)
    if MASTER:
        w_ptr = _typed(addr_table, 4, i, n_tensors, tl.float32, ALIGNED)
    else:
        w_ptr = p_ptr
    acc_w = tl.zeros([BLOCK], tl.float32)
    acc_u = tl.zeros([BLOCK], tl.float32)
    n_here, n_full = _full_len(n, start, CHUNK, BLOCK)
    for off in range(0, _trip(n_full), BLOCK):
        acc_w, acc_u = _lamb_block(
            _block_index(start + off, BLOCK), n, keep, p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, acc_w, acc_u,
            lr_v, ratio, bc1, bc2, g_mul, clip, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay,
            P_DTYPE, S_DTYPE, MASTER, PASS, STORE_MOMENTS, FROM_MOMENTS, DECOUPLED, HAS_CLIP, True,
        )
    for off in range(_trip(n_full), _trip(n_here), BLOCK):
        acc_w, acc_u = _lamb_block(
            _block_index(start + off, BLOCK), n, keep, p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, acc_w, acc_u,
            lr_v, ratio, bc1, bc2, g_mul, clip, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay,
            P_DTYPE, S_DTYPE, MASTER, PASS, STORE_MOMENTS, FROM_MOMENTS, DECOUPLED, HAS_CLIP, False,
        )
    if PASS == 1:
        tl.store(partial_ptr + c, _block_sum(acc_w, 0))
        tl.store(partial_ptr + n_chunks + c, _block_sum(acc_u, 0))


@device_function
def _lamb_block(
    idx, n, keep, p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, acc_w, acc_u,
    lr_v, ratio, bc1, bc2, g_mul, clip, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MASTER: tl.constexpr, PASS: tl.constexpr,
    STORE_MOMENTS: tl.constexpr, FROM_MOMENTS: tl.constexpr, DECOUPLED: tl.constexpr, HAS_CLIP: tl.constexpr,
    FULL: tl.constexpr,
):
    """One block of lamb_kernel; returns the pass-1 accumulators (Σw'², Σu²) updated.

    FULL blocks load unmasked and store under ``keep`` alone; a tail block masks by ``idx < n``.
    """
    mask = idx < n
    if FULL:
        store = keep
    else:
        store = idx < tl.where(keep, n, 0)  # n, or 0 when the step is skipped
    w = _ld(w_ptr, idx, mask, FULL)
    m = _ld(m_ptr, idx, mask, FULL)
    v = _ld(v_ptr, idx, mask, FULL)
    if FROM_MOMENTS:
        g = m
    else:
        g = _ld(g_ptr, idx, mask, FULL) * g_mul
        if HAS_CLIP:
            g = g * clip
    m_new, v_new, u, w = _lamb_direction(
        w, g, m, v, lr_v, bc1, bc2, beta1, beta2, beta3, one_minus_beta2, eps, weight_decay, FROM_MOMENTS,
        DECOUPLED,
    )
    if PASS == 1:
        if not FULL:
            u = tl.where(mask, u, 0.0)
        acc_w += w * w
        acc_u += u * u
        if STORE_MOMENTS:
            tl.store(m_ptr + idx, _round(m_new, S_DTYPE), mask=store)
            tl.store(v_ptr + idx, _round(v_new, S_DTYPE), mask=store)
    else:
        w_new = w - lr_v * ratio * u
        if not FROM_MOMENTS:
            tl.store(m_ptr + idx, _round(m_new, S_DTYPE), mask=store)
            tl.store(v_ptr + idx, _round(v_new, S_DTYPE), mask=store)
        tl.store(p_ptr + idx, _round(w_new, P_DTYPE), mask=store)
        if MASTER:
            tl.store(w_ptr + idx, w_new, mask=store)
    return acc_w, acc_u
