// The probe of parallel.h. Under OpenMP, at::parallel_for gives each thread of the team a fixed
// slice of the range, so the count of threads used is exact, not a matter of timing.
#include "parallel.h"

#include <ATen/Parallel.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <dlfcn.h>
#include <omp.h>
#endif

#include "kernels.h"
#include "multi_tensor.h"

namespace fastlars::cpu {
namespace {

std::atomic<int> widest_pass{0};

}  // namespace

void begin_step_record() { widest_pass.store(0, std::memory_order_relaxed); }

void record_pass_threads(int threads) {
  int seen = widest_pass.load(std::memory_order_relaxed);
  while (threads > seen && !widest_pass.compare_exchange_weak(seen, threads, std::memory_order_relaxed)) {
  }
}

int last_step_threads() { return widest_pass.load(std::memory_order_relaxed); }

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
#if defined(_OPENMP)
  Dl_info info;
  if (dladdr(reinterpret_cast<const void*>(&omp_get_num_threads), &info) != 0 && info.dli_fname != nullptr) {
    report.library = info.dli_fname;
  }
#endif
  report.threads = at::get_num_threads();
  report.probe_chunks = int64_t{4} * kGrainChunks * std::max(report.threads, 1);
  // full-size chunks (their elements are never touched), so the pass is as wide as a large step's
  const std::vector<Chunk> chunks(static_cast<size_t>(report.probe_chunks), Chunk{0, 0, kChunk});
  std::vector<size_t> ran_on(chunks.size());
  for_each_chunk(chunks, 0, [&](int64_t k, const Chunk&, float*) {
    ran_on[k] = std::hash<std::thread::id>{}(std::this_thread::get_id());
  });
  std::sort(ran_on.begin(), ran_on.end());
  report.threads_used = static_cast<int>(std::unique(ran_on.begin(), ran_on.end()) - ran_on.begin());
  return report;
}

double stream_pass(float* x, float* y, float* z, int64_t n, const std::string& mode, int repeats) {
  const int m = mode == "read" ? 0 : mode == "update" ? 1 : mode == "update2" ? 2 : -1;
  TORCH_CHECK(m >= 0, "stream_pass: mode must be 'read', 'update' or 'update2', got '", mode, "'");
  TORCH_CHECK(repeats >= 1, "stream_pass: repeats must be >= 1, got ", repeats);
  const ElementKernels& kernels = element_kernels();
  const std::vector<Chunk> chunks = plan_chunks({n});
  std::vector<float> partials(chunks.size());
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for_each_chunk(chunks, 0, [&](int64_t k, const Chunk& c, float*) {
      if (m == 0) {
        partials[k] = kernels.stream_sum(x + c.begin, c.size);
      } else {
        kernels.stream_update(x + c.begin, m == 2 ? y + c.begin : nullptr, z + c.begin, c.size, 0.5f);
      }
    });
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace fastlars::cpu
