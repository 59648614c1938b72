// How the CPU kernels order their two passes over a param group so that the second pass finds in
// cache what the first one read.
//
// LARS and LAMB need a tensor's whole norms before any element of it can be updated, so every element
// is visited twice. The cores of a CPU read memory at a fixed rate and a step's time follows the
// number of arrays read from memory; a second read is cheap only while the array is still cached.
// So tensors are taken in groups of consecutive tensors of about kGroupElements elements (a bigger
// tensor alone), and both passes of a group run before the next group starts: a group's arrays fit in
// the caches. (Measured on a 2-core AMD EPYC: LAMB over 100 tensors of 200K elements, 18 ms per step
// in groups against 24 ms with all tensors' pass 1 first; a tensor too big for the caches gains nothing.)
//
// LAMB also keeps the direction u = m̂ / (√v̂ + ε) of pass 1 in a workspace for pass 2, instead of
// recomputing its square root and division (or, with int8/bf16 state, decoding m and v again), but only
// for groups whose arrays stay in cache: there u's write and read cost no memory traffic, while a
// recomputing pass 2 costs as much arithmetic as the rest of the step (one thread, in L2, on the 2-core
// Xeon VM: 0.85 ns per element storing u against 1.09 recomputing). A group of more than
// max_stored_elements() recomputes u from m and v, which moves fewer bytes than writing u out and reading
// it back (pass 1 w, g, m, v → m, v and pass 2 w, m, v → w: 40 B per element; a stored u adds its write,
// the write's read for ownership, and replaces m, v by u in pass 2: 44 B). The limit is a quarter of the
// last-level cache per group of five fp32 arrays (20 B per element; at least kGroupElements): the share of
// a shared L3 that a VM's two cores were measured to keep. Measured (same process, interleaved rounds, 2
// threads, LAMB step / fused AdamW): on a 2-core Intel Xeon VM with 480 MiB of L3 reported (x += y
// streams 84-86 GB/s up to 32 MiB arrays, 42-46 beyond 128 MiB), a limit of 2^18 elements gave 1.71× on
// ResNet-50 and 1.87× on BERT-base, one of 2^22 1.47× and 1.71× (the quarter-cache limit there is 6.3M);
// storing every tensor, BERT's 23.4M-element embedding included, gained nothing more. On a 2-core AMD
// EPYC (32 MiB L3) an earlier build took ~102 ms recomputing against ~125 ms storing u of every tensor
// of BERT-base; the quarter-cache limit there is 419K elements.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include "multi_tensor.h"

namespace fastlars::cpu {

// 1 MiB per fp32 array: a LAMB group's five arrays (w, m, v, g, u) take 5 MiB of L2 + L3.
constexpr int64_t kGroupElements = int64_t{1} << 18;

// Bytes of one instance of the highest cache level the kernel lists for cpu0 (Linux sysfs,
// /sys/devices/system/cpu/cpu0/cache/index*/{level,size}: what lscpu prints), else glibc's sysconf (L3,
// else L2); 0 where unknown. sysfs first: on a 2-core Zen 4 EPYC VM (2026-12-06) sysconf reported 320 MiB
// of L3 where sysfs reports the 32 MiB the VM's cores share, so LAMB stored u for groups of up to 4.2M
// elements, far beyond that cache; in 2 of 13 processes (and one benchmark run) every step that stored
// u then took ~2x as long (ResNet-50 fp32 and int8 LAMB, 2 threads: 38-50 ms against 19-22 ms for the
// 419K limit of 32 MiB in the same process, interleaved), while the 419K limit was never slow.
inline int64_t sysfs_last_level_cache_bytes() {
  int best_level = 0;
  int64_t best_bytes = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || !(size_file >> size) || size.empty()) continue;
    const char unit = size.back();
    const int shift = unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
    const int64_t bytes = std::strtoll(size.c_str(), nullptr, 10) << shift;
    if (level > best_level || (level == best_level && bytes > best_bytes)) {
      best_level = level;
      best_bytes = bytes;
    }
  }
  return best_bytes;
}

inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    long b = static_cast<long>(sysfs_last_level_cache_bytes());
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    if (b <= 0) b = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (b <= 0) b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return b > 0 ? static_cast<int64_t>(b) : int64_t{0};
  }();
  return bytes;
}

// The largest group whose five fp32 arrays (20 B per element) fit in a quarter of the last-level cache,
// and at least kGroupElements.
inline int64_t cache_sized_elements() { return std::max(kGroupElements, last_level_cache_bytes() / (4 * 20)); }

// The most elements LAMB's workspace holds: FASTLARS_LAMB_WORKSPACE_ELEMENTS, else cache_sized_elements(),
// read at every step. The workspace is as large as the largest group that stores u.
inline int64_t max_stored_elements() {
  const char* limit = std::getenv("FASTLARS_LAMB_WORKSPACE_ELEMENTS");
  return limit != nullptr ? std::strtoll(limit, nullptr, 10) : cache_sized_elements();
}

struct TensorGroup {
  size_t first_tensor, end_tensor;  // tensors [first_tensor, end_tensor)
  size_t first_chunk, end_chunk;    // their chunks, [first_chunk, end_chunk) of plan_chunks' order
  int64_t elements;
};

struct GroupPlan {
  std::vector<TensorGroup> groups;
  std::vector<size_t> first_chunk;  // per tensor, and one past the last: tensor t owns [first_chunk[t], first_chunk[t+1])
  std::vector<int64_t> offset;      // per tensor: its first element's index within its group

  // Σ over tensor t's chunks of partials[stride·k + at], in chunk order and in double, so a norm does
  // not depend on the number of threads.
  double tensor_sum(const std::vector<float>& partials, size_t t, int stride = 1, int at = 0) const {
    double sum = 0.0;
    for (size_t k = first_chunk[t]; k < first_chunk[t + 1]; ++k) sum += partials[stride * k + at];
    return sum;
  }
};

// Groups over the tensors of `numels`, whose chunks are `chunks` (plan_chunks(numels)).
inline GroupPlan plan_groups(const std::vector<Chunk>& chunks, const std::vector<int64_t>& numels) {
  GroupPlan plan;
  const size_t n = numels.size();
  plan.first_chunk.assign(n + 1, 0);
  for (const Chunk& c : chunks) ++plan.first_chunk[c.tensor + 1];
  for (size_t t = 0; t < n; ++t) plan.first_chunk[t + 1] += plan.first_chunk[t];
  plan.offset.assign(n, 0);
  size_t t = 0;
  while (t < n) {
    TensorGroup group{t, t, plan.first_chunk[t], plan.first_chunk[t], 0};
    while (t < n && (group.elements == 0 || group.elements + numels[t] <= kGroupElements)) {
      plan.offset[t] = group.elements;
      group.elements += numels[t];
      ++t;
    }
    group.end_tensor = t;
    group.end_chunk = plan.first_chunk[t];
    plan.groups.push_back(group);
  }
  return plan;
}

// The calling thread's LAMB workspace, large enough for every group of `plan` whose elements are at
// most `limit` (uninitialised; grown, never shrunk).
inline float* update_workspace(const GroupPlan& plan, int64_t limit) {
  int64_t elements = 0;
  for (const TensorGroup& group : plan.groups) {
    if (group.elements <= limit) elements = std::max(elements, group.elements);
  }
  thread_local std::unique_ptr<float[]> buffer;
  thread_local int64_t capacity = 0;
  if (elements > capacity) {
    buffer.reset(new float[static_cast<size_t>(elements)]);
    capacity = elements;
  }
  return buffer.get();
}

}  // namespace fastlars::cpu
