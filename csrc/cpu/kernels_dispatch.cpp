// Picks the element-loop build (kernels.h) for the CPU this process runs on.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace fastlars::cpu {
namespace {

// Rank of an instruction-set name (FASTLARS_CPU_ISA), the highest when unset or unknown.
int isa_cap() {
  const char* cap = std::getenv("FASTLARS_CPU_ISA");
  if (cap == nullptr) return 2;
  if (std::strcmp(cap, "baseline") == 0) return 0;
  if (std::strcmp(cap, "avx2") == 0) return 1;
  return 2;
}

const ElementKernels& choose() {
#ifdef FASTLARS_CPU_X86_BUILDS
  __builtin_cpu_init();
  const int cap = isa_cap();
  if (cap >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return isa_avx512::kernels;
  }
  if (cap >= 1 && __builtin_cpu_supports("avx2")) return isa_avx2::kernels;
#endif
  return isa_baseline::kernels;
}

}  // namespace

const ElementKernels& element_kernels() {
  static const ElementKernels& chosen = choose();
  return chosen;
}

}  // namespace fastlars::cpu
