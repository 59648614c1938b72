// Deterministic multi-tensor L2 norms: ||x_i|| = sqrt(Σ_j x_ij²), accumulated in fp32.
//
// Stage 1 (one launch per table): each chunk's Σx² goes to its own slot of `partials`.
// Stage 2 (one block per tensor): Σ of the tensor's chunk partials in a fixed order, then sqrt.
// No atomics, so the same input gives the same bits on every run.
#include "launch.h"
#include "multi_tensor_apply.cuh"

namespace fastlars::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) sumsq_kernel(const __grid_constant__ NormTable table, float* __restrict__ partials) {
  for_each_chunk(table, [&](int slot, int64_t c, int64_t begin, int64_t n) {
    const T* x = static_cast<const T*>(table.ptr[0][slot]) + begin;
    float acc[1] = {0.0f};
    // for_each_element's loops with the launch's constant block size as the stride: nvcc unrolls them here
    constexpr int W = kVecOf<T>;
    const int64_t full = vec_aligned(x) ? n - n % W : 0;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * W; i < full; i += kThreads * W) {
      float v[W];
      load<W>(x, i, v);
#pragma unroll
      for (int k = 0; k < W; ++k) acc[0] += v[k] * v[k];
    }
    for (int64_t i = full + threadIdx.x; i < n; i += kThreads) {
      float v[1];
      load<1>(x, i, v);
      acc[0] += v[0] * v[0];
    }
    block_sum<1>(acc);
    if (threadIdx.x == 0) partials[table.first_chunk + c] = acc[0];
  });
}

__global__ void __launch_bounds__(kFinalizeThreads)
    norm_finalize_kernel(const __grid_constant__ NormTable table, const float* __restrict__ partials, const float* grad_scale,
                         float* __restrict__ out) {
  float acc[1];
  sum_slot_partials<1>(table, partials, acc);
  if (threadIdx.x == 0) {
    const float norm = sqrtf(acc[0]);
    out[table.index[blockIdx.x]] = grad_scale != nullptr ? norm / *grad_scale : norm;
  }
}

}  // namespace

void launch_sumsq(const NormTable& table, DType dtype, float* partials, int grid, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat:
      launch(sumsq_kernel<float>, grid, kThreads, stream, table, partials);
      break;
    case DType::kBFloat16:
      launch(sumsq_kernel<__nv_bfloat16>, grid, kThreads, stream, table, partials);
      break;
    case DType::kHalf:
      launch(sumsq_kernel<__half>, grid, kThreads, stream, table, partials);
      break;
  }
}

void launch_norm_finalize(const NormTable& table, const float* partials, const float* grad_scale, float* out,
                          cudaStream_t stream) {
  launch(norm_finalize_kernel, table.count, kFinalizeThreads, stream, table, partials, grad_scale, out);
}

}  // namespace fastlars::cuda
