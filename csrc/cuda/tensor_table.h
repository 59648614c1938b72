// The kernel-argument table of a multi-tensor launch, shared by the host glue (C++) and the kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch_plan.h"

namespace fastlars::cuda {

#if CUDART_VERSION >= 12010
constexpr int kParamBytes = kParamBytesCuda121;
#else
constexpr int kParamBytes = kParamBytesLegacy;
#endif
constexpr int kFinalizeThreads = 256;  // threads per block of the per-tensor reductions

// The tensors of one launch. ptr[l][s]: list l (param, grad, buffers...) of slot s.
template <int Depth>
struct TensorTable {
  static constexpr int kSlotBytes = Depth * 8 + 8 + 8 + 4;
  static constexpr int kCapacity = table_capacity(Depth, kParamBytes);  // launch_plan.h plans with the same
  void* ptr[Depth][kCapacity];
  int64_t numel[kCapacity];
  int64_t chunk_end[kCapacity];  // launch-local chunk prefix sums (see advance_slot)
  int32_t index[kCapacity];      // position of the tensor in the op's lists (for norms and ratios)
  int64_t first_chunk;           // call-wide id of this launch's chunk 0
  int32_t count;
};

}  // namespace fastlars::cuda
