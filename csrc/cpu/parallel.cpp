// The probe of parallel.h. Under OpenMP, at::parallel_for gives each thread of the team a fixed
// slice of the range, so the count of threads used is exact, not a matter of timing.
#include "parallel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <thread>
#include <vector>

#include "multi_tensor.h"

namespace fastlars::cpu {

ParallelReport parallel_report() {
  ParallelReport report;
#if AT_PARALLEL_OPENMP
#ifdef _OPENMP
  report.runtime = "openmp";
#else
  report.runtime = "serial";  // torch uses OpenMP but this file was compiled without -fopenmp
#endif
#elif AT_PARALLEL_NATIVE
  report.runtime = "native";
#else
  report.runtime = "serial";
#endif
  report.threads = at::get_num_threads();
  report.probe_chunks = int64_t{4} * kGrainChunks * std::max(report.threads, 1);
  const std::vector<Chunk> chunks(static_cast<size_t>(report.probe_chunks), Chunk{0, 0, 0});
  std::vector<size_t> ran_on(chunks.size());
  for_each_chunk(chunks, 0, [&](int64_t k, const Chunk&, float*) {
    ran_on[k] = std::hash<std::thread::id>{}(std::this_thread::get_id());
  });
  std::sort(ran_on.begin(), ran_on.end());
  report.threads_used = static_cast<int>(std::unique(ran_on.begin(), ran_on.end()) - ran_on.begin());
  return report;
}

}  // namespace fastlars::cpu
