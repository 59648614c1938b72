// The element loops for any CPU (x86-64: SSE2), the build every other one must equal bit for bit.
#include <cstdint>
#include <math.h>

#define FASTLARS_HD static inline __attribute__((always_inline))
#define FASTLARS_ISA_NAMESPACE isa_baseline
#define FASTLARS_ISA_NAME "baseline"
#include "kernels.h"
#include "kernels.inc"
