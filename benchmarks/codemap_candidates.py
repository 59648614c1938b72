"""The 8-bit code maps compared for fastlars' low-precision optimizer state (issue 22).

Each candidate is a pair of :class:`fastlars.backends.quantization.CodeMap` objects: a signed map for
LAMB's m and LARS's momentum, an unsigned map for LAMB's v. A map decodes a code byte ``c`` to
``values[c]`` (in [-1, 1] or [0, 1]) times the block's absmax; its encoder is the exact arithmetic a
kernel would run, written in torch so that the accuracy study quantises exactly what the C++ speed
study (benchmarks/codemaps.cpp) encodes — the benchmark checks that the two agree byte for byte.

* ``linear``: uniform codes, ``rint(y·127)`` / ``rint(y·255)``.
* ``power`` (the first release's format, still read from checkpoints): companding, uniform in |y|^¼
  for m (``sign·rint(√√|y|·127)``, decoded ``sign·(k/127)⁴``) and in y^⅛ for v (``rint(√√√y·255)``,
  decoded ``(k/255)⁸``); rounding happens in the companded domain. ``power2``: one square root less (|y|^½ and y^¼).
* ``fp8``: OCP e4m3fn of ``y·448`` for m (what H100 converts in one instruction), an unsigned e5m3
  (5 exponent bits, bias 15, 3 mantissa bits, no sign, no inf/NaN; top code = 1.0) for v.
* ``dynamic_tree``: Dettmers et al. 2021 (arXiv 2110.02861), derived from the paper's description
  (see :func:`dynamic_tree_magnitudes`): after the sign bit (m only),
  a run of E zero bits gives the decade 10^−E, an indicator bit ends it, the remaining F bits split
  (0.1, 1] linearly. Nearest-value rounding (ties toward zero) by a search.
* ``dynamic_tree2``: dynamic tree for m; for v the dynamic tree's magnitudes *squared* (the same
  grid in √v, so v keeps 14 decades of range instead of 7: v underflowing to 0 inside a block is
  what makes u = m/(√v + ε) explode for the plain dynamic tree).
* ``mitchell`` (the format's choice: :data:`fastlars.backends.quantization.SIGNED_MAP` /
  ``UNSIGNED_MAP``): the power map's companding with its roots replaced by integer operations on the fp32
  bit pattern (Mitchell's 1962 logarithm: the bits of a > 0 read as a fixed-point number are
  ≈ 2^23·(log2 a + 127)). Shifting them right by s and adding K_s = bits(1) − (bits(1) >> s) gives
  c_s(a) = float_of((bits(a) >> s) + K_s), a monotone piecewise-linear stand-in for a^(1/2^s) that
  is exact at 1 (c_s(1) = 1); m: ``sign·min(rint(c_2(|y|)·127), 127)``, v: ``min(rint(c_3(y)·255), 255)``,
  decoded by the inverse on the grid, float_of((bits(t) − K_s) << s) with t = k·fl(1/127) (or
  fl(1/255)), 0 for k = 0. Encoding and decoding are a shift, an add, a multiply and a rounding: no
  square root, division or table, so every backend reproduces the bits cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from fastlars.backends.quantization import (
    POW4_SIGNED_MAP,
    POW8_UNSIGNED_MAP,
    SIGNED_MAP,
    UNSIGNED_MAP,
    CodeMap,
    repeated_sqrt,
    repeated_square,
)

# ------------------------------------------------------------------------------------ linear


def _linear_signed_encode(y: Tensor) -> Tensor:
    k = torch.clamp(torch.round(y * 127.0), -127.0, 127.0)
    return k.to(torch.int8).view(torch.uint8)


def _linear_unsigned_encode(y: Tensor) -> Tensor:
    return torch.clamp(torch.round(y * 255.0), 0.0, 255.0).to(torch.uint8)


def _signed_byte_values(scale: float, power: int) -> Tensor:
    k = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).float().clamp(min=-scale)
    t = torch.abs(k) / scale
    return torch.where(k < 0, -repeated_square(t, power), repeated_square(t, power))


LINEAR_SIGNED = CodeMap("linear_signed", True, _signed_byte_values(127.0, 1), _linear_signed_encode)
LINEAR_UNSIGNED = CodeMap("linear_unsigned", False, torch.arange(256, dtype=torch.float32) / 255.0,
                          _linear_unsigned_encode)

# ------------------------------------------------------------------------------------- power
# "power" is the first release's format (fastlars.backends.quantization.POW4_SIGNED_MAP / POW8_UNSIGNED_MAP): uniform in
# |y|^¼ for m, in y^⅛ for v. "power2" is the same idea one square root shallower: |y|^½ and y^¼.


def _power2_signed_encode(y: Tensor) -> Tensor:
    k = torch.clamp(torch.round(repeated_sqrt(torch.abs(y), 2) * 127.0), max=127.0)
    return torch.where(y < 0, -k, k).to(torch.int8).view(torch.uint8)


def _power2_unsigned_encode(y: Tensor) -> Tensor:
    return torch.clamp(torch.round(repeated_sqrt(torch.abs(y), 4) * 255.0), max=255.0).to(torch.uint8)


POWER2_SIGNED = CodeMap("pow2_signed", True, _signed_byte_values(127.0, 2), _power2_signed_encode)
POWER2_UNSIGNED = CodeMap("pow4_unsigned", False, repeated_square(torch.arange(256, dtype=torch.float32) / 255.0, 4),
                          _power2_unsigned_encode)

# --------------------------------------------------------------------------------------- fp8
E4M3_MAX = 448.0
E5M3_MAX = 122880.0  # 1.875 · 2^16, the top unsigned e5m3 value


def _e4m3_encode(y: Tensor) -> Tensor:
    return torch.clamp(y * E4M3_MAX, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def _e4m3_values() -> Tensor:
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.nan_to_num(v, nan=0.0) / E4M3_MAX  # 0x7F and 0xFF (NaN) are never produced


def _e5m3_encode(y: Tensor) -> Tensor:
    a = torch.clamp(y, 0.0, 1.0) * E5M3_MAX
    bits = a.view(torch.int32)
    rounded = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = (rounded >> 20) - (112 << 3)
    sub = torch.round(a * 131072.0).to(torch.int32)  # subnormals: multiples of 2^-17
    return torch.where(a < 2.0**-14, sub, normal).to(torch.uint8)


def _e5m3_values() -> Tensor:
    c = torch.arange(256, dtype=torch.float64)
    e, m = torch.div(c, 8, rounding_mode="floor"), torch.remainder(c, 8)
    v = torch.where(e == 0, m / 8 * 2.0**-14, (1 + m / 8) * torch.pow(2.0, e - 15))
    return (v.float() / E5M3_MAX).float()


FP8_SIGNED = CodeMap("e4m3_signed", True, _e4m3_values(), _e4m3_encode)
FP8_UNSIGNED = CodeMap("e5m3_unsigned", False, _e5m3_values(), _e5m3_encode)

# ------------------------------------------------------------------------------ dynamic tree
class SearchMap(CodeMap):
    """A code map given by its sorted magnitudes, encoded by nearest value with ties toward zero.

    ``magnitudes``: L fp32 values ``0 = c_0 < c_1 < … < c_{L−1} = 1`` (L = 256 unsigned, 128 signed).
    Thresholds ``t_k = fp32((c_k + c_{k+1}) / 2)`` (the sum is exact in float64); the magnitude code of
    ``a = min(|y|, 1)`` is ``#{k : t_k < a}`` (so ``a = t_k`` exactly rounds toward zero). Unsigned:
    the code byte is the magnitude code (negative y clamps to 0). Signed: bit 7 holds the sign of
    ``y < 0`` unless the magnitude code is 0.
    """

    def __init__(self, name: str, signed: bool, magnitudes: Tensor) -> None:
        levels = 128 if signed else 256
        mags = magnitudes.to(torch.float32)
        if mags.shape != (levels,) or mags[0] != 0 or mags[-1] != 1 or not bool((mags[1:] > mags[:-1]).all()):
            raise ValueError(f"{name}: magnitudes must be {levels} increasing fp32 values from 0 to 1")
        self.magnitudes = mags
        self.thresholds = ((mags[1:].double() + mags[:-1].double()) / 2).float()
        values = torch.cat([mags, -mags]) if signed else mags
        if signed:
            values[128] = 0.0  # 0x80, "negative zero", is never produced
        super().__init__(name, signed, values, self._search)
        self._thresholds_on: dict[torch.device, Tensor] = {}

    def _search(self, y: Tensor) -> Tensor:
        if y.device not in self._thresholds_on:
            self._thresholds_on[y.device] = self.thresholds.to(y.device)
        thresholds = self._thresholds_on[y.device]
        if self.signed:
            magnitude = torch.bucketize(torch.clamp(torch.abs(y), max=1.0), thresholds, right=False)
            negative = (y < 0) & (magnitude > 0)
            return (magnitude + 128 * negative).to(torch.uint8)
        return torch.bucketize(torch.clamp(y, 0.0, 1.0), thresholds, right=False).to(torch.uint8)


@dataclass(frozen=True)
class SearchTable:
    """A faster exact form of a :class:`SearchMap`'s search, for kernels: the first guess of the
    magnitude code of ``a`` (0 ≤ a ≤ 1) is ``lut[clamp((bits(a) >> shift) − base, 0, len(lut) − 1)]``,
    and one compare finishes it: ``code = guess + (a > upper[guess])``. ``upper`` is the map's
    thresholds followed by a value above 1 (so the top code never moves up). Exact because every
    cell ``[lo, hi)`` of fp32 values sharing ``bits >> shift`` holds at most one threshold and
    ``lut`` stores the code of each cell's lowest value (:func:`search_table` checks both)."""

    shift: int
    base: int
    lut: Tensor
    upper: Tensor


def search_table(code_map: SearchMap) -> SearchTable:
    """The smallest :class:`SearchTable` (fewest mantissa bits in the cell index) that is exact."""
    thresholds = code_map.thresholds
    top = int(torch.tensor(1.0).view(torch.int32))
    for mantissa_bits in range(24):
        shift = 23 - mantissa_bits
        base = int(thresholds[0].view(torch.int32)) >> shift
        cells = torch.arange(base, (top >> shift) + 2, dtype=torch.int64)
        edges = (cells << shift).to(torch.int32).view(torch.float32)
        codes_at_edges = torch.bucketize(edges, thresholds, right=False)
        if bool((codes_at_edges[1:] - codes_at_edges[:-1] <= 1).all()):
            upper = torch.cat([thresholds, torch.tensor([2.0])])
            return SearchTable(shift, base, codes_at_edges[:-1].to(torch.uint8), upper)
    raise ValueError(f"{code_map.name}: no exact search table")  # unreachable: 23 bits index every float


def nearest_fp32(value: Fraction) -> float:
    """The fp32 number nearest to an exact rational (ties to even), without double rounding."""
    guess = torch.tensor(float(value), dtype=torch.float64).float()
    below = torch.nextafter(guess, torch.tensor(-math.inf))
    above = torch.nextafter(guess, torch.tensor(math.inf))
    candidates = [float(c) for c in (below, guess, above)]

    def key(c: float) -> tuple[Fraction, int]:
        odd = torch.tensor(c, dtype=torch.float32).view(torch.int32).item() & 1
        return abs(Fraction(c) - value), odd

    return min(candidates, key=key)


def dynamic_tree_magnitudes(bits: int) -> Tensor:
    r"""Magnitudes of the dynamic tree (Dettmers et al. 2021, arXiv 2110.02861, §2), derived from the
    paper: after the sign bit, a run of E zero bits sets the decade 10^−E, the first one bit (the
    indicator) ends the run, and the F = bits − 1 − E bits after it split the decade's range linearly.
    Here the 2^F values of decade E are the right ends of 2^F equal steps of (0.1, 1]:

        c(E, j) = 10^−E · (0.1 + 0.9·(j + 1) / 2^F),   E = 0 … bits−1,  j = 0 … 2^F − 1

    so 1 is exact (the block's absmax decodes exactly) and each decade's grid continues the one above
    it (the top of decade E+1 is 0.1·10^−E). All bits zero is 0. ``bits`` = 7 (the magnitude of a
    signed map: 128 values down to 10^−6) or 8 (unsigned: 256 values down to 10^−7). Each value is the
    fp32 number nearest to the exact rational.
    """
    values = [Fraction(0)]
    for e in range(bits):
        f = bits - 1 - e
        for j in range(2**f):
            values.append(Fraction(2**f + 9 * (j + 1), 10 * 2**f) / 10**e)
    return torch.tensor(sorted(nearest_fp32(v) for v in values), dtype=torch.float32)


DYNAMIC_TREE_SIGNED = SearchMap("dynamic_tree_signed", True, dynamic_tree_magnitudes(7))
DYNAMIC_TREE_UNSIGNED = SearchMap("dynamic_tree_unsigned", False, dynamic_tree_magnitudes(8))
DYNAMIC_TREE_SQUARED = SearchMap("dynamic_tree_squared_unsigned", False,
                                 (dynamic_tree_magnitudes(8).double() ** 2).float())

# ---------------------------------------------------------------------------------- mitchell
# The format's maps (fastlars.backends.quantization: mitchell_compand / mitchell_expand spell them out).
MITCHELL_SIGNED = SIGNED_MAP
MITCHELL_UNSIGNED = UNSIGNED_MAP

CANDIDATES: dict[str, tuple[CodeMap, CodeMap]] = {
    "linear": (LINEAR_SIGNED, LINEAR_UNSIGNED),
    "power": (POW4_SIGNED_MAP, POW8_UNSIGNED_MAP),
    "power2": (POWER2_SIGNED, POWER2_UNSIGNED),
    "fp8": (FP8_SIGNED, FP8_UNSIGNED),
    "dynamic_tree": (DYNAMIC_TREE_SIGNED, DYNAMIC_TREE_UNSIGNED),
    "dynamic_tree2": (DYNAMIC_TREE_SIGNED, DYNAMIC_TREE_SQUARED),
    "mitchell": (MITCHELL_SIGNED, MITCHELL_UNSIGNED),
}
"""name → (map of m and LARS momentum, map of v)."""
