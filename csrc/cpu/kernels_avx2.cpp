// The element loops for x86-64 CPUs with AVX2 (8 floats per vector). No "fma": a fused multiply-add
// would round differently from the baseline build and the reference (setup.py also turns contraction off).
#include <immintrin.h>

#include <cstdint>
#include <math.h>

// The shared maths as static functions compiled for the baseline: inlined into the loops below, which
// are compiled for the target; no copy of them built for the target can leak to other files.
#define FASTLARS_HD static inline __attribute__((always_inline))
#include "kernels.h"

#ifdef FASTLARS_CPU_X86_BUILDS
#pragma GCC target("avx2")
#define FASTLARS_ISA_NAMESPACE isa_avx2
#define FASTLARS_ISA_NAME "avx2"
#define FASTLARS_INT8_LAMB_AVX2 1  // LAMB's int8-state loops from int8_lamb_avx2.inc (intrinsics)
#define FASTLARS_INT8_LARS_AVX2 1  // LARS's int8-momentum loop from int8_lars_avx2.inc (intrinsics)
#include "kernels.inc"
#endif
