// Per-element arithmetic of fastlars' low-precision optimizer state, shared by the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda) the way step_math.h is: the int8 code maps, the block
// scale rules, the counter-based RNG of stochastic rounding and fp32 → bf16 stochastic rounding.
// The spec is fastlars/backends/quantization.py; every function here returns the same bits as its
// Python counterpart (csrc/common/test/quant_math_test.cpp + tests/test_quant_math.py check that on
// generated inputs: ties, zeros, subnormals, ±max, every code).
//
// Exactness needs IEEE fp32 division (one per block) and rint (round half to even): the host default,
// and nvcc's default (-prec-div=true; never -use_fast_math for these files). No
// fused multiply-adds are formed (the host builds with -ffp-contract=off, nvcc with -fmad=false); the
// functions below have no a·b + c pattern anyway. Subnormals must not be flushed (no -ftz=true, no
// FTZ/DAZ): 1/absmax is subnormal when absmax > 2^126, and a block may hold subnormal elements.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#ifndef FASTLARS_HD
#if defined(__CUDACC__)
#define FASTLARS_HD __host__ __device__ __forceinline__
#else
#define FASTLARS_HD inline
#endif
#endif

namespace fastlars::quant {

constexpr int kFormatVersion = 1;      // quantization.FORMAT_VERSION
constexpr int kBlockSize = 256;        // elements per block along a row (the last one of a row may be shorter)
constexpr uint32_t kSmallestNormalBits = 0x00800000u;  // 2^-126: smaller (or zero) block absmax → block of zeros
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kStreamParam = 0;   // RNG stream of bf16 weights without fp32 masters

FASTLARS_HD uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

FASTLARS_HD float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// ------------------------------------------------------------------------------ block scale
// A block's absmax is the max of its elements' sign-cleared bit patterns: an integer max, so it is
// order-independent (any reduction tree gives the same result) and a NaN (> inf > every finite
// value) wins. Accumulate with absmax_bits = max(absmax_bits, magnitude_bits(x)), starting at 0.
FASTLARS_HD uint32_t magnitude_bits(float x) { return bits_of(x) & 0x7FFFFFFFu; }

// Multiplier normalising the block: 1/absmax (one IEEE division per block) when absmax is a normal
// finite number, else 0 (the block's codes are then all 0).
FASTLARS_HD float inverse_scale(uint32_t absmax_bits) {
  if (absmax_bits < kSmallestNormalBits || absmax_bits >= kInfBits) return 0.0f;
  return 1.0f / float_of(absmax_bits);
}

// The scale written for the block: absmax; 0 for a flushed (subnormal or zero) block; NaN for a
// non-finite one (the block then decodes to NaN: visible, never silently finite).
FASTLARS_HD float stored_scale(uint32_t absmax_bits) {
  if (absmax_bits >= kInfBits) return float_of(0x7FC00000u);
  return absmax_bits < kSmallestNormalBits ? 0.0f : float_of(absmax_bits);
}

// --------------------------------------------------------------------------------- code maps
// Mitchell companding: c_s(a) = float_of((bits(a) >> s) + K_s) ≈ a^(1/2^s) for a ≥ 0 (exact at 1), and
// its inverse on the code grid e_s(t) = float_of((bits(t) − K_s) << s), K_s = bits(1) − (bits(1) >> s).
// Integer shifts and adds only: no square root, division or table, so every backend gets the same bits.
constexpr uint32_t kBitsOfOne = 0x3F800000u;
template <int kShift>
constexpr uint32_t kMitchellOffset = kBitsOfOne - (kBitsOfOne >> kShift);
constexpr float kInv127 = 1.0f / 127.0f;  // fl(1/127), as quantization._INV_127
constexpr float kInv255 = 1.0f / 255.0f;

template <int kShift>
FASTLARS_HD float mitchell_compand(float a) { return float_of((bits_of(a) >> kShift) + kMitchellOffset<kShift>); }

template <int kShift>
FASTLARS_HD float mitchell_expand(float t) {  // t = 0 → 0
  const float e = float_of((bits_of(t) - kMitchellOffset<kShift>) << kShift);
  return t > 0.0f ? e : 0.0f;
}

// m and LARS momentum ("mitchell4_signed"): the code byte is the int8 k = sign(y)·min(rint(c_2(|y|)·127), 127);
// it decodes to sign(k)·e_2(min(|k|, 127)·fl(1/127)). y is x·inverse_scale (|y| ≤ 1 + 1 ulp).
FASTLARS_HD uint8_t encode_signed(float y) {
  const float a = float_of(bits_of(y) & 0x7FFFFFFFu);
  float k = rintf(mitchell_compand<2>(a) * 127.0f);
  k = k > 127.0f ? 127.0f : k;
  const int32_t magnitude = static_cast<int32_t>(k);
  return static_cast<uint8_t>(y < 0.0f ? -magnitude : magnitude);
}

FASTLARS_HD float decode_signed(uint8_t code) {
  const int32_t k = static_cast<int8_t>(code);
  const int32_t magnitude = k < 0 ? -k : k;
  const float t = mitchell_expand<2>(static_cast<float>(magnitude > 127 ? 127 : magnitude) * kInv127);  // 0x80 → −1
  return float_of(bits_of(t) | (static_cast<uint32_t>(k) & 0x80000000u));  // the sign of k
}

// v ("mitchell8_unsigned"): the code byte is k = min(rint(c_3(|y|)·255), 255); it decodes to e_3(k·fl(1/255)).
FASTLARS_HD uint8_t encode_unsigned(float y) {
  const float a = float_of(bits_of(y) & 0x7FFFFFFFu);
  float k = rintf(mitchell_compand<3>(a) * 255.0f);
  k = k > 255.0f ? 255.0f : k;
  return static_cast<uint8_t>(static_cast<int32_t>(k));
}

FASTLARS_HD float decode_unsigned(uint8_t code) { return mitchell_expand<3>(static_cast<float>(code) * kInv255); }

// An element of a block: its code given the block's inverse scale (0 codes the whole block as 0), and
// its value given the block's stored scale.
FASTLARS_HD uint8_t quantize_signed(float x, float inv_scale) {
  return inv_scale > 0.0f ? encode_signed(x * inv_scale) : static_cast<uint8_t>(0);
}
FASTLARS_HD uint8_t quantize_unsigned(float x, float inv_scale) {
  return inv_scale > 0.0f ? encode_unsigned(x * inv_scale) : static_cast<uint8_t>(0);
}
FASTLARS_HD float dequantize_signed(uint8_t code, float scale) { return decode_signed(code) * scale; }
FASTLARS_HD float dequantize_unsigned(uint8_t code, float scale) { return decode_unsigned(code) * scale; }

// --------------------------------------------------------------------------- RNG and rounding
// MurmurHash3's 32-bit finaliser: a bijection of 32-bit words with full avalanche.
FASTLARS_HD uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Host part of the key: mix(mix(mix(seed ^ kGolden) ^ tensor) ^ stream).
FASTLARS_HD uint32_t sr_tensor_key(uint32_t seed, uint32_t tensor, uint32_t stream) {
  return mix32(mix32(mix32(seed ^ kGolden) ^ tensor) ^ stream);
}

// Key of one update: mix(tensor_key ^ t), t the step count (a whole number read as fp32 on the device).
FASTLARS_HD uint32_t sr_key(uint32_t tensor_key, float step) {
  return mix32(tensor_key ^ static_cast<uint32_t>(step));
}

// mix(key ^ hi32(i)): constant over 2^32 consecutive elements, so a kernel computes it once per block.
FASTLARS_HD uint32_t sr_index_key(uint32_t key, uint64_t index) {
  return mix32(key ^ static_cast<uint32_t>(index >> 32));
}

// 32 random bits of element index i (in the whole tensor, storage order): mix(index_key ^ lo32(i)·kGolden).
FASTLARS_HD uint32_t sr_bits(uint32_t index_key, uint64_t index) {
  return mix32(index_key ^ (static_cast<uint32_t>(index) * kGolden));
}

// fp32 → bf16 bits by stochastic rounding with random bits r: (bits(x) + (r >> 16)) >> 16, so |x|
// rounds up with probability (x's low 16 bits)/2^16 (unbiased); NaN becomes 0x7FC0.
FASTLARS_HD uint16_t stochastic_round_bf16(float x, uint32_t r) {
  const uint32_t u = bits_of(x);
  const uint32_t rounded = (u + (r >> 16)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > kInfBits ? 0x7FC0u : rounded);
}

// The fp32 value of a bf16 bit pattern (exact).
FASTLARS_HD float bf16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

// fp32 → bf16 bits rounded to nearest even, NaN to 0x7FC0: torch's conversion (c10::BFloat16(float),
// Tensor.to(torch.bfloat16) on the CPU), in integer operations that vectorise.
FASTLARS_HD uint16_t round_bf16(float x) {
  const uint32_t u = bits_of(x);
  return x != x ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
}

}  // namespace fastlars::quant
