// The pybind11 module fastlars._C. It reports which devices its kernels were built for, so the
// Python side can tell "not built" from "built without CUDA".
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/parallel.h"

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
  out["threads"] = r.threads;
  out["threads_used"] = r.threads_used;
  out["probe_chunks"] = r.probe_chunks;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlars compiled kernels";
  m.def("kernel_devices", &kernel_devices, "Device types this build has LARS/LAMB kernels for.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA sources were compiled in.");
  m.def("cpu_isa", &cpu_isa,
        "Instruction set of the CPU element loops in use: avx512, avx2 or baseline (FASTLARS_CPU_ISA caps it).");
  m.def("cpu_parallel", &cpu_parallel,
        "The CPU kernels' parallel runtime ('openmp', 'native' or 'serial'), torch's intra-op thread count, and "
        "how many distinct threads ran a probe pass through the kernels' chunk loop (threads_used).");
}
