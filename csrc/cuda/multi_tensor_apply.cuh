// Multi-tensor apply: one kernel launch walks the chunks of many tensors.
//
// The launch's tensors travel in the kernel arguments (a TensorTable, up to the 32 KB parameter
// space CUDA >= 12.1 allows on Volta and newer, 4 KB before), so a launch needs no host-to-device
// copy and is safe to capture in a CUDA graph. Kernels take the table as a __grid_constant__
// parameter: indexed in place in the constant bank, never copied to per-thread local memory. A fixed grid strides over the launch's chunks; each
// block finds the tensor owning its chunk by walking the table's chunk prefix sums forward.
// Sizes and offsets are 64-bit; 16-byte vector accesses are used where every list of a tensor is
// aligned (chunks are a multiple of 8 elements, so an aligned tensor has aligned chunks).
#pragma once

#ifndef FASTLARS_CUDA_EMULATION  // test/emu/cuda_emu.h stands in for the CUDA headers
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <type_traits>

#include "launch.h"
#include "tensor_table.h"

namespace fastlars::cuda {

// ---------------------------------------------------------------------------- element access
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// kVec elements as one access of kVec * sizeof(T) bytes (16 B for fp32, 8 B for 16-bit types).
template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* base, int64_t i, float (&out)[kVec]) {
  const Pack<T> p = reinterpret_cast<const Pack<T>*>(base)[i / kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) out[k] = to_float(p.v[k]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* base, int64_t i, const float (&in)[kVec]) {
  Pack<T> p;
#pragma unroll
  for (int k = 0; k < kVec; ++k) p.v[k] = from_float<T>(in[k]);
  reinterpret_cast<Pack<T>*>(base)[i / kVec] = p;
}

template <typename T>
__device__ __forceinline__ bool vec_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

// Tag for the access width of an element loop: kVec (vector) or 1 (scalar).
template <int W>
struct Width {
  static constexpr int value = W;
};

// W elements of p starting at element i, as floats (one vector access when W == kVec).
template <int W, typename T>
__device__ __forceinline__ void load(const T* p, int64_t i, float (&out)[W]) {
  if constexpr (W == kVec) {
    load_vec(p, i, out);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = to_float(p[i + k]);
  }
}

template <int W, typename T>
__device__ __forceinline__ void store(T* p, int64_t i, const float (&in)[W]) {
  if constexpr (W == kVec) {
    store_vec(p, i, in);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) p[i + k] = from_float<T>(in[k]);
  }
}

// Calls f(Width<kVec>{}, i) for the vectors and f(Width<1>{}, i) for the remaining elements of a
// chunk of n elements, spread over the block; vectors only when `aligned`.
template <typename F>
__device__ __forceinline__ void for_each_element(int64_t n, bool aligned, F&& f) {
  const int64_t full = aligned ? n - n % kVec : 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < full; i += static_cast<int64_t>(blockDim.x) * kVec) {
    f(Width<kVec>{}, i);
  }
  for (int64_t i = full + threadIdx.x; i < n; i += blockDim.x) f(Width<1>{}, i);
}

// ------------------------------------------------------------------------------ reductions
// Sum over the block of N values per thread; the result is valid in thread 0. The order of the
// additions depends only on blockDim, so repeated runs give identical bits.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N]) {
  __shared__ float scratch[N][32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) scratch[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = lane < warps ? scratch[k][lane] : 0.0f;
      for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    }
  }
}

// Calls body(slot, c, begin, n) for every chunk of the launch this block owns: launch-local chunk c,
// elements [begin, begin + n) of the tensor in `slot`.
template <int Depth, typename Body>
__device__ __forceinline__ void for_each_chunk(const TensorTable<Depth>& t, Body&& body) {
  const int64_t total = t.chunk_end[t.count - 1];
  int slot = 0;
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    slot = advance_slot(t.chunk_end, t.count, slot, c);
    const int64_t begin = (c - slot_begin(t.chunk_end, slot)) * kChunk;
    const int64_t n = t.numel[slot] - begin < kChunk ? t.numel[slot] - begin : kChunk;
    body(slot, c, begin, n);
  }
}

// Sum, over the chunks of slot blockIdx.x, of N per-chunk partials stored as partials[N * chunk + k]
// (call-wide chunk ids); thread 0 gets the per-tensor totals. Fixed order: deterministic.
template <int N, int Depth>
__device__ __forceinline__ void sum_slot_partials(const TensorTable<Depth>& t, const float* partials,
                                                  float (&acc)[N]) {
  const int s = blockIdx.x;
  const int64_t begin = t.first_chunk + slot_begin(t.chunk_end, s);
  const int64_t end = t.first_chunk + t.chunk_end[s];
#pragma unroll
  for (int k = 0; k < N; ++k) acc[k] = 0.0f;
  for (int64_t c = begin + threadIdx.x; c < end; c += blockDim.x) {
#pragma unroll
    for (int k = 0; k < N; ++k) acc[k] += partials[N * c + k];
  }
  block_sum<N>(acc);
}

// The step's learning rate: read on the device when it is a tensor (capturable), else the value.
__device__ __forceinline__ float read_lr(const StepScalars& s) { return s.lr_ptr != nullptr ? *s.lr_ptr : s.lr; }

// Whether this step is skipped (GradScaler overflow or a non-finite gradient): nothing is written.
__device__ __forceinline__ bool skipped(const StepScalars& s) { return s.found_inf != nullptr && *s.found_inf != 0.0f; }

// Launches kernel(args...) as `grid` blocks of `threads` threads on `stream`. Under the host
// emulation (csrc/cuda/test/emu) every block runs before this returns.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), int grid, int threads, cudaStream_t stream, const Args&... args) {
#ifdef FASTLARS_CUDA_EMULATION
  (void)stream;
  emu::run_grid(static_cast<unsigned>(grid), static_cast<unsigned>(threads), [&] { kernel(args...); });
#else
  kernel<<<grid, threads, 0, stream>>>(args...);
#endif
}

}  // namespace fastlars::cuda
