// What the CPU kernels' thread plumbing (multi_tensor.h) runs on in this build: the parallel runtime,
// the intra-op thread count, and how many threads a probe through for_each_chunk really ran on.
#pragma once

#include <cstdint>
#include <string>

namespace fastlars::cpu {

struct ParallelReport {
  std::string runtime;    // "openmp", "native" (ATen's thread pool) or "serial"
  std::string library;    // the shared library that provides the OpenMP runtime ("" without OpenMP)
  int threads;            // at::get_num_threads(): the most threads a kernel pass may use
  int threads_used;       // distinct threads that ran chunks of the probe pass
  int64_t probe_chunks;   // chunks of the probe pass
};

// Runs one pass of `threads` × 4 × kGrainChunks empty chunks through for_each_chunk, the loop every
// kernel pass uses, and records which threads ran them.
ParallelReport parallel_report();

// Threads that ran chunks of the widest pass of the last fastlars CPU op (0 before any): each op calls
// begin_step_record() first, and for_each_chunk reports each pass through record_pass_threads().
int last_step_threads();
void begin_step_record();
void record_pass_threads(int threads);

// Streaming-bandwidth probe of the benchmarks' roofline: `repeats` passes over fp32 arrays of n
// elements on the intra-op pool, chunked as the kernels are. mode "read": Σx (reads x); "update":
// x = c·x + z in place (reads x, z; writes x); "update2": x = c·x + z and y = c·y + z in place (reads
// x, y, z; writes x, y: the traffic of a momentum step). Returns the fastest pass's seconds.
double stream_pass(float* x, float* y, float* z, int64_t n, const std::string& mode, int repeats);

}  // namespace fastlars::cpu
