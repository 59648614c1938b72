// The checks every step op makes of a param's gradient and of its fp32 master, shared by the CPU ops
// (csrc/cpu: ops.cpp, lowbit_ops.cpp) and the CUDA glue (csrc/cuda: ops.cpp, lowbit_ops.cpp), each passing
// its own check_like (device, density and element-order rules of its kernels). Host code (ATen).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace fastlars::param_checks {

// Checks grad against its param p (check_like, the same dtype) and masters[i] when p has one, an fp32 tensor
// like p; returns whether it has one. masters is empty (no masters) or holds one entry per param, where an
// entry that is the param itself (or shares its storage) means: no master for this one.
template <typename CheckLike>
bool check_grad_and_master(const at::Tensor& p, const at::Tensor& grad, at::TensorList masters, size_t i,
                           const CheckLike& check_like) {
  check_like(grad, p, "grads", i);
  TORCH_CHECK(grad.scalar_type() == p.scalar_type(), "grads[", i, "]: dtype ", grad.scalar_type(),
              " differs from its param's ", p.scalar_type());
  const bool master =
      !masters.empty() && !masters[i].is_same(p) && !(p.numel() > 0 && masters[i].data_ptr() == p.data_ptr());
  if (master) {
    check_like(masters[i], p, "master_params", i);
    TORCH_CHECK(masters[i].scalar_type() == at::kFloat, "master_params[", i, "]: expected float32, got ",
                masters[i].scalar_type());
  }
  return master;
}

}  // namespace fastlars::param_checks
