// The launch plan of a multi-tensor CUDA call as a pure function of (tensor sizes, SM count, L2 size):
// host-only C++ (no CUDA or ATen headers), so the CPU build of fastlars._C exposes it
// (fastlars._C.cuda_plan) and CI tests it with real GPUs' figures on a machine without one.
//
// Two plans for the two-pass steps (pass 1 sums ||w||², ||u||² per tensor; pass 2 updates):
//   wave     a launch group ("wave") closes once its pass-1 bytes reach half the L2, so pass 2 finds
//            the wave's tensors still in L2; 3 launches (pass 1, ratios, pass 2) per wave;
//   onepass  a wave closes only when its kernel-argument table is full: 3 launches per table, pass 2
//            re-reads everything from DRAM.
// FASTLARS_CUDA_PLAN=wave|onepass picks one (default onepass); FASTLARS_CUDA_WAVE_BYTES=N, when set,
// overrides the wave budget itself (0: onepass). The default is measured: on an H200 (2026-12-04,
// benchmarks/results/step_cuda_NVIDIA_H200_*) onepass was faster in all 8 cases, BERT-Large fp32 LAMB
// 4.25 vs 7.30 ms and LARS 2.37 vs 3.02 ms, ResNet-50 LAMB 1.29 vs 1.54 ms: the L2 reuse of a wave
// does not pay for its launches (294 for BERT-Large LAMB, each too small to fill the GPU).
// benchmarks/gpu_step.py records both; benchmarks/cuda_plan.py prints the launch counts.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "chunk_plan.h"

namespace fastlars::cuda {

constexpr int64_t kChunk = 16384;  // elements per chunk
constexpr int kThreads = 512;      // threads per block of the chunk kernels
constexpr int kArgsReserve = 512;  // kernel-argument bytes besides the table
constexpr int kParamBytesCuda121 = 32764;  // kernel parameter limit from CUDA 12.1 (Volta and newer)
constexpr int kParamBytesLegacy = 4096;

// Tensors one kernel-argument table of `depth` lists holds in `param_bytes` of kernel parameters:
// per slot `depth` pointers, numel, chunk_end (8 bytes each) and an int32 index.
constexpr int table_capacity(int depth, int param_bytes) {
  return (param_bytes - kArgsReserve - 16) / (depth * 8 + 8 + 8 + 4);
}

// Grid for a chunk kernel: enough blocks to fill the device, never more than there are chunks.
inline int chunk_grid(int64_t chunks, int sm_count) {
  const int64_t full = static_cast<int64_t>(sm_count) * (2048 / kThreads);
  return static_cast<int>(chunks < full ? chunks : full);
}

enum class PlanKind { kWave, kOnePass };

inline PlanKind parse_plan(const std::string& name) {
  if (name == "wave") return PlanKind::kWave;
  if (name == "onepass") return PlanKind::kOnePass;
  throw std::invalid_argument("FASTLARS_CUDA_PLAN: expected 'wave' or 'onepass', got '" + name + "'");
}

// The plan FASTLARS_CUDA_PLAN names (read at every call, so benchmarks can switch it); onepass when unset.
inline PlanKind plan_from_env() {
  const char* env = std::getenv("FASTLARS_CUDA_PLAN");
  return env != nullptr && *env != '\0' ? parse_plan(env) : PlanKind::kOnePass;
}

// Pass-1 bytes after which a wave closes (0: only a full table closes it).
inline int64_t wave_budget(PlanKind kind, int64_t l2_bytes) { return kind == PlanKind::kWave ? l2_bytes / 2 : 0; }

// FASTLARS_CUDA_WAVE_BYTES when set (benchmarks), else the plan's budget.
inline int64_t wave_budget_from_env(PlanKind kind, int64_t l2_bytes) {
  const char* env = std::getenv("FASTLARS_CUDA_WAVE_BYTES");
  return env != nullptr && *env != '\0' ? std::atoll(env) : wave_budget(kind, l2_bytes);
}

// The three multi-tensor ops and what a wave of each costs.
enum class Op { kGradNorms, kLars, kLamb };

struct OpShape {
  int depth;               // tensor lists in the kernel-argument table
  int64_t bytes_per_elem;  // pass-1 bytes per element counted against the wave budget (0: no budget)
  int launches_per_wave;   // kernels per wave
};

inline OpShape op_shape(Op op, bool adapt) {
  switch (op) {
    case Op::kGradNorms:
      return {1, 0, 2};  // Σg² per chunk, then per-tensor sums
    case Op::kLars:
      return {4, 4, adapt ? 3 : 1};  // pass 1 reads w; without adapt only the update kernel runs
    case Op::kLamb:
      return {5, 16, adapt ? 3 : 1};  // pass 1 reads w, g, m, v
  }
  return {1, 0, 1};
}

struct Launch {
  int64_t wave;   // which wave of the call
  int grid;       // blocks (chunk kernels: ≤ 4 per SM; per-tensor kernels: one per tensor)
  bool chunked;   // a chunk kernel (pass 1, pass 2, Σg²) rather than a per-tensor reduction
};

struct LaunchPlan {
  int64_t waves = 0;
  std::vector<Launch> launches;
  int64_t total_chunks = 0;
};

// Every kernel launch of one op call: `buckets` are the element counts of the call's tensors grouped by
// storage (one group per dtype/master combination, planned separately as ops.cpp does).
inline LaunchPlan plan_launches(Op op, bool adapt, const std::vector<std::vector<int64_t>>& buckets, int sm_count,
                                int64_t l2_bytes, PlanKind kind, int param_bytes = kParamBytesCuda121) {
  const OpShape shape = op_shape(op, adapt);
  const bool budgeted = op != Op::kGradNorms && adapt;
  const int64_t budget = budgeted ? wave_budget(kind, l2_bytes) : 0;
  LaunchPlan out;
  for (const std::vector<int64_t>& sizes : buckets) {
    const Plan plan = plan_waves(sizes, table_capacity(shape.depth, param_bytes), kChunk, shape.bytes_per_elem,
                                 budget, out.total_chunks);
    out.total_chunks = plan.total_chunks;
    for (const Wave& w : plan.waves) {
      const int grid = chunk_grid(w.chunks, sm_count);
      const int per_tensor = static_cast<int>(w.count);
      if (op == Op::kGradNorms) {
        out.launches.push_back({out.waves, grid, true});
        out.launches.push_back({out.waves, per_tensor, false});
      } else if (shape.launches_per_wave == 3) {
        out.launches.push_back({out.waves, grid, true});
        out.launches.push_back({out.waves, per_tensor, false});
        out.launches.push_back({out.waves, grid, true});
      } else {
        out.launches.push_back({out.waves, grid, true});
      }
      ++out.waves;
    }
  }
  return out;
}

}  // namespace fastlars::cuda
