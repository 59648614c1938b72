// The pybind11 module fastlars._C. It reports which devices its kernels were built for, so the
// Python side can tell "not built" from "built without CUDA".
#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/host_step.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "cpu/tensor_groups.h"
#include "cuda/launch_plan.h"

namespace {

// Device types with LARS/LAMB kernels registered for the fastlars ops (csrc/cpu always, csrc/cuda
// when compiled in).
std::vector<std::string> kernel_devices() {
#ifdef FASTLARS_WITH_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

bool built_with_cuda() {
#ifdef FASTLARS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The instruction-set build of the CPU element loops this process uses (csrc/cpu/kernels.h).
std::string cpu_isa() { return fastlars::cpu::element_kernels().isa; }

// The CPU kernels' parallel runtime and a probe of the threads a kernel pass really runs on.
pybind11::dict cpu_parallel() {
  const fastlars::cpu::ParallelReport r = fastlars::cpu::parallel_report();
  pybind11::dict out;
  out["runtime"] = r.runtime;
  out["library"] = r.library;
  out["threads"] = r.threads;
  out["threads_used"] = r.threads_used;
  out["probe_chunks"] = r.probe_chunks;
  return out;
}

// The cache figures the CPU kernels plan their passes with (tensor_groups.h).
pybind11::dict cpu_cache_plan() {
  pybind11::dict out;
  out["last_level_cache_bytes"] = fastlars::cpu::last_level_cache_bytes();
  out["group_elements"] = fastlars::cpu::kGroupElements;
  out["lamb_workspace_elements"] = fastlars::cpu::max_stored_elements();
  return out;
}

// Seconds per pass of the streaming probe (parallel.h) over x (and y, z for the update modes):
// contiguous fp32 CPU tensors of one length.
double stream_pass(const torch::Tensor& x, const std::optional<torch::Tensor>& y,
                   const std::optional<torch::Tensor>& z, const std::string& mode, int repeats) {
  const auto check = [&](const torch::Tensor& t, const char* name) -> float* {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous() &&
                    t.numel() == x.numel(),
                "stream_pass: ", name, " must be a contiguous float32 CPU tensor of ", x.numel(), " elements");
    return t.data_ptr<float>();
  };
  float* xp = check(x, "x");
  float* yp = y.has_value() ? check(*y, "y") : nullptr;
  float* zp = z.has_value() ? check(*z, "z") : nullptr;
  TORCH_CHECK(mode == "read" || (mode == "update" && zp != nullptr) || (mode == "update2" && yp && zp),
              "stream_pass: mode 'update' needs z, 'update2' needs y and z");
  pybind11::gil_scoped_release release;
  return fastlars::cpu::stream_pass(xp, yp, zp, x.numel(), mode, repeats);
}

// The native CUDA launch plan (csrc/cuda/launch_plan.h) of one op call, computed on the host from the
// tensors' sizes and a GPU's figures: the same function the CUDA build plans its launches with.
pybind11::dict cuda_plan(const std::string& op, const std::vector<std::vector<int64_t>>& buckets, int sm_count,
                         int64_t l2_bytes, const std::string& plan, bool adapt) {
  using namespace fastlars::cuda;
  Op kind;
  if (op == "grad_norms") {
    kind = Op::kGradNorms;
  } else if (op == "lars") {
    kind = Op::kLars;
  } else if (op == "lamb") {
    kind = Op::kLamb;
  } else {
    throw std::invalid_argument("op: expected 'grad_norms', 'lars' or 'lamb', got '" + op + "'");
  }
  if (sm_count < 1 || l2_bytes < 0) throw std::invalid_argument("sm_count must be >= 1 and l2_bytes >= 0");
  const LaunchPlan p = plan_launches(kind, adapt, buckets, sm_count, l2_bytes, parse_plan(plan));
  std::vector<int> grids;
  std::vector<int64_t> waves;
  std::vector<bool> chunked;
  for (const Launch& l : p.launches) {
    grids.push_back(l.grid);
    waves.push_back(l.wave);
    chunked.push_back(l.chunked);
  }
  pybind11::dict out;
  out["waves"] = p.waves;
  out["launches"] = static_cast<int64_t>(p.launches.size());
  out["grid"] = grids;
  out["wave"] = waves;
  out["chunked"] = chunked;
  out["total_chunks"] = p.total_chunks;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlars compiled kernels";
  fastlars::cpu::register_host_plan(m);
  m.def("kernel_devices", &kernel_devices, "Device types this build has LARS/LAMB kernels for.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA sources were compiled in.");
  m.def("cpu_isa", &cpu_isa,
        "Instruction set of the CPU element loops in use: avx512, avx2 or baseline (FASTLARS_CPU_ISA caps it).");
  m.def("cpu_parallel", &cpu_parallel,
        "The CPU kernels' parallel runtime ('openmp', 'native' or 'serial'), torch's intra-op thread count, and "
        "how many distinct threads ran a probe pass through the kernels' chunk loop (threads_used), and the "
        "shared library providing the OpenMP runtime (library).");
  m.def("cpu_cache_plan", &cpu_cache_plan,
        "The figures the CPU kernels plan their two passes with: the last-level cache in bytes as the OS "
        "reports it (0 if unknown), the elements per tensor group (group_elements) and the largest group whose "
        "LAMB direction u is kept between the passes (lamb_workspace_elements: FASTLARS_LAMB_WORKSPACE_ELEMENTS, "
        "else a quarter of the cache at 20 B per element, at least group_elements).");
  m.def("cpu_last_step_threads", &fastlars::cpu::last_step_threads,
        "Threads that ran chunks of the widest pass of the last fastlars CPU op (0 before any).");
  m.def("stream_pass", &stream_pass, pybind11::arg("x"), pybind11::arg("y") = pybind11::none(),
        pybind11::arg("z") = pybind11::none(), pybind11::arg("mode") = "read", pybind11::arg("repeats") = 5,
        "Streaming-bandwidth probe on the intra-op threads, seconds of the fastest of `repeats` passes. mode "
        "'read': sum of x (reads x); 'update': x = c*x + z (reads x, z; writes x); 'update2': x = c*x + z, "
        "y = c*y + z (reads x, y, z; writes x, y).");
  m.def("cuda_plan", &cuda_plan, pybind11::arg("op"), pybind11::arg("buckets"), pybind11::arg("sm_count"),
        pybind11::arg("l2_bytes"), pybind11::arg("plan") = "wave", pybind11::arg("adapt") = true,
        "The native CUDA kernels' launch plan for one op call (csrc/cuda/launch_plan.h), from element counts "
        "grouped by storage bucket, an SM count and an L2 size in bytes; plan 'wave' or 'onepass'. Returns "
        "waves, launches, and per launch its grid, wave and whether it is a chunk kernel.");
}
