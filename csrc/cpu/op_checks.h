// Argument checks and host-side scalars shared by the CPU ops (ops.cpp: fp32 state, lowbit_ops.cpp:
// low-precision state): each failure names the argument and the tensor's position.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <vector>

#include "kernels.h"

namespace fastlars::cpu {
namespace checks {

inline void check_supported_dtype(const at::Tensor& t, const char* what, size_t i) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, what, "[", i, "]: dtype ", type,
              " is not supported by the CPU kernels (float32, bfloat16 or float16)");
}

inline void check_dense_cpu(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), what, "[", i, "]: on ", t.device(), "; these are the CPU kernels");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), what, "[", i,
              "]: the CPU kernels need a dense tensor (contiguous or a permutation of it)");
}

// Element-wise kernels walk storage linearly: a companion tensor must order its elements as its param does.
inline void check_like(const at::Tensor& t, const at::Tensor& param, const char* what, size_t i) {
  check_dense_cpu(t, what, i);
  TORCH_CHECK(t.sizes() == param.sizes(), what, "[", i, "]: shape ", t.sizes(), " differs from its param's ",
              param.sizes());
  bool same_order = true;
  for (int64_t d = 0; d < param.dim(); ++d) same_order &= param.size(d) == 1 || t.stride(d) == param.stride(d);
  TORCH_CHECK(same_order, what, "[", i, "]: strides ", t.strides(), " order its elements differently from its "
              "param's ", param.strides());
}

inline void check_count(size_t n, at::TensorList list, const char* what) {
  TORCH_CHECK(list.size() == n, what, ": holds ", list.size(), " tensors, params hold ", n);
}

// The value of an optional one-element CPU tensor, or `absent`.
inline std::optional<float> host_scalar(const std::optional<at::Tensor>& t, const char* what) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->device().is_cpu(), what, ": on ", t->device(), ", the params are on the CPU");
  TORCH_CHECK(t->numel() == 1, what, ": expected one element, got ", t->numel());
  return t->item<float>();
}

struct Bounds {
  bool has = false;
  float lo = 0.0f;
  float hi = 0.0f;
};

inline Bounds ratio_bounds(const std::optional<at::ArrayRef<double>>& bounds) {
  if (!bounds.has_value()) return {};
  TORCH_CHECK(bounds->size() == 2 && (*bounds)[0] <= (*bounds)[1],
              "trust_ratio_bounds: expected (lo, hi) with lo <= hi, got ", *bounds);
  return {true, static_cast<float>((*bounds)[0]), static_cast<float>((*bounds)[1])};
}

// The optional trust_ratios output (one fp32 per param, on the CPU, contiguous), or nullptr.
inline float* ratio_output(const std::optional<at::Tensor>& out, size_t n) {
  if (!out.has_value() || !out->defined()) return nullptr;
  TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == at::kFloat && out->dim() == 1 &&
                  out->numel() == static_cast<int64_t>(n) && out->is_contiguous(),
              "trust_ratios: expected a contiguous 1-D float32 CPU tensor of ", n, " elements, got ",
              out->scalar_type(), " of shape ", out->sizes(), " on ", out->device());
  return out->data_ptr<float>();
}

// Per-tensor arguments of the LAMB element loops from an op's options: β3 and 1 − β2 rounded from double
// as the reference does, and each tensor's bias corrections 1 / (1 − β^t) from its step count t.
inline std::vector<LambArgs> lamb_args(at::TensorList steps, const std::optional<float>& scale,
                                       const std::optional<float>& clip, float rate, double beta1, double beta2,
                                       double eps, double weight_decay, bool bias_correction, bool grad_averaging,
                                       bool decoupled_decay, bool maximize) {
  std::vector<LambArgs> args(steps.size());
  for (size_t i = 0; i < args.size(); ++i) {
    args[i].scaled = scale.has_value();
    args[i].maximize = maximize;
    args[i].scale = scale.value_or(1.0f);
    args[i].clip = clip.value_or(1.0f);
    math::LambConsts& c = args[i].consts;
    c.beta1 = static_cast<float>(beta1);
    c.beta2 = static_cast<float>(beta2);
    c.beta3 = static_cast<float>(grad_averaging ? 1.0 - beta1 : 1.0);
    c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    c.eps = static_cast<float>(eps);
    c.weight_decay = static_cast<float>(weight_decay);
    c.lr = rate;
    c.has_decay = weight_decay != 0.0;
    c.decoupled = decoupled_decay;
    c.inv_bc1 = c.inv_bc2 = 1.0f;
    if (bias_correction) {
      const float t = host_scalar(steps[i], "steps").value();
      c.inv_bc1 = 1.0f / (1.0f - powf(c.beta1, t));
      c.inv_bc2 = 1.0f / (1.0f - powf(c.beta2, t));
    }
  }
  return args;
}

}  // namespace checks
}  // namespace fastlars::cpu
