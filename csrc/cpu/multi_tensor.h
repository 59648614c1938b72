// Multi-tensor plumbing of the CPU kernels: one call covers every tensor of a param group.
//
// The elements of all tensors are cut into chunks of kChunk elements (a tensor's last chunk may be
// shorter; empty tensors have none), and at::parallel_for hands ranges of at least kGrainChunks
// chunks to threads, so a few huge tensors and many small ones load the threads alike. Per-chunk partial sums go to a
// vector indexed by chunk and are added per tensor in chunk order: norms do not depend on the
// number of threads. Tensors that are not fp32 are converted chunk by chunk into thread-local fp32
// scratch (and back), so every kernel body is one fp32 loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// AVX2 and baseline (SSE2) copies of a hot loop, picked at load time: the library runs on any x86-64.
// No "fma" on purpose: a fused multiply-add would round differently from the reference.
#define FASTLARS_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTLARS_CPU_CLONES
#endif

namespace fastlars::cpu {

constexpr int64_t kChunk = 16384;  // elements: 64 KiB per fp32 array, a chunk's arrays stay in L2

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t size;
};

// Every chunk of every tensor, in tensor order.
inline std::vector<Chunk> plan_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      chunks.push_back({static_cast<int64_t>(t), b, std::min(kChunk, numels[t] - b)});
    }
  }
  return chunks;
}

// `arrays` fp32 scratch arrays of kChunk elements for the calling thread, kept between calls: a fresh
// zeroed buffer per thread and pass would add its memset to every step.
inline float* thread_scratch(int arrays) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local int capacity = 0;
  if (arrays > capacity) {
    buffer.reset(new float[static_cast<size_t>(arrays) * kChunk]);
    capacity = arrays;
  }
  return buffer.get();
}

// Runs body(chunk, scratch) over all chunks on the intra-op thread pool, with `arrays` fp32 scratch
// arrays of kChunk elements per thread.
// A call with fewer than kGrainChunks chunks, or fewer than kSerialElements elements in all (a small
// model: many tiny tensors are as many chunks), runs on the calling thread: waking the pool costs more
// than the work, and far more when the cores are oversubscribed.
constexpr int64_t kGrainChunks = 8;
constexpr int64_t kSerialElements = kChunk;

// Each call reports how many threads ran a range of it (parallel.h: last_step_threads); under OpenMP
// each thread of the team runs at most one range.
//
// Order::back walks each thread's range from its end: a pass that follows a forward pass over the same
// chunks (the same ranges per thread) starts on what that pass read last, still in the thread's L2 and
// the shared L3, instead of on what it read first, long evicted. Bodies must not depend on the order
// (every kernel body writes only its own chunk and its own partial).
enum class Order { forward, back };

template <typename Body>
void for_each_chunk(const Chunk* chunks, int64_t count, int arrays, const Body& body, Order order = Order::forward) {
  std::atomic<int> threads{0};
  int64_t elements = 0;
  for (int64_t c = 0; c < count && elements < kSerialElements; ++c) elements += chunks[c].size;
  const int64_t grain = elements < kSerialElements ? std::max<int64_t>(count, 1) : kGrainChunks;
  at::parallel_for(0, count, grain, [&](int64_t lo, int64_t hi) {
    threads.fetch_add(1, std::memory_order_relaxed);
    float* scratch = thread_scratch(arrays);
    if (order == Order::back) {
      for (int64_t c = hi - 1; c >= lo; --c) body(c, chunks[c], scratch);
    } else {
      for (int64_t c = lo; c < hi; ++c) body(c, chunks[c], scratch);
    }
  });
  record_pass_threads(threads.load(std::memory_order_relaxed));
}

template <typename Body>
void for_each_chunk(const std::vector<Chunk>& chunks, int arrays, const Body& body) {
  for_each_chunk(chunks.data(), static_cast<int64_t>(chunks.size()), arrays, body);
}

// Sum over chunks of each tensor of per-chunk partials (in chunk order, in double).
inline std::vector<double> per_tensor_sums(const std::vector<Chunk>& chunks, const std::vector<float>& partials,
                                           size_t tensors, int stride = 1, int offset = 0) {
  std::vector<double> sums(tensors, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) sums[chunks[c].tensor] += partials[c * stride + offset];
  return sums;
}

// One tensor's storage as the kernels see it: a base pointer and a dtype (fp32, bf16 or fp16).
struct Slot {
  void* base = nullptr;
  at::ScalarType type = at::kFloat;
};

FASTLARS_CPU_CLONES inline void widen_bf16(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
FASTLARS_CPU_CLONES inline void widen_half(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
FASTLARS_CPU_CLONES inline void narrow_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}
FASTLARS_CPU_CLONES inline void narrow_half(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// Elements [begin, begin + n) of `slot` as fp32: the storage itself when it is fp32, else a copy in
// `scratch`.
inline float* load(const Slot& slot, int64_t begin, int64_t n, float* scratch) {
  switch (slot.type) {
    case at::kFloat:
      return static_cast<float*>(slot.base) + begin;
    case at::kBFloat16:
      widen_bf16(static_cast<const c10::BFloat16*>(slot.base) + begin, scratch, n);
      return scratch;
    default:
      widen_half(static_cast<const c10::Half*>(slot.base) + begin, scratch, n);
      return scratch;
  }
}

// Elements [begin, begin + n) of `slot` copied into `scratch` as fp32 (the storage is never written).
inline float* load_copy(const Slot& slot, int64_t begin, int64_t n, float* scratch) {
  const float* src = load(slot, begin, n, scratch);
  if (src != scratch) std::memcpy(scratch, src, static_cast<size_t>(n) * sizeof(float));
  return scratch;
}

// Writes fp32 values `src` to elements [begin, begin + n) of `slot`, rounding to its dtype.
inline void store(const Slot& slot, int64_t begin, int64_t n, const float* src) {
  switch (slot.type) {
    case at::kFloat: {
      float* dst = static_cast<float*>(slot.base) + begin;
      if (dst != src) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    }
    case at::kBFloat16:
      narrow_bf16(src, static_cast<c10::BFloat16*>(slot.base) + begin, n);
      return;
    default:
      narrow_half(src, static_cast<c10::Half*>(slot.base) + begin, n);
  }
}

}  // namespace fastlars::cpu
