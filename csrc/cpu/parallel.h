// What the CPU kernels' thread plumbing (multi_tensor.h) runs on in this build: the parallel runtime,
// the intra-op thread count, and how many threads a probe through for_each_chunk really ran on.
#pragma once

#include <cstdint>
#include <string>

namespace fastlars::cpu {

struct ParallelReport {
  std::string runtime;    // "openmp", "native" (ATen's thread pool) or "serial"
  int threads;            // at::get_num_threads(): the most threads a kernel pass may use
  int threads_used;       // distinct threads that ran chunks of the probe pass
  int64_t probe_chunks;   // chunks of the probe pass
};

// Runs one pass of `threads` × 4 × kGrainChunks empty chunks through for_each_chunk, the loop every
// kernel pass uses, and records which threads ran them.
ParallelReport parallel_report();

}  // namespace fastlars::cpu
