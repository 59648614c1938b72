// The kernel-argument table of a multi-tensor launch, shared by the host glue (C++) and the kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "chunk_plan.h"

namespace fastlars::cuda {

#if CUDART_VERSION >= 12010
constexpr int kParamBytes = 32764;  // kernel parameter limit from CUDA 12.1 (Volta and newer)
#else
constexpr int kParamBytes = 4096;
#endif
constexpr int kArgsReserve = 512;     // kernel arguments besides the table
constexpr int64_t kChunk = 16384;     // elements per chunk
constexpr int kThreads = 512;         // threads per block of the chunk kernels
constexpr int kVec = 4;               // elements per vector access
constexpr int kFinalizeThreads = 256;  // threads per block of the per-tensor reductions

// The tensors of one launch. ptr[l][s]: list l (param, grad, buffers...) of slot s.
template <int Depth>
struct TensorTable {
  static constexpr int kSlotBytes = Depth * 8 + 8 + 8 + 4;
  static constexpr int kCapacity = (kParamBytes - kArgsReserve - 16) / kSlotBytes;
  void* ptr[Depth][kCapacity];
  int64_t numel[kCapacity];
  int64_t chunk_end[kCapacity];  // launch-local chunk prefix sums (see advance_slot)
  int32_t index[kCapacity];      // position of the tensor in the op's lists (for norms and ratios)
  int64_t first_chunk;           // call-wide id of this launch's chunk 0
  int32_t count;
};

// Grid for a chunk kernel: enough blocks to fill the device, never more than there are chunks.
inline int chunk_grid(int64_t chunks, int sm_count) {
  const int64_t full = static_cast<int64_t>(sm_count) * (2048 / kThreads);
  return static_cast<int>(chunks < full ? chunks : full);
}

}  // namespace fastlars::cuda
