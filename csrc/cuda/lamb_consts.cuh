// LAMB's per-tensor constants on the device (bias corrections from the step count t read on the device, lr
// read on the device when it is a tensor), shared by the fp32 kernels (lamb.cu) and the low-precision ones
// (lowbit.cu).
#pragma once

#include "launch.h"
#include "multi_tensor_apply.cuh"
#include "step_math.cuh"

namespace fastlars::cuda {

__device__ __forceinline__ math::LambConsts lamb_consts(const LambOptions& opt, const StepScalars& s, int idx) {
  math::LambConsts c;
  c.beta1 = opt.beta1;
  c.beta2 = opt.beta2;
  c.beta3 = opt.beta3;
  c.one_minus_beta2 = opt.one_minus_beta2;
  if (opt.bias_correction) {
    const float t = opt.steps[idx];
    c.inv_bc1 = 1.0f / (1.0f - powf(opt.beta1, t));
    c.inv_bc2 = 1.0f / (1.0f - powf(opt.beta2, t));
  } else {
    c.inv_bc1 = 1.0f;
    c.inv_bc2 = 1.0f;
  }
  c.eps = opt.eps;
  c.weight_decay = opt.weight_decay;
  c.has_decay = opt.weight_decay != 0.0f;
  c.lr = read_lr(s);
  c.decoupled = opt.decoupled_decay;
  return c;
}

}  // namespace fastlars::cuda
