// The interface between the host glue of the low-precision-state ops (lowbit_ops.cpp) and their kernels
// (lowbit.cu): the kernel-argument table, the block-aligned chunk geometry and the launch functions. Plain
// structs and raw pointers, like launch.h, so lowbit.cu compiles without torch headers.
//
// Chunks start at block boundaries (format: fastlars/backends/quantization.py, blocks of 256 along the
// rows of a tensor, the last block of a row possibly shorter; a row is numel / size(0) elements of memory
// order): a row of R >= kChunk elements is cut into chunks of kChunk (a whole number of blocks), shorter
// rows are taken floor(kChunk / R) rows at a time, as the CPU kernels cut them (csrc/cpu/lowbit_ops.cpp).
// Every tensor of a call is cut this way whatever its state format, so one launch walks mixed lists.
#pragma once

#include <cstdint>

#include "launch.h"

namespace fastlars::cuda {

constexpr int64_t kQuantBlock = 256;  // quant::kBlockSize (quant_math.h), elements per block
static_assert(kChunk % kQuantBlock == 0, "chunks along a row must end on block boundaries");

// How one state buffer of a tensor is stored: full values of a floating dtype, or int8 codes with fp32
// block scales.
enum class StateFormat : uint8_t { kFloat = 0, kBFloat16 = 1, kHalf = 2, kInt8 = 3 };

// Lists: 0 param, 1 grad, 2 fp32 master (null without one), then per state buffer b its values (3 + 2b)
// and block scales (4 + 2b, null unless int8). LAMB has two buffers (m, v), LARS one (momentum).
constexpr int kLowbitLists = 7;

struct LowbitTable {
  static constexpr int kSlotBytes = kLowbitLists * 8 + 8 + 8 + 8 + 4 + 4 + 3;
  static constexpr int kCapacity = (kParamBytes - kArgsReserve - 16) / kSlotBytes;
  void* ptr[kLowbitLists][kCapacity];
  int64_t numel[kCapacity];
  int64_t row_length[kCapacity];  // elements per row (numel / size(0) of a tensor of 2 or more dims)
  int64_t chunk_end[kCapacity];   // launch-local chunk prefix sums (see advance_slot)
  int32_t index[kCapacity];       // position of the tensor in the op's lists
  uint32_t key[kCapacity];        // sr_tensor_key of a stochastically rounded bf16 param
  uint8_t format[2][kCapacity];   // StateFormat of buffer 0 and 1
  uint8_t rounded[kCapacity];     // 1: the param is written by stochastic rounding
  int64_t first_chunk;            // call-wide id of this launch's chunk 0
  int32_t count;
};

// Elements [begin, begin + n) of a tensor: `n / segment` segments of `segment` elements each starting a
// row or a block, whose blocks' scales are numbered from scale_base (ceil(segment / 256) per segment).
struct ChunkGeometry {
  int64_t begin;
  int64_t n;
  int64_t segment;
  int64_t scale_base;
};

FASTLARS_CHUNK_HD inline int64_t blocks_per_row(int64_t row_length) { return chunk_count(row_length, kQuantBlock); }

// Chunks of a tensor of `numel` elements in rows of `row_length`.
FASTLARS_CHUNK_HD inline int64_t lowbit_chunk_count(int64_t numel, int64_t row_length) {
  if (numel <= 0) return 0;
  const int64_t rows = numel / row_length;
  if (row_length >= kChunk) return rows * chunk_count(row_length, kChunk);
  return chunk_count(rows, kChunk / row_length);
}

// Chunk k of such a tensor.
FASTLARS_CHUNK_HD inline ChunkGeometry lowbit_chunk(int64_t numel, int64_t row_length, int64_t k) {
  const int64_t per_row = blocks_per_row(row_length);
  if (row_length >= kChunk) {
    const int64_t pieces = chunk_count(row_length, kChunk);
    const int64_t row = k / pieces, piece = k - row * pieces;
    const int64_t offset = piece * kChunk;
    const int64_t n = row_length - offset < kChunk ? row_length - offset : kChunk;
    return {row * row_length + offset, n, n, row * per_row + offset / kQuantBlock};
  }
  const int64_t rows = kChunk / row_length;
  const int64_t begin = k * rows * row_length;
  const int64_t n = numel - begin < rows * row_length ? numel - begin : rows * row_length;
  return {begin, n, row_length, k * rows * per_row};
}

struct LowbitLarsOptions {
  LarsOptions lars;    // grad_norms null: ||g|| is taken in pass 1 (Σ g² per chunk, / grad_scale)
  const float* steps;  // t per tensor, for stochastic rounding keys (null without rounded params)
};

// One launch of LAMB with low-precision state: adapt → pass 1 (new m, v stored; Σw², Σu² per chunk into
// s.partials, 2 per chunk), ratios, pass 2 (u from the stored state, weights written); else one fused pass.
void launch_lamb_lowbit(const LowbitTable& table, Storage storage, const LambOptions& opt, const StepScalars& s,
                        int grid, cudaStream_t stream);

// One launch of LARS with a low-precision momentum: adapt → pass 1 (Σw², and Σg² without grad_norms: 2 per
// chunk), ratios; then the update (momentum decoded, updated, stored; weights moved by the fp32 momentum).
void launch_lars_lowbit(const LowbitTable& table, Storage storage, const LowbitLarsOptions& opt, const StepScalars& s,
                        int grid, cudaStream_t stream);

}  // namespace fastlars::cuda
