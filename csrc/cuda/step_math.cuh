// The CUDA kernels' per-element maths: csrc/common/step_math.h, shared with the CPU kernels.
#pragma once

#include "../common/step_math.h"

namespace fastlars::cuda {
namespace math = ::fastlars::math;
}  // namespace fastlars::cuda
