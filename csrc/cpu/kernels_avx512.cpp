// The element loops for x86-64 CPUs with AVX-512 F, BW, VL and DQ (16 floats per vector, 512-bit vectors
// preferred; every AVX-512 CPU since Skylake-SP and Zen 4 has all four). BW/VL/DQ let the int8 state loops
// convert and pack bytes in 512-bit registers (F alone drops them to 256-bit AVX2 forms): ResNet-50 int8
// LAMB step 55-58 -> 50-51 ms on a 2-core Zen 4 EPYC, the same bits.
// AVX-512F has fused multiply-adds; setup.py compiles with -ffp-contract=off so none is formed.
#include <immintrin.h>

#include <cstdint>
#include <math.h>

// The shared maths as static functions compiled for the baseline: inlined into the loops below, which
// are compiled for the target; no copy of them built for the target can leak to other files.
#define FASTLARS_HD static inline __attribute__((always_inline))
#include "kernels.h"

#ifdef FASTLARS_CPU_X86_BUILDS
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#define FASTLARS_ISA_NAMESPACE isa_avx512
#define FASTLARS_ISA_NAME "avx512"
#define FASTLARS_INT8_LAMB_AVX512 1  // LAMB's int8-state loops from int8_lamb_avx512.inc (intrinsics)
#define FASTLARS_INT8_LARS_AVX512 1  // LARS's int8-momentum loop from int8_lars_avx512.inc (intrinsics)
#include "kernels.inc"
#endif
