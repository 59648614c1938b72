// Chunk planning for the multi-tensor CUDA kernels, in plain C++ so the host can test it.
//
// A call hands the kernels a list of tensors. Each non-empty tensor of n elements is cut into
// ceil(n / chunk) chunks; chunks are numbered 0, 1, ... over the whole call, in tensor order, so a
// per-chunk partial sum has one fixed slot and a per-tensor reduction reads its slots in a fixed
// order (deterministic norms, no atomics). Tensors are grouped into launches ("waves"): a wave
// ends when its kernel-argument table is full or when its first-pass bytes exceed a budget (so
// the second pass finds the wave's tensors still in L2). Empty tensors own no chunk and appear in
// no wave, wherever they sit in the list.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define FASTLARS_CHUNK_HD __host__ __device__
#else
#define FASTLARS_CHUNK_HD
#endif

namespace fastlars::cuda {

// One launch: tensors positions[first .. first + count) of the planned list, whose chunks are the
// call-wide chunk ids [first_chunk, first_chunk + chunks).
struct Wave {
  int64_t first = 0;
  int64_t count = 0;
  int64_t first_chunk = 0;
  int64_t chunks = 0;
};

struct Plan {
  std::vector<int64_t> tensors;  // positions (in the caller's list) of the non-empty tensors
  std::vector<Wave> waves;
  int64_t total_chunks = 0;      // over the whole call
};

// ceil(n / chunk) for n >= 0, chunk > 0.
FASTLARS_CHUNK_HD inline int64_t chunk_count(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

// Plans the launches for tensors of numel[i] elements.
//   capacity         tensors one kernel-argument table holds (>= 1)
//   chunk            elements per chunk (> 0)
//   bytes_per_elem   first-pass bytes read per element (for the wave budget)
//   wave_bytes       close a wave once it holds at least this many first-pass bytes (<= 0: no limit)
//   first_chunk      call-wide id of the first chunk (to continue numbering across dtype buckets)
inline Plan plan_waves(const std::vector<int64_t>& numel, int64_t capacity, int64_t chunk, int64_t bytes_per_elem,
                       int64_t wave_bytes, int64_t first_chunk = 0) {
  Plan plan;
  plan.total_chunks = first_chunk;
  Wave wave;
  wave.first_chunk = first_chunk;
  int64_t wave_load = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(numel.size()); ++i) {
    if (numel[i] <= 0) continue;
    plan.tensors.push_back(i);
    const int64_t chunks = chunk_count(numel[i], chunk);
    wave.count += 1;
    wave.chunks += chunks;
    wave_load += numel[i] * bytes_per_elem;
    plan.total_chunks += chunks;
    const bool full = wave.count == capacity;
    const bool over_budget = wave_bytes > 0 && wave_load >= wave_bytes;
    if (full || over_budget) {
      plan.waves.push_back(wave);
      Wave next;
      next.first = static_cast<int64_t>(plan.tensors.size());
      next.first_chunk = plan.total_chunks;
      wave = next;
      wave_load = 0;
    }
  }
  if (wave.count > 0) plan.waves.push_back(wave);  // the pending wave, whatever followed it
  return plan;
}

// The slot (tensor of a launch table) owning launch-local chunk c, searching forward from `slot`:
// chunk_end[s] is the launch-local chunk id one past slot s's last chunk (a non-decreasing prefix
// sum), so a block that visits chunks in increasing order never moves backwards.
FASTLARS_CHUNK_HD inline int advance_slot(const int64_t* chunk_end, int count, int slot, int64_t c) {
  while (slot < count - 1 && chunk_end[slot] <= c) ++slot;
  return slot;
}

// Launch-local id of slot s's first chunk.
FASTLARS_CHUNK_HD inline int64_t slot_begin(const int64_t* chunk_end, int s) { return s == 0 ? 0 : chunk_end[s - 1]; }

}  // namespace fastlars::cuda
