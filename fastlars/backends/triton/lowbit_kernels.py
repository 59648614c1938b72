# ruff: noqa: N803  (Triton style: UPPER-CASE constexpr arguments)
"""Triton kernels for low-precision optimizer state: bf16 or blockwise int8 moments, stochastic rounding.

The maths is :mod:`fastlars.backends.reference_lowbit` (THE spec), the format
:mod:`fastlars.backends.quantization`. A program owns a *tile* of QB quantisation blocks of one tensor,
``[QB, BLOCK]`` elements with BLOCK = 256: block ``b`` of a tensor whose rows hold ``L`` elements in
``bpr = ⌈L/256⌉`` blocks is row ``r = b // bpr``, column ``j = b − r·bpr``, elements
``r·L + j·256 + k`` for ``k < 256`` and ``j·256 + k < L`` (the last block of a row is ragged; no block
spans two rows), and its scale is ``absmax[b]``. Tensors without int8 buffers are one row of numel
elements. The chunk table (host side: :mod:`fastlars.backends.triton.lowbit`) maps program ``c`` to
(tensor, first block).

Storage kinds (constexpr ``*_KIND``): 0 fp32, 1 bf16 (reached through a uint16 pointer: widened and
rounded on the bits, so the interpreter and the GPU write the same values), 2 fp16, 3 int8 codes.
Per element, all in IEEE fp32 (launches pass ``enable_fp_fusion=False``; divisions and square roots are
``tl.div_rn`` / ``tl.sqrt_rn``):

* decode: mitchell4_signed ``sign(k)·e_2(min(|k|,127)·fl(1/127)) · a``, mitchell8_unsigned
  ``e_3(k·fl(1/255)) · a``, with ``e_s(t) = float_of((bits(t) − K_s) << s)`` (0 for t = 0) and
  ``K_s = bits(1) − (bits(1) >> s)``;
* block absmax ``a``: the integer max of the sign-cleared bit patterns of the NEW values;
  ``s = 1/a`` for normal finite a, else 0 (codes 0; stored scale 0, or NaN for a non-finite a);
* encode: ``k = min(rint(c_2(|y|)·127), 127)`` (signed, y = x·s) / ``min(rint(c_3(|y|)·255), 255)`` with
  ``c_s(a) = float_of((bits(a) >> s) + K_s)``, rint half to even as ``(x + 2^23) − 2^23`` (exact for
  0 ≤ x < 2^22);
* stochastic rounding of a bf16 weight: ``(bits(w) + (r >> 16)) >> 16`` with
  ``r = mix(mix(key ^ hi32(i)) ^ lo32(i)·0x9E3779B9)``, ``key = mix(tensor_key ^ t)`` (uint32 arithmetic).

Nothing is stored when ``*found_inf`` is non-zero (every store is masked by it). Norm partials are
per-program sums (fixed tree), reduced per tensor in a fixed order by
:func:`fastlars.backends.triton.kernels.sum_chunks_kernel`: deterministic, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language import core as _tl_core  # noqa: F401  (the interpreter patches tl.core for kernels that see it)

from fastlars.backends.triton.kernels import (
    INTERPRETED,
    _block_sum,
    _clamp_ratio,
    _load_scalars,
    _typed,
    device_function,
    lars_momentum,
)

_block_max = tl.max.fn if INTERPRETED else tl.max  # helpers run as plain Python under the interpreter

KIND_FP32, KIND_BF16, KIND_FP16, KIND_INT8 = 0, 1, 2, 3


@device_function
def _div(x, y):
    """IEEE x / y for a scalar tensor y, broadcast to x's shape (tl.div_rn takes operands of one shape)."""
    return tl.div_rn(x, tl.broadcast_to(y, x.shape))


@device_function
def _load(ptr, idx, mask, KIND: tl.constexpr):
    """fp32 values of a full-precision array (bf16 widened from its bits: exact)."""
    if KIND == 1:
        bits = tl.load(ptr + idx, mask=mask, other=0).to(tl.uint32)
        x = (bits << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return x


@device_function
def _bf16_bits(x):
    """bf16 bits of fp32 x rounded to nearest even (NaN → 0x7FC0, as torch)."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@device_function
def _store(ptr, idx, x, mask, KIND: tl.constexpr):
    """Store fp32 x in the array's dtype, rounded to nearest even."""
    if KIND == 1:
        tl.store(ptr + idx, _bf16_bits(x), mask=mask)
    elif KIND == 2:
        tl.store(ptr + idx, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + idx, x, mask=mask)


@device_function
def _widened(x, KIND: tl.constexpr):
    """What fp32 x reads back as once stored in a full-precision array of KIND."""
    if KIND == 1:
        x = (_bf16_bits(x).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@device_function
def _rint(x):
    """x rounded to an integer, half to even, for 0 ≤ x < 2^22 (fp32 addition rounds to nearest even)."""
    return (x + 8388608.0) - 8388608.0


_BITS_OF_ONE = tl.constexpr(0x3F800000)
_INV_127 = tl.constexpr(1.0 / 127.0)  # an fp32 constant in a kernel: fl(1/127), as quantization._INV_127
_INV_255 = tl.constexpr(1.0 / 255.0)


@device_function
def _mitchell_expand(t, SHIFT: tl.constexpr):
    """e_s(t) = float_of((bits(t) − K_s) << s) for t > 0, 0 for t = 0."""
    offset: tl.constexpr = _BITS_OF_ONE - (_BITS_OF_ONE >> SHIFT)
    e = ((t.to(tl.uint32, bitcast=True) - offset) << SHIFT).to(tl.float32, bitcast=True)
    return tl.where(t > 0.0, e, 0.0)


@device_function
def _mitchell_compand(a, SHIFT: tl.constexpr):
    """c_s(a) = float_of((bits(a) >> s) + K_s) for fp32 a ≥ 0."""
    offset: tl.constexpr = _BITS_OF_ONE - (_BITS_OF_ONE >> SHIFT)
    return ((a.to(tl.uint32, bitcast=True) >> SHIFT) + offset).to(tl.float32, bitcast=True)


@device_function
def _decode(code, SIGNED: tl.constexpr):
    """Code-map value of uint8 codes: sign(k)·e_2(min(|k|,127)·fl(1/127)) (signed) or e_3(k·fl(1/255))."""
    k = code.to(tl.int32)
    if SIGNED:
        k = tl.where(k >= 128, k - 256, k)
        t = _mitchell_expand(tl.minimum(tl.abs(k), 127).to(tl.float32) * _INV_127, 2)
        t = tl.where(k < 0, -t, t)
    else:
        t = _mitchell_expand(k.to(tl.float32) * _INV_255, 3)
    return t


@device_function
def _encode(y, SIGNED: tl.constexpr):
    """uint8 codes of normalised y (|y| ≤ 1 + 1 ulp): the spec's encoders."""
    a = (y.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    if SIGNED:
        k = tl.minimum(_rint(_mitchell_compand(a, 2) * 127.0), 127.0).to(tl.int32)
        k = tl.where(y < 0.0, -k, k)
    else:
        k = tl.minimum(_rint(_mitchell_compand(a, 3) * 255.0), 255.0).to(tl.int32)
    return (k & 0xFF).to(tl.uint8)


@device_function
def _state_load(ptr, s_ptr, blk, blk_ok, idx, mask, KIND: tl.constexpr, SIGNED: tl.constexpr):
    """fp32 values of a state buffer's tile: decoded codes times their block's scale, or widened values."""
    if KIND == 3:
        scale = tl.load(s_ptr + blk, mask=blk_ok, other=0.0)
        x = _decode(tl.load(ptr + idx, mask=mask, other=0), SIGNED) * scale[:, None]
    else:
        x = _load(ptr, idx, mask, KIND)
    return x


@device_function
def _state_store(ptr, s_ptr, blk, blk_ok, idx, mask, keep, x, KIND: tl.constexpr, SIGNED: tl.constexpr):
    """Store new fp32 values x of a state tile (int8: blockwise quantised; else rounded) unless skipped,
    and return what the stored state decodes to."""
    if KIND == 3:
        bits = tl.where(mask, x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, 0)
        a_bits = _block_max(bits, 1)
        usable = (a_bits >= 0x00800000) & (a_bits < 0x7F800000)
        a = a_bits.to(tl.float32, bitcast=True)
        inv = tl.where(usable, tl.div_rn(tl.full(a.shape, 1.0, tl.float32), tl.where(usable, a, 1.0)), 0.0)
        nan = tl.full(a_bits.shape, 0x7FC00000, tl.uint32)
        scale = tl.where(a_bits >= 0x7F800000, nan.to(tl.float32, bitcast=True), tl.where(usable, a, 0.0))
        code = tl.where(inv[:, None] > 0.0, _encode(x * inv[:, None], SIGNED), 0).to(tl.uint8)
        tl.store(ptr + idx, code, mask=tl.where(keep, mask, False))
        tl.store(s_ptr + blk, scale, mask=tl.where(keep, blk_ok, False))
        x = _decode(code, SIGNED) * scale[:, None]
    else:
        _store(ptr, idx, x, tl.where(keep, mask, False), KIND)
        x = _widened(x, KIND)
    return x


@device_function
def _mix32(h):
    """MurmurHash3's fmix32 on uint32."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@device_function
def _write_weights(p_ptr, w_ptr, idx, mask, keep, w_new, key, offset,
                   P_KIND: tl.constexpr, MASTER: tl.constexpr, ROUNDED: tl.constexpr):
    """Masters get w_new and the param its nearest rounding; ROUNDED (a bf16 param without a master) gets
    the stochastic rounding of w_new with the bits of element index idx + offset under ``key``."""
    store = tl.where(keep, mask, False)  # (a scalar bool & a tensor fails under the interpreter)
    if MASTER:
        tl.store(w_ptr + idx, w_new, mask=store)
        _store(p_ptr, idx, w_new, store, P_KIND)
    elif ROUNDED:
        index = idx + offset
        high = _mix32(key ^ (index >> 32).to(tl.uint32))
        r = _mix32(high ^ ((index & 0xFFFFFFFF).to(tl.uint32) * 0x9E3779B9))
        u = w_new.to(tl.uint32, bitcast=True)
        rounded = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, (u + (r >> 16)) >> 16)
        tl.store(p_ptr + idx, rounded.to(tl.uint16), mask=store)
    else:
        _store(p_ptr, idx, w_new, store, P_KIND)


@device_function
def _tile(chunk_tensor_ptr, chunk_block_ptr, row_ptr, bpr_ptr, nblocks_ptr, QB: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor i, block indices [QB], blocks valid [QB], element indices [QB, BLOCK], elements valid)."""
    c = tl.program_id(0)
    i = tl.load(chunk_tensor_ptr + c)
    row = tl.load(row_ptr + i)
    bpr = tl.load(bpr_ptr + i)
    blk = tl.load(chunk_block_ptr + c) + tl.arange(0, QB)
    blk_ok = blk < tl.load(nblocks_ptr + i)
    r = blk // bpr
    col = (blk - r * bpr)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    return i, blk, blk_ok, r[:, None] * row + col, blk_ok[:, None] & (col < row)


@device_function
def _sr_key(steps_ptr, keys_ptr, offsets_ptr, j, ROUNDED: tl.constexpr):
    """(key of this update, element index offset) of entry j: mix(tensor_key ^ t)."""
    if ROUNDED:
        t = tl.load(steps_ptr + j).to(tl.uint32)
        key = _mix32(tl.load(keys_ptr + j).to(tl.uint32) ^ t)
        offset = tl.load(offsets_ptr + j)
    else:
        key = 0
        offset = 0
    return key, offset


@triton.jit
def lamb_lowbit_kernel(
    addr_table, scale_table, row_ptr, bpr_ptr, nblocks_ptr, chunk_tensor_ptr, chunk_block_ptr, index_ptr,
    n_tensors, partial_ptr, n_chunks, sums_ptr, n_out, bc1_ptr, bc2_ptr, steps_ptr, keys_ptr, offsets_ptr,
    lr, lr_ptr, decay, scale_ptr, inf_ptr, clip_ptr,
    beta1, beta2, beta3, one_minus_beta2, eps, weight_decay, lo, hi,
    P_DTYPE: tl.constexpr, P_KIND: tl.constexpr, G_DTYPE: tl.constexpr, G_KIND: tl.constexpr,
    M_DTYPE: tl.constexpr, M_KIND: tl.constexpr, V_DTYPE: tl.constexpr, V_KIND: tl.constexpr,
    MASTER: tl.constexpr, ROUNDED: tl.constexpr, PASS: tl.constexpr, ADAPT: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, TRUST_CLIP: tl.constexpr,
    BOUNDS: tl.constexpr, MAXIMIZE: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, QB: tl.constexpr, BLOCK: tl.constexpr,
):
    """LAMB on one tile; table rows: 0 params, 1 grads, 2 m, 3 v, 4 fp32 masters; scale rows: 0 m, 1 v.

    PASS 0 (not ADAPT, r = 1) or 1: g = ±grad/scale·clip ; m' = β1·D(m) + β3·g ; v' = β2·D(v) + (1−β2)·g²;
        m', v' stored (int8: blockwise with the absmax of m', v') and replaced by what they decode to, m̃, ṽ;
        u = (m̃/bc1) / (√(ṽ/bc2) + ε) + λ·w  (DECOUPLED: w' = w − lr·λ·w instead);
        PASS 1: partial[c] = Σ w'², partial[n_chunks + c] = Σ u² over the tile;
        PASS 0: w = w' − lr·u written.
    PASS 2: r = ||w'|| / ||u|| from sums[j], sums[n_out + j] (TRUST_CLIP: min(r, 1); bounds; 1 if a norm
        is 0); u recomputed from the stored state (the same bits as pass 1's), w = w' − lr·r·u written.
    """
    i, blk, blk_ok, idx, mask = _tile(chunk_tensor_ptr, chunk_block_ptr, row_ptr, bpr_ptr, nblocks_ptr, QB, BLOCK)
    c = tl.program_id(0)
    j = tl.load(index_ptr + i)
    lr_v, keep = _load_scalars(lr, lr_ptr, inf_ptr, LR_TENSOR)
    p_ptr = _typed(addr_table, 0, i, n_tensors, P_DTYPE, False)
    m_ptr = _typed(addr_table, 2, i, n_tensors, M_DTYPE, False)
    v_ptr = _typed(addr_table, 3, i, n_tensors, V_DTYPE, False)
    m_scale = tl.load(scale_table + i).to(tl.pointer_type(tl.float32))
    v_scale = tl.load(scale_table + n_tensors + i).to(tl.pointer_type(tl.float32))
    if MASTER:
        w_ptr = _typed(addr_table, 4, i, n_tensors, tl.float32, False)
        w = tl.load(w_ptr + idx, mask=mask, other=0.0)
    else:
        w_ptr = p_ptr
        w = _load(p_ptr, idx, mask, P_KIND)
    if PASS == 2:
        m = _state_load(m_ptr, m_scale, blk, blk_ok, idx, mask, M_KIND, True)
        v = _state_load(v_ptr, v_scale, blk, blk_ok, idx, mask, V_KIND, False)
    else:
        g = _load(_typed(addr_table, 1, i, n_tensors, G_DTYPE, False), idx, mask, G_KIND)
        if HAS_SCALE:
            g = _div(g, tl.load(scale_ptr).to(tl.float32))
        if MAXIMIZE:
            g = -g
        if HAS_CLIP:
            g = g * tl.load(clip_ptr).to(tl.float32)
        m = beta1 * _state_load(m_ptr, m_scale, blk, blk_ok, idx, mask, M_KIND, True) + beta3 * g
        v = beta2 * _state_load(v_ptr, v_scale, blk, blk_ok, idx, mask, V_KIND, False) + one_minus_beta2 * g * g
        m = _state_store(m_ptr, m_scale, blk, blk_ok, idx, mask, keep, m, M_KIND, True)
        v = _state_store(v_ptr, v_scale, blk, blk_ok, idx, mask, keep, v, V_KIND, False)
    if BIAS_CORRECTION:
        m = _div(m, tl.load(bc1_ptr + j))
        v = _div(v, tl.load(bc2_ptr + j))
    u = tl.div_rn(m, tl.sqrt_rn(v) + eps)
    if WEIGHT_DECAY:
        if DECOUPLED:
            if LR_TENSOR:
                decay = lr_v * weight_decay
            w = w - decay * w
        else:
            u = u + weight_decay * w
    if PASS == 1:
        u = tl.where(mask, u, 0.0)
        tl.store(partial_ptr + c, _block_sum(_block_sum(w * w, 1), 0))
        tl.store(partial_ptr + n_chunks + c, _block_sum(_block_sum(u * u, 1), 0))
    else:
        ratio = 1.0
        if ADAPT:
            w_norm = tl.sqrt_rn(tl.load(sums_ptr + j))
            u_norm = tl.sqrt_rn(tl.load(sums_ptr + n_out + j))
            ratio = tl.div_rn(w_norm, u_norm)
            if TRUST_CLIP:
                ratio = tl.minimum(ratio, 1.0)
            ratio = _clamp_ratio(ratio, w_norm, u_norm, lo, hi, BOUNDS)
        key, offset = _sr_key(steps_ptr, keys_ptr, offsets_ptr, j, ROUNDED)
        _write_weights(p_ptr, w_ptr, idx, mask, keep, w - lr_v * ratio * u, key, offset, P_KIND, MASTER, ROUNDED)


@triton.jit
def lars_lowbit_kernel(
    addr_table, scale_table, row_ptr, bpr_ptr, nblocks_ptr, chunk_tensor_ptr, chunk_block_ptr, index_ptr,
    n_tensors, gnorm_ptr, wsq_ptr, steps_ptr, keys_ptr, offsets_ptr, lr, lr_ptr, scale_ptr, inf_ptr,
    momentum, weight_decay, trust_coefficient, eps, lo, hi,
    P_DTYPE: tl.constexpr, P_KIND: tl.constexpr, G_DTYPE: tl.constexpr, G_KIND: tl.constexpr,
    V_DTYPE: tl.constexpr, V_KIND: tl.constexpr, MASTER: tl.constexpr, ROUNDED: tl.constexpr,
    ADAPT: tl.constexpr, NESTEROV: tl.constexpr, TRUST_CLIP: tl.constexpr, MLPERF: tl.constexpr,
    BOUNDS: tl.constexpr, MAXIMIZE: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr,
    QB: tl.constexpr, BLOCK: tl.constexpr,
):
    """LARS on one tile; table rows: 0 params, 1 grads, 2 momentum, 3 fp32 masters; scale row 0: momentum.

    r = η·||w|| / (||g|| + λ·||w|| + ε)  (TRUST_CLIP: min(r/lr, 1); bounds; 1 if a norm is 0 or not ADAPT),
    ||w||² and ||g|| of entry j from wsq[j], gnorm[j];  g = ±grad/scale ;  d = g + λ·w
    MLPERF: v = μ·D(b) + lr·r·d ; w = w − v        (NESTEROV: w − (μ·v + lr·r·d))
    else:   v = μ·D(b) + r·d    ; w = w − lr·v     (NESTEROV: w − lr·(μ·v + r·d))
    b ← Q(v) (blockwise with the absmax of v / rounded); the weights move by the fp32 v.
    """
    i, blk, blk_ok, idx, mask = _tile(chunk_tensor_ptr, chunk_block_ptr, row_ptr, bpr_ptr, nblocks_ptr, QB, BLOCK)
    j = tl.load(index_ptr + i)
    lr_v, keep = _load_scalars(lr, lr_ptr, inf_ptr, LR_TENSOR)
    ratio = 1.0
    if ADAPT:
        w_norm = tl.sqrt_rn(tl.load(wsq_ptr + j))
        g_norm = tl.load(gnorm_ptr + j).to(tl.float32)
        ratio = tl.div_rn(trust_coefficient * w_norm, g_norm + weight_decay * w_norm + eps)
        if TRUST_CLIP:
            ratio = tl.minimum(tl.div_rn(ratio, lr_v), 1.0)
        ratio = _clamp_ratio(ratio, w_norm, g_norm, lo, hi, BOUNDS)
    p_ptr = _typed(addr_table, 0, i, n_tensors, P_DTYPE, False)
    v_ptr = _typed(addr_table, 2, i, n_tensors, V_DTYPE, False)
    v_scale = tl.load(scale_table + i).to(tl.pointer_type(tl.float32))
    if MASTER:
        w_ptr = _typed(addr_table, 3, i, n_tensors, tl.float32, False)
        w = tl.load(w_ptr + idx, mask=mask, other=0.0)
    else:
        w_ptr = p_ptr
        w = _load(p_ptr, idx, mask, P_KIND)
    g = _load(_typed(addr_table, 1, i, n_tensors, G_DTYPE, False), idx, mask, G_KIND)
    if HAS_SCALE:
        g = _div(g, tl.load(scale_ptr).to(tl.float32))
    if MAXIMIZE:
        g = -g
    d = g + weight_decay * w
    v = _state_load(v_ptr, v_scale, blk, blk_ok, idx, mask, V_KIND, True)
    v_new, update = lars_momentum(v, d, lr_v, ratio, momentum, NESTEROV, MLPERF)
    _state_store(v_ptr, v_scale, blk, blk_ok, idx, mask, keep, v_new, V_KIND, True)
    key, offset = _sr_key(steps_ptr, keys_ptr, offsets_ptr, j, ROUNDED)
    _write_weights(p_ptr, w_ptr, idx, mask, keep, w - update, key, offset, P_KIND, MASTER, ROUNDED)
