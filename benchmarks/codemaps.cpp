// CPU speed of the 8-bit code maps considered for fastlars' low-precision optimizer state
// (benchmarks/codemaps.py builds and runs this; see its docstring). Every map quantises blocks of 256
// fp32 values: absmax of the block (an integer max over |x|'s bit patterns, which vectorises and lets
// a NaN win), y = x · (1/absmax), then a code byte per element; decoding is table[code] · absmax.
//
// The encoders are written the way a kernel would be: scalar element functions in loops gcc
// vectorises (-O3, AVX-512 or AVX2 target), plus explicit AVX-512/AVX2 gather versions of the two
// table searches, which gcc does not vectorise by itself. Tables (values, thresholds, search LUTs)
// come from the Python side in a binary file, so this program holds no copy of any map's definition.
//
// Usage: codemaps <tables.bin> <inputs.bin> <repeats> <codes_out.bin>
// Prints one line per (map, operation): "<map> <op> <best seconds>"; writes every map's codes of the
// test input to codes_out.bin so that the Python side checks them against its own encoders.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "quant_math.h"  // csrc/common: the format's production element functions

namespace {

constexpr int64_t kBlock = fastlars::quant::kBlockSize;
using fastlars::quant::bits_of;
using fastlars::quant::float_of;

// ---------------------------------------------------------------------------------- tables
struct Search {            // nearest-value search over one half (magnitudes) of a map
  std::vector<float> upper;    // upper[k]: threshold between magnitude index k and k + 1
  std::vector<uint8_t> lut;    // first guess per cell of fp32 bits >> shift
  std::vector<int32_t> lut32;  // the same guesses as 32-bit ints (gcc gathers those, not bytes)
  uint32_t shift = 0, base = 0;
  int levels = 0;              // number of entries of upper (magnitudes)
  uint32_t cells = 0;          // LUT entries (lut holds 3 more bytes: 32-bit gathers read past the end)
};

constexpr int kMaps = 13;

struct Tables {
  float values[kMaps][256];     // decode tables of the maps, by map id (see codemaps.py)
  Search dt_signed, dt_unsigned, dt2_unsigned;
};

// Binary file: for each of kMaps maps 256 floats; then 3 searches: int32 levels, shift, base, lut size,
// floats upper[levels], bytes lut[size].
Tables read_tables(const char* path) {
  Tables t{};
  FILE* f = std::fopen(path, "rb");
  if (!f) {
    std::perror(path);
    std::exit(2);
  }
  auto must = [&](size_t got, size_t want) {
    if (got != want) {
      std::fprintf(stderr, "short read in %s\n", path);
      std::exit(2);
    }
  };
  must(std::fread(t.values, sizeof(float), kMaps * 256, f), kMaps * 256);
  for (Search* s : {&t.dt_signed, &t.dt_unsigned, &t.dt2_unsigned}) {
    int32_t head[4];
    must(std::fread(head, 4, 4, f), 4);
    s->levels = head[0];
    s->shift = static_cast<uint32_t>(head[1]);
    s->base = static_cast<uint32_t>(head[2]);
    s->upper.resize(static_cast<size_t>(head[0]));
    s->cells = static_cast<uint32_t>(head[3]);
    s->lut.assign(static_cast<size_t>(head[3]) + 3, 0);
    must(std::fread(s->upper.data(), 4, s->upper.size(), f), s->upper.size());
    must(std::fread(s->lut.data(), 1, s->cells, f), s->cells);
    s->lut32.assign(s->lut.begin(), s->lut.begin() + s->cells);
  }
  std::fclose(f);
  return t;
}

// ------------------------------------------------------------------------------ block driver
inline float block_absmax(const float* __restrict__ x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, bits_of(x[i]) & 0x7FFFFFFFu);
  return float_of(m);
}

// x clamped to [lo, hi] with selects gcc vectorises (std::fmin/fmax are libm calls here).
inline float clampf(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

inline float inverse_scale(float absmax) {
  return absmax >= 1.17549435e-38f && absmax <= 3.40282347e38f ? 1.0f / absmax : 0.0f;
}

template <typename Encode>
void quantize(const float* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales, int64_t n,
              Encode encode) {
  for (int64_t b = 0, start = 0; start < n; ++b, start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const float a = block_absmax(x + start, len);
    const float inv = inverse_scale(a);
    scales[b] = a;
    encode(x + start, q + start, len, inv);
  }
}

void dequantize_table(const uint8_t* __restrict__ q, const float* __restrict__ scales, float* __restrict__ out,
                      int64_t n, const float* __restrict__ table) {
  for (int64_t b = 0, start = 0; start < n; ++b, start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const float a = scales[b];
    const uint8_t* qb = q + start;
    float* ob = out + start;
    for (int64_t i = 0; i < len; ++i) ob[i] = table[qb[i]] * a;
  }
}

// ------------------------------------------------------------------------- arithmetic maps
// linear: code = rint(y·127) (signed, two's complement byte) / rint(y·255) (unsigned)
void encode_linear_signed(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  for (int64_t i = 0; i < n; ++i) {
    const float k = clampf(rintf((x[i] * inv) * 127.0f), -127.0f, 127.0f);
    q[i] = static_cast<uint8_t>(static_cast<int32_t>(k));
  }
}
void encode_linear_unsigned(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  for (int64_t i = 0; i < n; ++i) {
    const float k = clampf(rintf((x[i] * inv) * 255.0f), 0.0f, 255.0f);
    q[i] = static_cast<uint8_t>(static_cast<int32_t>(k));
  }
}
void decode_linear_signed(const uint8_t* __restrict__ q, const float* __restrict__ scales, float* __restrict__ out,
                          int64_t n) {
  for (int64_t b = 0, start = 0; start < n; ++b, start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const float a = scales[b];
    for (int64_t i = 0; i < len; ++i) {
      out[start + i] = (static_cast<float>(static_cast<int8_t>(q[start + i])) / 127.0f) * a;
    }
  }
}

// Companding maps: m: code = sign · min(rint(c(|y|)·127), 127), decoded sign·e(|k|/127); v: code =
// min(rint(c(y)·255), 255), decoded e(k/255), with a compander c and its expander e on the code grid.
// Compand/Expand are functors; the loops below are every companding candidate's encoder and decoder.
template <typename Compand>
void encode_companded_signed(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv,
                             Compand compand) {
  for (int64_t i = 0; i < n; ++i) {
    const float y = x[i] * inv;
    float k = rintf(compand(float_of(bits_of(y) & 0x7FFFFFFFu)) * 127.0f);
    k = k > 127.0f ? 127.0f : k;
    const int32_t s = static_cast<int32_t>(k);
    q[i] = static_cast<uint8_t>(y < 0.0f ? -s : s);
  }
}
template <typename Compand>
void encode_companded_unsigned(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv,
                               Compand compand) {
  for (int64_t i = 0; i < n; ++i) {
    // v ≥ 0 (the sign bit is cleared, mapping −0 to +0) and y ≤ 1 + 1 ulp, whose root rounds to 1; a
    // float clamp before the compander would stop gcc from vectorising the loop
    const float y = float_of(bits_of(x[i] * inv) & 0x7FFFFFFFu);
    float k = rintf(compand(y) * 255.0f);
    k = k > 255.0f ? 255.0f : k;
    q[i] = static_cast<uint8_t>(static_cast<int32_t>(k));
  }
}
// Expand maps the magnitude code min(|k|, 127) (signed) or k (unsigned) to the decoded magnitude.
template <typename Expand>
void decode_companded_signed(const uint8_t* __restrict__ q, const float* __restrict__ scales, float* __restrict__ out,
                             int64_t n, Expand expand) {
  for (int64_t b = 0, start = 0; start < n; ++b, start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const float a = scales[b];
    for (int64_t i = 0; i < len; ++i) {
      const int32_t k = static_cast<int8_t>(q[start + i]);
      const int32_t magnitude = k < 0 ? -k : k;
      const float t = expand(magnitude > 127 ? 127 : magnitude);
      out[start + i] = float_of(bits_of(t) | (static_cast<uint32_t>(k) & 0x80000000u)) * a;
    }
  }
}
template <typename Expand>
void decode_companded_unsigned(const uint8_t* __restrict__ q, const float* __restrict__ scales,
                               float* __restrict__ out, int64_t n, Expand expand) {
  for (int64_t b = 0, start = 0; start < n; ++b, start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const float a = scales[b];
    for (int64_t i = 0; i < len; ++i) out[start + i] = expand(static_cast<int32_t>(q[start + i])) * a;
  }
}

// power, the first release's format: c(y) = √√y (m), √√√y (v); decoded t⁴ / t⁸ with t = k/127 or k/255.
// power2: one square root less (√|y| and √√y; decoded t² and t⁴).
template <int kRoots>
inline float roots(float a) {
  for (int r = 0; r < kRoots; ++r) a = sqrtf(a);
  return a;
}
template <int kSquarings>
inline float squarings(float t) {
  for (int r = 0; r < kSquarings; ++r) t = t * t;
  return t;
}
template <int kRoots>
void encode_power_signed(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  encode_companded_signed(x, q, n, inv, [](float a) { return roots<kRoots>(a); });
}
template <int kRoots>
void encode_power_unsigned(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  encode_companded_unsigned(x, q, n, inv, [](float a) { return roots<kRoots>(a); });
}
template <int kSquarings>
void decode_power_signed(const uint8_t* __restrict__ q, const float* __restrict__ scales, float* __restrict__ out,
                         int64_t n) {
  decode_companded_signed(q, scales, out, n,
                          [](int32_t k) { return squarings<kSquarings>(static_cast<float>(k) / 127.0f); });
}
template <int kSquarings>
void decode_power_unsigned(const uint8_t* __restrict__ q, const float* __restrict__ scales, float* __restrict__ out,
                           int64_t n) {
  decode_companded_unsigned(q, scales, out, n,
                            [](int32_t k) { return squarings<kSquarings>(static_cast<float>(k) / 255.0f); });
}

// mitchell (the format's maps): the power map's roots replaced by Mitchell's logarithm on the fp32 bits,
// through the harness's companding loops with quant_math.h's compander and expander.
using fastlars::quant::mitchell_compand;
using fastlars::quant::mitchell_expand;
void encode_mitchell_signed(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  encode_companded_signed(x, q, n, inv, [](float a) { return mitchell_compand<2>(a); });
}
void encode_mitchell_unsigned(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  encode_companded_unsigned(x, q, n, inv, [](float a) { return mitchell_compand<3>(a); });
}
void decode_mitchell_signed(const uint8_t* __restrict__ q, const float* __restrict__ scales, float* __restrict__ out,
                            int64_t n) {
  decode_companded_signed(q, scales, out, n, [](int32_t k) {
    return mitchell_expand<2>(static_cast<float>(k) * fastlars::quant::kInv127);
  });
}
void decode_mitchell_unsigned(const uint8_t* __restrict__ q, const float* __restrict__ scales,
                              float* __restrict__ out, int64_t n) {
  decode_companded_unsigned(q, scales, out, n, [](int32_t k) {
    return mitchell_expand<3>(static_cast<float>(k) * fastlars::quant::kInv255);
  });
}

// The production element functions of csrc/common/quant_math.h (the format's choice, "mitchell"), and
// its stochastic rounding of fp32 to bf16 with the counter-based RNG (per element: two mix32 and the
// rounding).
void encode_header_signed(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  for (int64_t i = 0; i < n; ++i) q[i] = fastlars::quant::quantize_signed(x[i], inv);
}
void encode_header_unsigned(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  for (int64_t i = 0; i < n; ++i) q[i] = fastlars::quant::quantize_unsigned(x[i], inv);
}
void decode_header_signed(const uint8_t* __restrict__ q, const float* __restrict__ scales, float* __restrict__ out,
                          int64_t n) {
  for (int64_t b = 0, start = 0; start < n; ++b, start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const float a = scales[b];
    for (int64_t i = 0; i < len; ++i) out[start + i] = fastlars::quant::dequantize_signed(q[start + i], a);
  }
}
void decode_header_unsigned(const uint8_t* __restrict__ q, const float* __restrict__ scales, float* __restrict__ out,
                            int64_t n) {
  for (int64_t b = 0, start = 0; start < n; ++b, start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const float a = scales[b];
    for (int64_t i = 0; i < len; ++i) out[start + i] = fastlars::quant::dequantize_unsigned(q[start + i], a);
  }
}
__attribute__((noinline)) void stochastic_round_loop(const float* __restrict__ x, uint16_t* __restrict__ w,
                                                     int64_t n, uint32_t key) {
  const uint32_t index_key = fastlars::quant::sr_index_key(key, 0);
  for (int64_t i = 0; i < n; ++i) {
    w[i] = fastlars::quant::stochastic_round_bf16(x[i], fastlars::quant::sr_bits(index_key, static_cast<uint64_t>(i)));
  }
}

// fp8: e4m3fn (OCP, saturating, round to nearest even) of y·448 for m; for v an unsigned e5m3 (bias
// 15, no sign, no inf/NaN; top code 0xFF = 1.875·2^16, scaled to 1) of y. Normal range: round the
// fp32 mantissa to 3 bits (add 0x7FFFF + the kept lsb) and rebias; subnormal range: adding 2^14
// (e4m3) / 2^6 (e5m3 at ×122880) rounds to the subnormal step in the fp32 adder. gcc does not
// vectorise these loops (it reports control flow), so AVX-512 and AVX2 versions follow.
inline uint32_t e4m3_magnitude(uint32_t ua) {  // ua: bits of |y·448| ≤ 448
  if (ua < 0x3C800000u) return bits_of(float_of(ua) + 16384.0f) - 0x46800000u;  // < 2^-6
  return ((ua + 0x7FFFFu + ((ua >> 20) & 1u)) >> 20) - (120u << 3);
}
void encode_fp8_signed(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = bits_of((x[i] * inv) * 448.0f);
    const float a = float_of(u & 0x7FFFFFFFu);
    q[i] = static_cast<uint8_t>(e4m3_magnitude(bits_of(a > 448.0f ? 448.0f : a)) | ((u >> 24) & 0x80u));
  }
}
inline uint32_t e5m3_code(float y) {
  const uint32_t ua = bits_of(clampf(y, 0.0f, 1.0f) * 122880.0f);
  if (ua < 0x38800000u) return bits_of(float_of(ua) + 64.0f) - 0x42800000u;  // < 2^-14
  return ((ua + 0x7FFFFu + ((ua >> 20) & 1u)) >> 20) - (112u << 3);
}
void encode_fp8_unsigned(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<uint8_t>(e5m3_code(x[i] * inv));
}

#if defined(__AVX512F__)
inline __m512i rebias_mantissa3(__m512i ua, int rebias) {
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(ua, 20), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(ua, _mm512_set1_epi32(0x7FFFF)), lsb);
  return _mm512_sub_epi32(_mm512_srli_epi32(r, 20), _mm512_set1_epi32(rebias << 3));
}
void encode_fp8_signed_avx512(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  const __m512 vinv = _mm512_set1_ps(inv), k448 = _mm512_set1_ps(448.0f), magic = _mm512_set1_ps(16384.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv), k448));
    const __m512 a = _mm512_min_ps(_mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF))), k448);
    const __m512i ua = _mm512_castps_si512(a);
    const __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(a, magic)), _mm512_set1_epi32(0x46800000));
    const __mmask16 small = _mm512_cmplt_epi32_mask(ua, _mm512_set1_epi32(0x3C800000));
    __m512i code = _mm512_mask_blend_epi32(small, rebias_mantissa3(ua, 120), sub);
    code = _mm512_or_si512(code, _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(code));
  }
  encode_fp8_signed(x + i, q + i, n - i, inv);
}
void encode_fp8_unsigned_avx512(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  const __m512 vinv = _mm512_set1_ps(inv), zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 top = _mm512_set1_ps(122880.0f), magic = _mm512_set1_ps(64.0f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv), zero), one);
    const __m512 a = _mm512_mul_ps(y, top);
    const __m512i ua = _mm512_castps_si512(a);
    const __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(a, magic)), _mm512_set1_epi32(0x42800000));
    const __mmask16 small = _mm512_cmplt_epi32_mask(ua, _mm512_set1_epi32(0x38800000));
    const __m512i code = _mm512_mask_blend_epi32(small, rebias_mantissa3(ua, 112), sub);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(code));
  }
  encode_fp8_unsigned(x + i, q + i, n - i, inv);
}
#endif

#if defined(__AVX2__)
// 8 int32 lanes → 8 bytes at q (values already in 0…255)
inline void store8_bytes(uint8_t* q, __m256i v) {
  const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
  const __m128i w = _mm_packus_epi32(lo, hi);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packus_epi16(w, w));
}
inline __m256i rebias_mantissa3_avx2(__m256i ua, int rebias) {
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(ua, 20), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(ua, _mm256_set1_epi32(0x7FFFF)), lsb);
  return _mm256_sub_epi32(_mm256_srli_epi32(r, 20), _mm256_set1_epi32(rebias << 3));
}
[[maybe_unused]] void encode_fp8_signed_avx2(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv) {
  const __m256 vinv = _mm256_set1_ps(inv), k448 = _mm256_set1_ps(448.0f), magic = _mm256_set1_ps(16384.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_castps_si256(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), k448));
    const __m256 a = _mm256_min_ps(_mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF))), k448);
    const __m256i ua = _mm256_castps_si256(a);
    const __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(a, magic)), _mm256_set1_epi32(0x46800000));
    const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C800000), ua);
    __m256i code = _mm256_blendv_epi8(rebias_mantissa3_avx2(ua, 120), sub, small);
    code = _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80)));
    store8_bytes(q + i, code);
  }
  encode_fp8_signed(x + i, q + i, n - i, inv);
}
#endif

// ----------------------------------------------------------------------- table-search maps
// Scalar: the LUT gives the nearest code of the lowest value of the cell holding |y|, one compare
// with the threshold above it finishes the search (search_table guarantees ≤ 1 threshold per cell).
// Written with 32-bit LUT entries and integer clamps, so gcc vectorises the loops with gathers.
inline int32_t search_code(float a, const int32_t* __restrict__ lut, const float* __restrict__ up, int32_t shift,
                           int32_t base, int32_t top) {
  int32_t c = static_cast<int32_t>(bits_of(a) >> shift) - base;
  c = c < 0 ? 0 : c;
  c = c > top ? top : c;
  const int32_t k = lut[c];
  return k + (a > up[k] ? 1 : 0);
}
__attribute__((noinline)) void search_signed_loop(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n,
                                                  float inv, const int32_t* __restrict__ lut,
                                                  const float* __restrict__ up, int32_t shift, int32_t base,
                                                  int32_t top) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = bits_of(x[i] * inv);
    const float a = float_of(u & 0x7FFFFFFFu);
    const int32_t k = search_code(a > 1.0f ? 1.0f : a, lut, up, shift, base, top);
    const int32_t sign = k != 0 ? static_cast<int32_t>((u >> 24) & 0x80u) : 0;
    q[i] = static_cast<uint8_t>(k | sign);
  }
}
__attribute__((noinline)) void search_unsigned_loop(const float* __restrict__ x, uint8_t* __restrict__ q,
                                                    int64_t n, float inv, const int32_t* __restrict__ lut,
                                                    const float* __restrict__ up, int32_t shift, int32_t base,
                                                    int32_t top) {
  for (int64_t i = 0; i < n; ++i) {
    q[i] = static_cast<uint8_t>(search_code(clampf(x[i] * inv, 0.0f, 1.0f), lut, up, shift, base, top));
  }
}
void encode_search_signed(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv,
                          const Search& s) {
  search_signed_loop(x, q, n, inv, s.lut32.data(), s.upper.data(), static_cast<int32_t>(s.shift),
                     static_cast<int32_t>(s.base), static_cast<int32_t>(s.cells) - 1);
}
void encode_search_unsigned(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv,
                            const Search& s) {
  search_unsigned_loop(x, q, n, inv, s.lut32.data(), s.upper.data(), static_cast<int32_t>(s.shift),
                       static_cast<int32_t>(s.base), static_cast<int32_t>(s.cells) - 1);
}

// Binary search over the thresholds, branchless (8 or 7 dependent steps).
void encode_bsearch_unsigned(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv,
                             const Search& s) {
  const float* up = s.upper.data();
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fmin(std::fmax(x[i] * inv, 0.0f), 1.0f);
    uint32_t k = 0;
    for (uint32_t step = 128; step >= 1; step >>= 1) {
      if (k + step - 1 < static_cast<uint32_t>(s.levels - 1)) k += (a > up[k + step - 1]) ? step : 0u;
    }
    q[i] = static_cast<uint8_t>(k);
  }
}

#if defined(__AVX512F__)
// 16 lanes: LUT gather (bytes through 32-bit gathers), one threshold gather, compare, add.
void encode_search_unsigned_avx512(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv,
                                   const Search& s) {
  const __m512 vinv = _mm512_set1_ps(inv), zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512i base = _mm512_set1_epi32(static_cast<int>(s.base));
  const __m512i top = _mm512_set1_epi32(static_cast<int>(s.cells - 1));
  const int* lut = reinterpret_cast<const int*>(s.lut.data());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 a = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv), zero), one);
    __m512i cell = _mm512_srli_epi32(_mm512_castps_si512(a), static_cast<int>(s.shift));
    cell = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(cell, base), _mm512_setzero_si512()), top);
    // byte LUT: gather the 32-bit word holding the byte, then pick it (LUT padded by 3 bytes)
    __m512i k = _mm512_and_si512(_mm512_i32gather_epi32(cell, lut, 1), _mm512_set1_epi32(0xFF));
    const __m512 up = _mm512_i32gather_ps(k, s.upper.data(), 4);
    const __mmask16 above = _mm512_cmp_ps_mask(a, up, _CMP_GT_OQ);
    k = _mm512_mask_add_epi32(k, above, k, _mm512_set1_epi32(1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(k));
  }
  encode_search_unsigned(x + i, q + i, n - i, inv, s);
}
void encode_search_signed_avx512(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv,
                                 const Search& s) {
  const __m512 vinv = _mm512_set1_ps(inv), one = _mm512_set1_ps(1.0f);
  const __m512i base = _mm512_set1_epi32(static_cast<int>(s.base));
  const __m512i top = _mm512_set1_epi32(static_cast<int>(s.cells - 1));
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  const int* lut = reinterpret_cast<const int*>(s.lut.data());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
    const __m512 a = _mm512_min_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(y), absmask)), one);
    __m512i cell = _mm512_srli_epi32(_mm512_castps_si512(a), static_cast<int>(s.shift));
    cell = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(cell, base), _mm512_setzero_si512()), top);
    __m512i k = _mm512_and_si512(_mm512_i32gather_epi32(cell, lut, 1), _mm512_set1_epi32(0xFF));
    const __m512 up = _mm512_i32gather_ps(k, s.upper.data(), 4);
    k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(a, up, _CMP_GT_OQ), k, _mm512_set1_epi32(1));
    const __mmask16 neg = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ) &
                          _mm512_cmp_epi32_mask(k, _mm512_setzero_si512(), _MM_CMPINT_NE);
    k = _mm512_mask_or_epi32(k, neg, k, _mm512_set1_epi32(0x80));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(k));
  }
  encode_search_signed(x + i, q + i, n - i, inv, s);
}
#endif

#if defined(__AVX2__)
[[maybe_unused]] void encode_search_unsigned_avx2(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv,
                                 const Search& s) {
  const __m256 vinv = _mm256_set1_ps(inv), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256i base = _mm256_set1_epi32(static_cast<int>(s.base));
  const __m256i top = _mm256_set1_epi32(static_cast<int>(s.cells - 1));
  const int* lut = reinterpret_cast<const int*>(s.lut.data());
  int64_t i = 0;
  alignas(32) int32_t lanes[8];
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), zero), one);
    __m256i cell = _mm256_srli_epi32(_mm256_castps_si256(a), static_cast<int>(s.shift));
    cell = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(cell, base), _mm256_setzero_si256()), top);
    __m256i k = _mm256_and_si256(_mm256_i32gather_epi32(lut, cell, 1), _mm256_set1_epi32(0xFF));
    const __m256 up = _mm256_i32gather_ps(s.upper.data(), k, 4);
    k = _mm256_sub_epi32(k, _mm256_castps_si256(_mm256_cmp_ps(a, up, _CMP_GT_OQ)));  // true = −1
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), k);
    for (int j = 0; j < 8; ++j) q[i + j] = static_cast<uint8_t>(lanes[j]);
  }
  encode_search_unsigned(x + i, q + i, n - i, inv, s);
}
#endif

// ------------------------------------------------------------------------------ harness
template <typename F>
double best_of(int repeats, F f) {
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s tables.bin inputs.bin repeats codes_out.bin\n", argv[0]);
    return 2;
  }
  const Tables t = read_tables(argv[1]);
  // inputs.bin: int64 n, then n floats of m-like values and n floats of v-like values
  FILE* in = std::fopen(argv[2], "rb");
  int64_t n = 0;
  if (in == nullptr || std::fread(&n, 8, 1, in) != 1 || n <= 0) {
    std::fprintf(stderr, "cannot read %s\n", argv[2]);
    return 2;
  }
  std::vector<float> m(static_cast<size_t>(n)), v(static_cast<size_t>(n)), out(static_cast<size_t>(n));
  if (std::fread(m.data(), 4, m.size(), in) != m.size() || std::fread(v.data(), 4, v.size(), in) != v.size()) {
    std::fprintf(stderr, "short read in %s\n", argv[2]);
    return 2;
  }
  std::fclose(in);
  const int repeats = std::atoi(argv[3]);
  std::vector<uint8_t> q(static_cast<size_t>(n));
  std::vector<float> scales(static_cast<size_t>((n + kBlock - 1) / kBlock));
  FILE* codes_out = std::fopen(argv[4], "wb");

  struct Case {
    const char* name;
    const std::vector<float>* input;
    int table;
    void (*encode_fn)(const float*, uint8_t*, int64_t, float);
    void (*encode_search)(const float*, uint8_t*, int64_t, float, const Search&);
    const Search* search;
    void (*decode_fn)(const uint8_t*, const float*, float*, int64_t);
  };
  const Case cases[] = {
      {"linear.m", &m, 0, encode_linear_signed, nullptr, nullptr, decode_linear_signed},
      {"linear.v", &v, 1, encode_linear_unsigned, nullptr, nullptr, nullptr},
      {"power.m", &m, 2, encode_power_signed<2>, nullptr, nullptr, decode_power_signed<2>},
      {"power.v", &v, 3, encode_power_unsigned<3>, nullptr, nullptr, decode_power_unsigned<3>},
      {"power2.m", &m, 9, encode_power_signed<1>, nullptr, nullptr, decode_power_signed<1>},
      {"power2.v", &v, 10, encode_power_unsigned<2>, nullptr, nullptr, decode_power_unsigned<2>},
      {"mitchell.m", &m, 11, encode_mitchell_signed, nullptr, nullptr, decode_mitchell_signed},
      {"mitchell.v", &v, 12, encode_mitchell_unsigned, nullptr, nullptr, decode_mitchell_unsigned},
      {"mitchell.m:header", &m, 11, encode_header_signed, nullptr, nullptr, decode_header_signed},
      {"mitchell.v:header", &v, 12, encode_header_unsigned, nullptr, nullptr, decode_header_unsigned},
      {"fp8.m", &m, 4, encode_fp8_signed, nullptr, nullptr, nullptr},
      {"fp8.v", &v, 5, encode_fp8_unsigned, nullptr, nullptr, nullptr},
      {"dynamic_tree.m", &m, 6, nullptr, encode_search_signed, &t.dt_signed, nullptr},
      {"dynamic_tree.v", &v, 7, nullptr, encode_search_unsigned, &t.dt_unsigned, nullptr},
      {"dynamic_tree2.v", &v, 8, nullptr, encode_search_unsigned, &t.dt2_unsigned, nullptr},
      {"dynamic_tree.v:bsearch", &v, 7, nullptr, encode_bsearch_unsigned, &t.dt_unsigned, nullptr},
#if defined(__AVX512F__)
      {"fp8.m:intrinsics", &m, 4, encode_fp8_signed_avx512, nullptr, nullptr, nullptr},
      {"fp8.v:intrinsics", &v, 5, encode_fp8_unsigned_avx512, nullptr, nullptr, nullptr},
      {"dynamic_tree.m:gather", &m, 6, nullptr, encode_search_signed_avx512, &t.dt_signed, nullptr},
      {"dynamic_tree.v:gather", &v, 7, nullptr, encode_search_unsigned_avx512, &t.dt_unsigned, nullptr},
#elif defined(__AVX2__)
      {"fp8.m:intrinsics", &m, 4, encode_fp8_signed_avx2, nullptr, nullptr, nullptr},
      {"dynamic_tree.v:gather", &v, 7, nullptr, encode_search_unsigned_avx2, &t.dt_unsigned, nullptr},
#endif
  };
  for (const Case& c : cases) {
    const float* x = c.input->data();
    double enc;
    if (c.encode_fn != nullptr) {
      enc = best_of(repeats, [&] { quantize(x, q.data(), scales.data(), n, c.encode_fn); });
    } else {
      auto fn = c.encode_search;
      const Search& s = *c.search;
      enc = best_of(repeats, [&] {
        quantize(x, q.data(), scales.data(), n, [&](const float* xb, uint8_t* qb, int64_t len, float inv) {
          fn(xb, qb, len, inv, s);
        });
      });
    }
    std::printf("%s encode %.9f\n", c.name, enc);
    std::fwrite(q.data(), 1, q.size(), codes_out);
    {
      const float* tab = t.values[c.table];
      const double dec = best_of(repeats, [&] { dequantize_table(q.data(), scales.data(), out.data(), n, tab); });
      std::printf("%s decode:table %.9f\n", c.name, dec);
    }
    if (c.decode_fn != nullptr) {
      const double dec = best_of(repeats, [&] { c.decode_fn(q.data(), scales.data(), out.data(), n); });
      std::printf("%s decode:arith %.9f\n", c.name, dec);
    }
  }
  {
    std::vector<uint16_t> w(static_cast<size_t>(n));
    const uint32_t key = fastlars::quant::sr_key(fastlars::quant::sr_tensor_key(1234u, 7u, 0u), 5.0f);
    const double sr = best_of(repeats, [&] { stochastic_round_loop(m.data(), w.data(), n, key); });
    std::printf("stochastic_round.bf16:header encode %.9f\n", sr);
  }
  // memory-speed reference: read n floats, write n bytes (a quantiser's compulsory traffic)
  const double copy = best_of(repeats, [&] {
    for (int64_t i = 0; i < n; ++i) q[static_cast<size_t>(i)] = static_cast<uint8_t>(bits_of(m[static_cast<size_t>(i)]) >> 24);
  });
  std::printf("stream encode %.9f\n", copy);
  std::fclose(codes_out);
  return 0;
}
