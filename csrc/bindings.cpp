// The pybind11 module fastlars._C. It reports which devices its kernels were built for, so the
// Python side can tell "not built" from "built without CUDA".
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/kernels.h"

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlars compiled kernels";
  m.def("kernel_devices", &kernel_devices, "Device types this build has LARS/LAMB kernels for.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA sources were compiled in.");
  m.def("cpu_isa", &cpu_isa,
        "Instruction set of the CPU element loops in use: avx512, avx2 or baseline (FASTLARS_CPU_ISA caps it).");
}
