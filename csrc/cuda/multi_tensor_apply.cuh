// Multi-tensor apply: one kernel launch walks the chunks of many tensors.
//
// The launch's tensors travel in the kernel arguments (a TensorTable, up to the 32 KB parameter
// space CUDA >= 12.1 allows on Volta and newer, 4 KB before), so a launch needs no host-to-device
// copy and is safe to capture in a CUDA graph. Kernels take the table as a __grid_constant__
// parameter: indexed in place in the constant bank, never copied to per-thread local memory. A fixed grid strides over the launch's chunks; each
// block finds the tensor owning its chunk by walking the table's chunk prefix sums forward.
// Sizes and offsets are 64-bit; 16-byte vector accesses are used where every list of a tensor is
// 16-byte aligned (chunks are a multiple of 8 elements, so an aligned tensor has aligned chunks).
#pragma once

#ifndef FASTLARS_CUDA_EMULATION  // test/emu/cuda_emu.h stands in for the CUDA headers
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <cstring>
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

// The main arrays are read and written 16 bytes per access (LDG.E.128 / STG.E.128 on sm_90; checked
// from the SASS by tests/test_cuda_sass.py): a Pack is 4 fp32 or 8 bf16/fp16 elements.
constexpr int kVecBytes = 16;

template <typename T>
constexpr int kPackElems = kVecBytes / static_cast<int>(sizeof(T));

// Under the host emulation every main-array access is counted and a misaligned vector access aborts
// (csrc/cuda/test/emu/cuda_emu.h); on the GPU this is nothing.
__device__ __forceinline__ void note_access(const void* p, bool vector) {
#ifdef FASTLARS_CUDA_EMULATION
  emu::note_access(p, kVecBytes, vector);
#else
  (void)p;
  (void)vector;
#endif
}

template <typename T>
struct alignas(kVecBytes) Pack {
  T v[kPackElems<T>];
};

// Two floats as the 32-bit word their bf16/fp16 roundings occupy in memory; for fp32 the word of x[0].
template <typename T>
__device__ __forceinline__ uint32_t to_word(const float* x) {
  uint32_t word;
  if constexpr (std::is_same_v<T, float>) {
    memcpy(&word, x, sizeof word);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x[0], x[1]);
    memcpy(&word, &h, sizeof word);
  } else {
    const __half2 h = __floats2half2_rn(x[0], x[1]);
    memcpy(&word, &h, sizeof word);
  }
  return word;
}

// A 16-byte store (st.global.v4.b32) to p, 16-byte aligned. Inline PTX: nvcc 13 lowers a plain uint4 or
// struct store to four or eight scalar stores, which ptxas merges only where an earlier vector load of the
// same address proves the alignment (not the param of a step with masters); __stwb would make it STRONG.SM.
__device__ __forceinline__ void store_v4(void* p, const uint4& v) {
#ifdef __CUDA_ARCH__
  asm("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
#else
  *static_cast<uint4*>(p) = v;  // the host emulation
#endif
}

// 16 bytes at p (16-byte aligned) as one ld.global.v4 (a uint4 load) or one st.global.v4.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  note_access(p, true);
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  Pack<T> pk;
  memcpy(&pk, &raw, sizeof pk);
  return pk;
}

// x[0 .. kPackElems<T>) rounded to T and stored as 16 bytes at p (16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float* x) {
  note_access(p, true);
  constexpr int kPerWord = kPackElems<T> / 4;
  store_v4(p, make_uint4(to_word<T>(x), to_word<T>(x + kPerWord), to_word<T>(x + 2 * kPerWord),
                         to_word<T>(x + 3 * kPerWord)));
}

// Elements per thread per vector iteration of a kernel whose params and grads are T: one 16-byte
// access of every T array, two of every fp32 array (masters and optimizer state beside 16-bit params).
template <typename T>
constexpr int kVecOf = kPackElems<T>;

// Whether p allows 16-byte accesses. A chunk starts a multiple of kChunk elements into its tensor and a
// vector iteration a multiple of kVecOf<T> elements into its chunk, so an aligned tensor stays aligned.
__device__ __forceinline__ bool vec_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// Tag for the access width of an element loop: a kernel's vector width or 1 (scalar).
template <int W>
struct Width {
  static constexpr int value = W;
};

// W elements of p starting at element i, as floats: W / kPackElems<T> 16-byte accesses (p + i aligned)
// when W > 1, else one scalar access.
template <int W, typename T>
__device__ __forceinline__ void load(const T* p, int64_t i, float (&out)[W]) {
  if constexpr (W == 1) {
    note_access(p + i, false);
    out[0] = to_float(p[i]);
  } else {
    static_assert(W % kPackElems<T> == 0, "a vector iteration covers whole 16-byte packs");
#pragma unroll
    for (int j = 0; j < W / kPackElems<T>; ++j) {
      const Pack<T> pk = load_pack(p + i + j * kPackElems<T>);
#pragma unroll
      for (int k = 0; k < kPackElems<T>; ++k) out[j * kPackElems<T> + k] = to_float(pk.v[k]);
    }
  }
}

template <int W, typename T>
__device__ __forceinline__ void store(T* p, int64_t i, const float (&in)[W]) {
  if constexpr (W == 1) {
    note_access(p + i, false);
    p[i] = from_float<T>(in[0]);
  } else {
    static_assert(W % kPackElems<T> == 0, "a vector iteration covers whole 16-byte packs");
#pragma unroll
    for (int j = 0; j < W / kPackElems<T>; ++j) store_pack(p + i + j * kPackElems<T>, in + j * kPackElems<T>);
  }
}

// Calls f(Width<V>{}, i) for the vector iterations and f(Width<1>{}, i) for the remaining elements of a
// chunk of n elements, spread over the block; vectors only when `aligned` (every list's pointer passes
// vec_aligned), else every element takes the scalar path.
template <int V, typename F>
__device__ __forceinline__ void for_each_element(int64_t n, bool aligned, F&& f) {
  const int64_t full = aligned ? n - n % V : 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < full; i += static_cast<int64_t>(blockDim.x) * V) {
    f(Width<V>{}, i);
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
// (call-wide chunk ids); thread 0 gets the per-tensor totals. Fixed order: deterministic. Table: any
// kernel-argument table with first_chunk and chunk_end (a TensorTable, lowbit_launch.h's LowbitTable).
template <int N, typename Table>
__device__ __forceinline__ void sum_slot_partials(const Table& t, const float* partials, float (&acc)[N]) {
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
