// Host driver of csrc/common/quant_math.h for tests/test_quant_math.py, which generates the inputs,
// runs this program and compares every output bit for bit with fastlars/backends/quantization.py.
// Build: c++ -std=c++17 -O2 -ffp-contract=off -fno-math-errno -I csrc/common quant_math_test.cpp
// Usage: quant_math_test <inputs.bin> <outputs.bin>
//
// inputs.bin (little endian), section by section:
//   int64 n; float y[n]                                       normalised values to encode
//   int64 n; float x[n]                                       one row of raw values to quantise by blocks
//   int64 n; n × {uint32 seed, tensor, stream; float step; uint64 index}   RNG queries
//   int64 n; n × {float x; uint32 r}                           stochastic-rounding queries
// outputs.bin, in the same order:
//   uint8 encode_signed[n], encode_unsigned[n]; float decode_signed[256], decode_unsigned[256];
//   uint8 codes_signed[n]; float scales_signed[blocks]; float dequantized_signed[n]; the same unsigned;
//   uint32 bits[n]; uint16 bf16[n]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "quant_math.h"

namespace q = fastlars::quant;

namespace {

FILE* in_file = nullptr;
FILE* out_file = nullptr;

template <typename T>
std::vector<T> read_array() {
  int64_t n = 0;
  if (std::fread(&n, sizeof(n), 1, in_file) != 1 || n < 0) {
    std::fprintf(stderr, "quant_math_test: bad section header\n");
    std::exit(2);
  }
  std::vector<T> v(static_cast<size_t>(n));
  if (n > 0 && std::fread(v.data(), sizeof(T), v.size(), in_file) != v.size()) {
    std::fprintf(stderr, "quant_math_test: short section\n");
    std::exit(2);
  }
  return v;
}

template <typename T>
void write_array(const std::vector<T>& v) {
  if (!v.empty() && std::fwrite(v.data(), sizeof(T), v.size(), out_file) != v.size()) {
    std::fprintf(stderr, "quant_math_test: write failed\n");
    std::exit(2);
  }
}

// One row quantised the way a kernel does it: per block of kBlockSize, the absmax bits, the scales,
// the codes; then decoded back.
template <bool kSigned>
void quantize_row(const std::vector<float>& x) {
  const size_t n = x.size();
  const size_t blocks = (n + q::kBlockSize - 1) / q::kBlockSize;
  std::vector<uint8_t> codes(n);
  std::vector<float> scales(blocks), decoded(n);
  for (size_t b = 0; b < blocks; ++b) {
    const size_t begin = b * q::kBlockSize;
    const size_t end = begin + q::kBlockSize < n ? begin + q::kBlockSize : n;
    uint32_t absmax_bits = 0;
    for (size_t i = begin; i < end; ++i) {
      const uint32_t m = q::magnitude_bits(x[i]);
      absmax_bits = m > absmax_bits ? m : absmax_bits;
    }
    const float inv = q::inverse_scale(absmax_bits);
    scales[b] = q::stored_scale(absmax_bits);
    for (size_t i = begin; i < end; ++i) {
      codes[i] = kSigned ? q::quantize_signed(x[i], inv) : q::quantize_unsigned(x[i], inv);
      decoded[i] = kSigned ? q::dequantize_signed(codes[i], scales[b]) : q::dequantize_unsigned(codes[i], scales[b]);
    }
  }
  write_array(codes);
  write_array(scales);
  write_array(decoded);
}

struct RngQuery {
  uint32_t seed, tensor, stream;
  float step;
  uint64_t index;
};
static_assert(sizeof(RngQuery) == 24, "RngQuery must be packed as the Python side writes it");

struct SrQuery {
  float x;
  uint32_t r;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s inputs.bin outputs.bin\n", argv[0]);
    return 2;
  }
  in_file = std::fopen(argv[1], "rb");
  out_file = std::fopen(argv[2], "wb");
  if (in_file == nullptr || out_file == nullptr) {
    std::perror("quant_math_test");
    return 2;
  }

  const std::vector<float> y = read_array<float>();
  std::vector<uint8_t> enc_s(y.size()), enc_u(y.size());
  for (size_t i = 0; i < y.size(); ++i) {
    enc_s[i] = q::encode_signed(y[i]);
    enc_u[i] = q::encode_unsigned(y[i]);
  }
  write_array(enc_s);
  write_array(enc_u);
  std::vector<float> dec_s(256), dec_u(256);
  for (int c = 0; c < 256; ++c) {
    dec_s[c] = q::decode_signed(static_cast<uint8_t>(c));
    dec_u[c] = q::decode_unsigned(static_cast<uint8_t>(c));
  }
  write_array(dec_s);
  write_array(dec_u);

  const std::vector<float> row = read_array<float>();
  quantize_row<true>(row);
  quantize_row<false>(row);

  const std::vector<RngQuery> rng = read_array<RngQuery>();
  std::vector<uint32_t> bits(rng.size());
  for (size_t i = 0; i < rng.size(); ++i) {
    const RngQuery& r = rng[i];
    const uint32_t key = q::sr_key(q::sr_tensor_key(r.seed, r.tensor, r.stream), r.step);
    bits[i] = q::sr_bits(q::sr_index_key(key, r.index), r.index);
  }
  write_array(bits);

  const std::vector<SrQuery> sr = read_array<SrQuery>();
  std::vector<uint16_t> rounded(sr.size());
  for (size_t i = 0; i < sr.size(); ++i) rounded[i] = q::stochastic_round_bf16(sr[i].x, sr[i].r);
  write_array(rounded);

  std::fclose(in_file);
  return std::fclose(out_file) == 0 ? 0 : 1;
}
