r"""The low-precision optimizer-state format: THE spec every backend implements bit for bit.

fastlars keeps LAMB's moments (m, v) and LARS's momentum in one of three state dtypes, chosen per
param group (``state_dtype``) and per parameter:

* ``"fp32"``: what fastlars always did (4 B per element per buffer);
* ``"bf16"``: each buffer rounded to bfloat16, round-to-nearest-even (2 B);
* ``"int8"``: blockwise 8-bit codes plus one fp32 absmax per block of 256 (1 + 4/256 B).

Small tensors stay fp32 (:func:`resolve_state_dtype`). bf16 parameters may also drop their fp32
master copies and be updated by stochastic rounding (:func:`stochastic_round_bf16`), keyed by a
counter-based RNG (:func:`sr_bits`) so that every backend writes the same bits.

**Block layout.** A tensor of shape ``(d0, d1, …)`` (two or more dims) is read as ``d0`` *rows* of
``R = d1·d2·…`` elements in storage order (row-major; a channels_last tensor in its memory order, so
each row is one contiguous run of memory); a tensor of at most one dim is one row. Each row is cut
into blocks of ``B = 256`` consecutive elements, the last one ragged (``R mod B`` elements), and no
block spans two rows. Block ``j`` of row ``r`` holds elements ``r·R + j·B … r·R + min((j+1)·B, R) − 1``
and its scale is ``absmax[r, j]``; the scale tensor has shape ``(d0, ⌈R/B⌉)`` (``(1, ⌈n/B⌉)`` for ≤ 1
dim). Why rows: FSDP2 shards a parameter along dim 0 at row boundaries, so every rank's shard holds
whole blocks and quantises exactly as the unsharded tensor does, at any world size, and the scale
tensor shards along dim 0 exactly like the parameter (see :func:`range_keeps_blocks` for other cuts).
Rows shorter than 256 elements get smaller blocks (more scale bytes, better precision).

**Scaling.** ``a = max |x|`` over the block, taken as the maximum of the sign-cleared IEEE bit
patterns (an integer max: order-independent, and NaN > inf > every finite value, so a non-finite
element wins). Elements are normalised by one multiply, ``y = x · s`` with ``s = 1/a`` (an fp32
division, once per block), then encoded by the code map. Special blocks:

* ``a = 0`` or ``a < 2^−126`` (subnormal): every code is the map's 0 and the stored scale is 0 (the
  block flushes to zero: such values are 30 orders of magnitude below any optimizer state that
  matters, and ``1/a`` would overflow);
* ``a`` non-finite (NaN or inf: unreachable in an optimizer step, which is skipped when a gradient is
  non-finite, see below): codes 0 and scale NaN, so the block decodes to NaN (visible, never a
  silently finite value).

Decoding is ``x̂ = values[code] · a``: one table lookup (or equivalent exact arithmetic) and one fp32
multiply. All of it is IEEE fp32 with gradual underflow: a kernel must not flush subnormals (no
FTZ/DAZ; 1/a is itself subnormal when a > 2^126, and a normal block may hold subnormal elements).

**Code maps** (:class:`CodeMap`): 256 fp32 values indexed by the code byte and an exact encoder of
the normalised y. Chosen by measured accuracy and CPU speed against linear, fp8 (e4m3/e5m3), the
dynamic tree of Dettmers et al. and the IEEE-root power maps (benchmarks/codemaps.py; the README's
"Low-precision optimizer state"): *Mitchell* companding maps, uniform in a piecewise-linear stand-in
for a root of |y| computed on the fp32 bit pattern (Mitchell's 1962 logarithm: bits(a) read as a
fixed-point number is ≈ 2^23·(log2 a + 127)), rounded there, half to even. With
``K_s = bits(1) − (bits(1) >> s)``:

.. code-block:: text

    c_s(a)  = float_of((bits(a) >> s) + K_s)          a ≥ 0; c_s(1) = 1; within 0–6.1 % of a^(1/2^s)
    e_s(t)  = float_of((bits(t) − K_s) << s)          t > 0; e_s(0) = 0; the inverse of c_s

* :data:`SIGNED_MAP` (m, LARS momentum; s = 2): int8 ``k = sign(y)·min(rint(c_2(|y|)·127), 127)``,
  decoded ``sign(k)·e_2(|k|·fl(1/127))``: relative steps ≈ 4/|k|, down to 3.8e−9 of the block's absmax;
* :data:`UNSIGNED_MAP` (v; s = 3): ``k = min(rint(c_3(|y|)·255), 255)``, decoded ``e_3(k·fl(1/255))``:
  down to 5.6e−20, so √v, which u divides by, keeps ten decades below its block maximum.

Encoding and decoding are integer shifts and adds, one fp32 multiply and one rounding: no square root,
division or table, so every backend reproduces the bits cheaply and exactly. The block maximum decodes
exactly (code ±127 / 255 is 1), and re-quantising a decoded buffer reproduces its codes and scales.
The power maps of format version 1's first release (:data:`POW4_SIGNED_MAP`, :data:`POW8_UNSIGNED_MAP`:
uniform in √√|y| and √√√|y| by IEEE square roots) are still read: a checkpoint holding them is decoded
exactly and re-encoded once with the maps above when loaded.

**Skipped steps and NaN.** The optimizer never quantises a non-finite value: a step whose gradients
hold NaN/inf, or whose GradScaler found an overflow, writes nothing at all (codes, scales, weights and
step count keep their values), exactly as for fp32 state.

**Stochastic rounding RNG** (:func:`sr_bits`): 32-bit integer operations only (xor, shifts,
multiplication modulo 2^32), so Python, C++, CUDA and Triton produce the same bits:

.. code-block:: text

    mix(h)  = MurmurHash3's fmix32: h ^= h>>16; h *= 0x85EBCA6B; h ^= h>>13; h *= 0xC2B2AE35; h ^= h>>16
    key     = mix(mix(mix(mix(seed ^ 0x9E3779B9) ^ tensor) ^ stream) ^ step)
    bits(i) = mix(mix(key ^ hi32(i)) ^ (lo32(i) · 0x9E3779B9))

``seed``: 32 bits, in the optimizer's state_dict; ``tensor``: the parameter's position in the
optimizer's parameter list (its state_dict id); ``stream``: what is rounded (:data:`STREAM_PARAM` for
weights); ``step``: the step count t of the update (1-based, after counting it); ``i``: the element's
index in the *whole* (unsharded) tensor in storage order, so a shard draws the bits the unsharded
tensor would (a kernel adds its shard's offset). ``mix(key ^ hi32(i))`` is constant over 2^32
elements: kernels compute it once per block.

**bf16 state** rounds to nearest even (``Tensor.to(torch.bfloat16)``); **stochastic rounding** of an
fp32 ``x`` to bf16 adds the top 16 random bits to x's bit pattern and truncates the low 16 bits, so x
rounds up (in magnitude) with probability (discarded bits)/2^16: unbiased, E[SR(x)] = x.

**state_dict** (:func:`pack_state`, :func:`unpack_state`): a parameter whose state is not fp32
carries ``state["state_format"]``, a dict of plain strings and ints (so ``torch.load(...,
weights_only=True)`` loads it)::

    {"version": 1, "dtype": "int8", "block_size": 256, "layout": "rows", "scale": "absmax_fp32",
     "maps": {"exp_avg": "mitchell4_signed", "exp_avg_sq": "mitchell8_unsigned"}}
    {"version": 1, "dtype": "bf16", "rounding": "nearest_even"}

An int8 buffer ``name`` is stored as ``state[name]`` (uint8 codes, the parameter's shape and memory
format) and ``state[name + "_absmax"]`` (fp32, the scale shape above); a bf16 buffer as a bf16 tensor;
fp32 state has no ``state_format`` entry (so checkpoints from before this format load unchanged).
Conversions go through fp32: ``pack_state(unpack_state(entry), new_dtype)`` (fp32 ↔ bf16 ↔ int8,
either way; int8 → fp32 is exact, fp32 → int8 rounds once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FORMAT_VERSION = 1
"""Version of the ``state_format`` record; bumped whenever the layout, the scaling or the rounding
changes, so that old checkpoints are converted instead of misread. Code maps are named in the record:
a new map gets a new name (and the old one stays readable) without a new version."""

BLOCK_SIZE = 256
"""Elements per quantisation block (the last block of a row may be shorter)."""

MIN_QUANTIZED_SIZE = 4096
"""Default ``min_quantized_size``: tensors with fewer elements keep fp32 state."""

STATE_DTYPES = ("fp32", "bf16", "int8")
"""Accepted values of ``state_dtype``."""

ABSMAX_SUFFIX = "_absmax"
"""State key of an int8 buffer's block scales: ``state[name + ABSMAX_SUFFIX]``."""

FORMAT_KEY = "state_format"
"""State key of the per-parameter format record (absent for fp32 state)."""

SMALLEST_NORMAL = 2.0**-126
"""Blocks whose absmax is below this (fp32 subnormal or zero) are stored as zeros with scale 0."""

# Stream ids of the stochastic-rounding RNG: what is being rounded.
STREAM_PARAM = 0
"""Weights (bf16 parameters without fp32 masters)."""

GOLDEN = 0x9E3779B9
"""2^32 / φ, odd: seeds the key chain and spreads the element index before mixing."""

_MASK32 = 0xFFFFFFFF


# ===================================================================================== layout
@dataclass(frozen=True)
class BlockLayout:
    """How a tensor of some shape is cut into quantisation blocks (see the module docstring).

    ``rows`` × ``row_length`` = numel; each row holds ``blocks_per_row = ⌈row_length / block⌉``
    blocks; ``scale_shape = (rows, blocks_per_row)``.
    """

    rows: int
    row_length: int
    block: int

    @property
    def blocks_per_row(self) -> int:
        """⌈row_length / block⌉ (0 for empty rows)."""
        return -(-self.row_length // self.block)

    @property
    def scale_shape(self) -> tuple[int, int]:
        """Shape of the fp32 absmax tensor: one scale per block."""
        return (self.rows, self.blocks_per_row)

    @property
    def num_blocks(self) -> int:
        """rows · blocks_per_row."""
        return self.rows * self.blocks_per_row


def block_layout(shape: torch.Size | tuple[int, ...], block: int = BLOCK_SIZE) -> BlockLayout:
    """Rows = dim 0 for tensors of ≥ 2 dims (row_length = the product of the other dims); one row for
    0-d and 1-d tensors."""
    if block <= 0:
        raise ValueError(f"block: must be a positive number of elements, got {block}")
    numel = math.prod(shape)
    if len(shape) >= 2:
        return BlockLayout(rows=shape[0], row_length=math.prod(shape[1:]), block=block)
    return BlockLayout(rows=1, row_length=numel, block=block)


def range_keeps_blocks(layout: BlockLayout, start: int, stop: int) -> bool:
    """Whether the storage-order element range [start, stop) — a shard — holds whole blocks only, so
    that quantising the shard alone gives exactly the codes and scales of the whole tensor.

    True when each end lies at the end of the tensor, on a row boundary, or on a block boundary
    within its row. FSDP2's dim-0 shards of a tensor with ≥ 2 dims always qualify; a 1-d tensor
    qualifies when its shard offsets are multiples of the block size.
    """

    def on_boundary(i: int) -> bool:
        return i in (0, layout.rows * layout.row_length) or (i % layout.row_length) % layout.block == 0

    if layout.row_length == 0:
        return True
    return on_boundary(start) and on_boundary(stop)


def storage_permutation(t: Tensor) -> tuple[int, ...]:
    """The dim order in which ``t``'s elements lie in memory, as blocks are laid out: (0, 2, 3, 1) for a
    channels_last 4-d tensor (0, 2, 3, 4, 1 for channels_last_3d), else row-major (the identity).
    Dim 0 always comes first, so a row is one contiguous run of memory."""
    if not t.is_contiguous():
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
            return (0, 2, 3, 1)
        if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
            return (0, 2, 3, 4, 1)
    return tuple(range(t.dim()))


def _rows(t: Tensor) -> Tensor:
    """``t`` as (rows, row_length) in storage order (a view when t is dense in that order)."""
    layout = block_layout(t.shape)
    return t.permute(storage_permutation(t)).reshape(layout.rows, layout.row_length)


def _from_rows(rows: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_rows`: a tensor of ``like``'s shape and memory format holding ``rows``."""
    perm = storage_permutation(like)
    permuted_shape = [like.shape[d] for d in perm]
    inverse = [perm.index(d) for d in range(like.dim())]
    return rows.reshape(permuted_shape).permute(inverse)


# ================================================================================== code maps
class CodeMap:
    """An 8-bit code map: ``values[c]`` is what code byte ``c`` decodes to (before the block scale);
    ``encode`` turns normalised values ``y = x / absmax`` into code bytes (uint8) with the exact
    arithmetic every backend must reproduce.

    Args:
        name: the name written into state_dicts (a loader refuses names it does not know).
        signed: whether the map holds negative values (m, momentum) or not (v).
        values: 256 fp32 values indexed by code byte, within [-1, 1].
        encode: the encoder of normalised fp32 values (|y| ≤ 1 up to one rounding of 1/absmax).
    """

    def __init__(self, name: str, signed: bool, values: Tensor, encode: Callable[[Tensor], Tensor]) -> None:
        if values.shape != (256,) or values.dtype != torch.float32:
            raise ValueError(f"{name}: values must be 256 fp32 numbers, got {values.dtype} {tuple(values.shape)}")
        self.name = name
        self.signed = signed
        self.values = values.contiguous()
        self._encode = encode
        self._values_on: dict[torch.device, Tensor] = {}

    def __repr__(self) -> str:
        return f"CodeMap({self.name!r})"

    def encode(self, y: Tensor) -> Tensor:
        """Code bytes (uint8, y's shape) of normalised fp32 values ``y``."""
        return self._encode(y)

    def decode(self, codes: Tensor) -> Tensor:
        """fp32 values of code bytes: ``values[codes]``."""
        if codes.device not in self._values_on:
            self._values_on[codes.device] = self.values.to(codes.device)
        return self._values_on[codes.device][codes.long()]


def _signed_byte_values(power: int) -> Tensor:
    """values[c] = sign(k)·(|k|/127)^power for the two's-complement byte c = k (k = −127 … 127;
    0x80 = −128 is never produced and decodes to −1, like −127)."""
    k = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).float().clamp(min=-127.0)
    return torch.where(k < 0, -repeated_square(torch.abs(k) / 127.0, power), repeated_square(k / 127.0, power))


def repeated_square(t: Tensor, power: int) -> Tensor:
    """t^power by repeated fp32 squaring (t², t⁴, t⁸): the exact operations a kernel decodes with."""
    for _ in range(power.bit_length() - 1):
        t = t * t
    return t


def sqrt_rn(x: Tensor) -> Tensor:
    """The correctly rounded fp32 square root (IEEE sqrtf, what C++ and CUDA compute).

    Not ``torch.sqrt`` of an fp32 CPU tensor: its vectorised kernel is off by one ulp on about one
    value in five (torch 2.14, AVX-512). The float64 root rounded to fp32 is exact: rounding twice is
    harmless for a square root when the wider format has ≥ 2·24 + 2 bits (Figueroa 1995), and float64
    has 53."""
    return torch.sqrt(x.double()).float()


def repeated_sqrt(y: Tensor, power: int) -> Tensor:
    """y^(1/power) by repeated correctly rounded fp32 square roots (power = 2, 4 or 8)."""
    for _ in range(power.bit_length() - 1):
        y = sqrt_rn(y)
    return y


def _pow4_signed_encode(y: Tensor) -> Tensor:
    k = torch.clamp(torch.round(repeated_sqrt(torch.abs(y), 4) * 127.0), max=127.0)
    return torch.where(y < 0, -k, k).to(torch.int8).view(torch.uint8)


def _pow8_unsigned_encode(y: Tensor) -> Tensor:
    k = torch.clamp(torch.round(repeated_sqrt(torch.abs(y), 8) * 255.0), max=255.0)
    return k.to(torch.uint8)


POW4_SIGNED_MAP = CodeMap("pow4_signed", True, _signed_byte_values(4), _pow4_signed_encode)
r"""Read-only (the first release's map of m and momentum): code byte = int8
k = sign(y)·min(rint(√√|y|·127), 127) (two IEEE square roots, rint half to even); decodes to
sign(k)·(|k|/127)⁴ (t = |k|/127 by fp32 division, then t² and t⁴ by fp32 multiplies)."""

POW8_UNSIGNED_MAP = CodeMap("pow8_unsigned", False,
                            repeated_square(torch.arange(256, dtype=torch.float32) / 255.0, 8), _pow8_unsigned_encode)
r"""Read-only (the first release's map of v): code byte k = min(rint(√√√|y|·255), 255); decodes to
(k/255)⁸ (t = k/255, then t², t⁴, t⁸)."""

_BITS_OF_ONE = 0x3F800000
_INV_127 = torch.tensor(1.0 / 127.0, dtype=torch.float32)  # fl(1/127): the fp32 division 1/127, exactly
_INV_255 = torch.tensor(1.0 / 255.0, dtype=torch.float32)


def mitchell_offset(shift: int) -> int:
    """K_s = bits(1.0) − (bits(1.0) >> s), so that c_s(1) = 1."""
    return _BITS_OF_ONE - (_BITS_OF_ONE >> shift)


def mitchell_compand(a: Tensor, shift: int) -> Tensor:
    """c_s(a) = float_of((bits(a) >> s) + K_s) of fp32 a ≥ 0: ≈ a^(1/2^s), monotone, exact at 1 (c_s(0) =
    float_of(K_s), 2.9e−10 for s = 2 and 1.7e−5 for s = 3: zero and subnormals encode as code 0)."""
    return ((a.contiguous().view(torch.int32) >> shift) + mitchell_offset(shift)).view(torch.float32)


def mitchell_expand(t: Tensor, shift: int) -> Tensor:
    """e_s(t) = float_of((bits(t) − K_s) << s), the inverse of :func:`mitchell_compand` on the code grid
    (t ≥ fl(1/255)); 0 where t = 0."""
    out = ((t.contiguous().view(torch.int32) - mitchell_offset(shift)) << shift).view(torch.float32)
    return torch.where(t > 0, out, torch.zeros_like(out))


def _magnitude(y: Tensor) -> Tensor:
    """|y| by clearing the sign bit (−0 → 0; one bit operation in every backend)."""
    return (y.contiguous().view(torch.int32) & 0x7FFFFFFF).view(torch.float32)


def _mitchell_signed_encode(y: Tensor) -> Tensor:
    k = torch.clamp(torch.round(mitchell_compand(_magnitude(y), 2) * 127.0), max=127.0)
    return torch.where(y < 0, -k, k).to(torch.int8).view(torch.uint8)


def _mitchell_unsigned_encode(y: Tensor) -> Tensor:
    return torch.clamp(torch.round(mitchell_compand(_magnitude(y), 3) * 255.0), max=255.0).to(torch.uint8)


def _mitchell_signed_values() -> Tensor:
    k = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).to(torch.int32).clamp(min=-127)
    magnitude = mitchell_expand(torch.abs(k).float() * _INV_127, 2)
    return torch.where(k < 0, -magnitude, magnitude)


SIGNED_MAP = CodeMap("mitchell4_signed", True, _mitchell_signed_values(), _mitchell_signed_encode)
r"""The map of m (LAMB) and the momentum (LARS): code byte = int8 k = sign(y)·min(rint(c_2(|y|)·127), 127)
with c_2(a) = float_of((bits(a) >> 2) + K_2) ≈ a^¼ and rint rounding half to even; decodes to
sign(k)·float_of((bits(t) − K_2) << 2), t = |k|·fl(1/127) (0 for k = 0; 0x80 = −128 is never written and
decodes to −1, like −127). Relative steps of ≈ 4/|k|, values down to 3.8e−9 of the block's absmax (as the
power map's 127^−4)."""

UNSIGNED_MAP = CodeMap("mitchell8_unsigned", False,
                       mitchell_expand(torch.arange(256, dtype=torch.float32) * _INV_255, 3), _mitchell_unsigned_encode)
r"""The map of v (LAMB): code byte k = min(rint(c_3(|y|)·255), 255) with c_3(a) = float_of((bits(a) >> 3)
+ K_3) ≈ a^⅛ (v ≥ 0 always; |y| clears the sign bit, so −0 encodes as 0); decodes to
float_of((bits(t) − K_3) << 3), t = k·fl(1/255) (0 for k = 0). Nearly uniform in v^⅛ (so in (√v)^¼, the
quantity u divides by): values down to 5.6e−20 of the block's absmax (as the power map's 255^−8)."""

CODE_MAPS: dict[str, CodeMap] = {m.name: m for m in (SIGNED_MAP, UNSIGNED_MAP, POW4_SIGNED_MAP, POW8_UNSIGNED_MAP)}
"""Every map this version reads, by the name stored in state_dicts (it writes SIGNED_MAP and UNSIGNED_MAP)."""


# ================================================================================ block quant
def block_absmax(blocks: Tensor) -> Tensor:
    """max |x| over the last dim, as the max of sign-cleared bit patterns (NaN > inf > finite)."""
    magnitude_bits = blocks.contiguous().view(torch.int32) & 0x7FFFFFFF
    return magnitude_bits.amax(dim=-1).view(torch.float32)


def inverse_scale(absmax: Tensor) -> Tensor:
    """1/absmax (fp32 division) for normal finite scales; 0 for subnormal, zero or non-finite ones."""
    usable = (absmax >= SMALLEST_NORMAL) & torch.isfinite(absmax)
    return torch.where(usable, 1.0 / torch.where(usable, absmax, torch.ones_like(absmax)), torch.zeros_like(absmax))


def stored_scale(absmax: Tensor) -> Tensor:
    """The scale written for a block: absmax; 0 for flushed (subnormal) blocks; NaN for non-finite."""
    flushed = torch.where(absmax >= SMALLEST_NORMAL, absmax, torch.zeros_like(absmax))
    return torch.where(torch.isfinite(absmax), flushed, torch.full_like(absmax, math.nan))


def quantize_blockwise(x: Tensor, code_map: CodeMap, block: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Codes (uint8, x's shape and memory format) and scales (fp32, ``block_layout(x.shape).scale_shape``).

    Per block: a = block_absmax, s = inverse_scale(a), code = code_map.encode(x·s); codes are 0 in
    flushed and non-finite blocks; the stored scale is :func:`stored_scale`.
    """
    layout = block_layout(x.shape, block)
    rows = _rows(x.float())
    padded = torch.nn.functional.pad(rows, (0, layout.blocks_per_row * block - layout.row_length))
    blocks = padded.reshape(layout.rows, layout.blocks_per_row, block)
    absmax = block_absmax(blocks)
    scale = inverse_scale(absmax)
    codes = code_map.encode(blocks * scale.unsqueeze(-1))
    codes = torch.where((scale > 0).unsqueeze(-1), codes, torch.zeros_like(codes))
    codes = codes.reshape(layout.rows, layout.blocks_per_row * block)[:, : layout.row_length]
    return _from_rows(codes, x).clone(memory_format=torch.preserve_format), stored_scale(absmax)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code_map: CodeMap, block: int = BLOCK_SIZE) -> Tensor:
    """fp32 values (codes' shape and memory format): ``values[code] · absmax`` of each element's block."""
    layout = block_layout(codes.shape, block)
    if tuple(absmax.shape) != layout.scale_shape:
        raise ValueError(f"absmax: shape {tuple(absmax.shape)} does not match codes of shape {tuple(codes.shape)} "
                         f"(expected {layout.scale_shape} for blocks of {block})")
    rows = code_map.decode(_rows(codes))
    scale = absmax.float().repeat_interleave(block, dim=1)[:, : layout.row_length]
    return _from_rows(rows * scale, codes).clone(memory_format=torch.preserve_format)


# ====================================================================== RNG and SR rounding
def _mul32(a: Tensor, constant: int) -> Tensor:
    """(a · constant) mod 2^32 for int64 tensors holding values in [0, 2^32), without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (a * low + (((a * high) & 0xFFFF) << 16)) & _MASK32


def mix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of [0, 2^32) with full avalanche), on int64 tensors."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def mix32_int(h: int) -> int:
    """:func:`mix32` of a Python int (host side of the key chain)."""
    return int(mix32(torch.tensor(h & _MASK32, dtype=torch.int64)))


def sr_tensor_key(seed: int, tensor: int, stream: int) -> int:
    """The host part of the key: mix(mix(mix(seed ^ GOLDEN) ^ tensor) ^ stream), a 32-bit int."""
    key = mix32_int((seed & _MASK32) ^ GOLDEN)
    key = mix32_int(key ^ (tensor & _MASK32))
    return mix32_int(key ^ (stream & _MASK32))


def sr_key(tensor_key: int, step: Tensor) -> Tensor:
    """mix(tensor_key ^ t): the key of one update, from the step count t (an fp32 or integer tensor
    holding a whole number below 2^32, read on its device: no host sync)."""
    t = step.reshape(()).to(torch.int64) & _MASK32
    return mix32(t ^ tensor_key)


def sr_bits(key: Tensor, index: Tensor) -> Tensor:
    """32 random bits per element index: mix(mix(key ^ hi32(i)) ^ (lo32(i) · GOLDEN mod 2^32)).

    ``key``: from :func:`sr_key` (int64 0-d); ``index``: int64 element indices in the whole tensor.
    Returns int64 values in [0, 2^32).
    """
    high = mix32(key ^ (index >> 32))
    return mix32(high ^ _mul32(index & _MASK32, GOLDEN))


def stochastic_round_bf16(x: Tensor, bits: Tensor) -> Tensor:
    """fp32 → bf16 by stochastic rounding: bf16 bits = (bits(x) + (r >> 16)) >> 16, for random r.

    Rounds |x| up to the next bf16 with probability (x's low 16 bits) / 2^16, else down (truncation),
    so E[SR(x)] = x exactly. Zeros and ±inf are kept; a finite x above the largest bf16 may round to
    inf (the next value up), as round-to-nearest does above it; NaN becomes the quiet NaN 0x7FC0.
    """
    pattern = x.float().contiguous().view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((pattern + (bits >> 16)) >> 16) & 0xFFFF
    rounded = torch.where(torch.isnan(x), torch.full_like(rounded, 0x7FC0), rounded)
    signed16 = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16)
    return signed16.view(torch.bfloat16)


def element_indices(t: Tensor, offset: int = 0) -> Tensor:
    """Each element's index in storage order plus ``offset`` (its shard's start in the whole tensor),
    laid out in t's shape and memory format (int64, on t's device)."""
    n = t.numel()
    flat = torch.arange(offset, offset + n, dtype=torch.int64, device=t.device)
    layout = block_layout(t.shape)
    return _from_rows(flat.reshape(layout.rows, layout.row_length), t)


# ==================================================================== per-parameter state rule
def resolve_state_dtype(requested: str, numel: int, *, adapts: bool, min_quantized_size: int = MIN_QUANTIZED_SIZE,
                        override: str | None = None) -> str:
    """The state dtype one parameter gets.

    ``override`` (a per-parameter choice) wins; otherwise fp32 when ``requested`` is fp32, when the
    group does not adapt (biases and norm gains excluded from the trust ratio), or when the tensor has
    fewer than ``min_quantized_size`` elements; else ``requested``. ``numel`` is the WHOLE tensor's
    count even when this rank holds a shard, so every rank (and an unsharded run) decides alike.
    """
    for name, value in (("state_dtype", requested), ("override", override)):
        if value is not None and value not in STATE_DTYPES:
            raise ValueError(f"{name}: must be one of {', '.join(STATE_DTYPES)}, got {value!r}")
    if min_quantized_size < 0:
        raise ValueError(f"min_quantized_size: must be ≥ 0, got {min_quantized_size}")
    if override is not None:
        return override
    if requested == "fp32" or not adapts or numel < min_quantized_size:
        return "fp32"
    return requested


# ========================================================================== state containers
class QuantizedBuffer:
    """One int8 state buffer: codes (uint8, the parameter's shape) and per-block fp32 scales.

    ``dequantize()`` gives the fp32 values the optimizer works with; ``store(x)`` quantises new values
    into the buffer and returns what it will decode to (what the update must use).
    """

    def __init__(self, codes: Tensor, absmax: Tensor, code_map: CodeMap, block: int = BLOCK_SIZE) -> None:
        layout = block_layout(codes.shape, block)
        if codes.dtype != torch.uint8:
            raise ValueError(f"codes: expected uint8, got {codes.dtype}")
        if absmax.dtype != torch.float32 or tuple(absmax.shape) != layout.scale_shape:
            raise ValueError(f"absmax: expected fp32 of shape {layout.scale_shape}, got {absmax.dtype} "
                             f"{tuple(absmax.shape)}")
        self.codes, self.absmax, self.code_map, self.block = codes, absmax, code_map, block

    @classmethod
    def zeros_like(cls, t: Tensor, code_map: CodeMap, block: int = BLOCK_SIZE) -> QuantizedBuffer:
        """An all-zero buffer for a parameter like ``t`` (codes in t's memory format)."""
        layout = block_layout(t.shape, block)
        codes = torch.zeros_like(t, dtype=torch.uint8, memory_format=torch.preserve_format)
        return cls(codes, torch.zeros(layout.scale_shape, dtype=torch.float32, device=t.device), code_map, block)

    def dequantize(self) -> Tensor:
        """fp32 values of the buffer."""
        return dequantize_blockwise(self.codes, self.absmax, self.code_map, self.block)

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(codes, scales) of fp32 values ``x`` in this buffer's format, without storing them."""
        return quantize_blockwise(x, self.code_map, self.block)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus scales."""
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * 4


# ================================================================================ state_dict
def format_record(dtype: str, maps: Mapping[str, CodeMap] | None = None, block: int = BLOCK_SIZE) -> dict[str, Any]:
    """The ``state_format`` record of a parameter whose buffers are stored as ``dtype`` (bf16 or int8;
    fp32 state has no record). ``maps``: buffer name → code map (int8 only)."""
    if dtype == "fp32":
        raise ValueError("fp32 state has no state_format record")
    if dtype == "bf16":
        return {"version": FORMAT_VERSION, "dtype": "bf16", "rounding": "nearest_even"}
    if dtype == "int8":
        if not maps:
            raise ValueError("int8 state needs the code map of each buffer")
        return {"version": FORMAT_VERSION, "dtype": "int8", "block_size": block, "layout": "rows",
                "scale": "absmax_fp32", "maps": {name: m.name for name, m in maps.items()}}
    raise ValueError(f"state dtype must be one of {', '.join(STATE_DTYPES)}, got {dtype!r}")


def pack_state(buffers: Mapping[str, Tensor], dtype: str, maps: Mapping[str, CodeMap] | None = None,
               block: int = BLOCK_SIZE) -> dict[str, Any]:
    """State entries of fp32 ``buffers`` (name → tensor of the parameter's shape) stored as ``dtype``:
    fp32 copies; bf16 tensors; or uint8 codes + ``name_absmax`` scales and the ``state_format`` record."""
    if dtype not in STATE_DTYPES:
        raise ValueError(f"state dtype must be one of {', '.join(STATE_DTYPES)}, got {dtype!r}")
    if dtype == "fp32":
        return {name: x.float().clone(memory_format=torch.preserve_format) for name, x in buffers.items()}
    if dtype == "bf16":
        out: dict[str, Any] = {name: x.to(torch.bfloat16) for name, x in buffers.items()}
        out[FORMAT_KEY] = format_record("bf16")
        return out
    if maps is None or set(maps) != set(buffers):
        raise ValueError(f"int8 state needs a code map for each of {sorted(buffers)}")
    out = {}
    for name, x in buffers.items():
        out[name], out[name + ABSMAX_SUFFIX] = quantize_blockwise(x, maps[name], block)
    out[FORMAT_KEY] = format_record("int8", maps, block)
    return out


def validate_record(record: Any, buffer_names: tuple[str, ...], known_maps: Mapping[str, CodeMap]) -> None:
    """Check a ``state_format`` record (None: fp32 state): an unknown version, dtype, layout, block size
    or map name raises a ValueError naming it."""
    if record is None:
        return
    if not isinstance(record, Mapping) or record.get("version") != FORMAT_VERSION:
        raise ValueError(f"state_format: unsupported record {record!r} (this fastlars reads version {FORMAT_VERSION})")
    dtype = record.get("dtype")
    if dtype == "bf16":
        return
    if dtype != "int8":
        raise ValueError(f"state_format: unknown dtype {dtype!r}")
    if record.get("layout") != "rows" or record.get("scale") != "absmax_fp32":
        raise ValueError(f"state_format: unknown layout/scale {record.get('layout')!r}/{record.get('scale')!r}")
    block = record.get("block_size")
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"state_format: block_size must be a positive int, got {block!r}")
    maps = record.get("maps")
    for name in buffer_names:
        map_name = maps.get(name) if isinstance(maps, Mapping) else None
        if map_name not in known_maps:
            raise ValueError(f"state_format: buffer {name!r} uses code map {map_name!r}, which this fastlars "
                             f"does not know (known: {sorted(known_maps)})")


def unpack_state(entry: Mapping[str, Any], buffer_names: tuple[str, ...],
                 known_maps: Mapping[str, CodeMap]) -> dict[str, Tensor]:
    """fp32 values of each buffer of a saved state entry, whatever its format (validates the record
    with :func:`validate_record` first)."""
    record = entry.get(FORMAT_KEY)
    validate_record(record, buffer_names, known_maps)
    if record is None or record["dtype"] == "bf16":
        return {name: entry[name].float() for name in buffer_names}
    block, maps = record["block_size"], record["maps"]
    return {name: dequantize_blockwise(entry[name], entry[name + ABSMAX_SUFFIX], known_maps[maps[name]], block)
            for name in buffer_names}
