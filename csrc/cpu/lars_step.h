// The CPU lars_step_ with each tensor's ||w|| carried from one step to the next (fastlars._C.HostPlan).
//
// LARS's ratio needs ||w|| before any element of a tensor is updated, and reading w for it is a pass of
// 4 B per element beside the update's 20 B (a tensor larger than the caches is read twice). The update
// writes w, so it can sum ||w'||² of the new weights on the way (lars_update_norm: the lanes and order of
// the norm pass, so the same bits); the next step reuses that norm while the weights are unchanged, which
// only the caller can tell (HostPlan checks each weight's version counter and storage). Per step:
// 24 B per element where the norm is known, 28 B where it is not. lars_lowbit_step_carrying_norms does the
// same for lars_lowbit_step_ (lowbit_ops.cpp: bf16 or int8 momentum), summing ||w'||² over each chunk it
// has just updated (still in cache) with the norm pass's own function and chunks.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fastlars::cpu {

// lars_step_ (ops.cpp; the same arguments and results) with, per tensor, `known_w_norms` (may be null): the
// ||w|| its weights (the fp32 master where there is one) have now, or a negative value when unknown; and
// `next_w_norms` (may be null): resized to one entry per tensor, ||w|| of the new weights where the step
// updated fp32 weights of an adapting group, else -1 (a skipped step leaves it at -1 everywhere).
void lars_step_carrying_norms(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                              at::TensorList master_params, const at::Tensor& grad_norms, double lr,
                              const std::optional<at::Tensor>& lr_tensor, double momentum, double weight_decay,
                              double trust_coefficient, double eps, bool nesterov, bool trust_clip,
                              bool mlperf_momentum, bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds,
                              bool maximize, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& trust_ratios,
                              const std::vector<float>* known_w_norms, std::vector<float>* next_w_norms);

// lars_lowbit_step_ (lowbit_ops.cpp; the same arguments and results) with known_w_norms / next_w_norms as
// above (weights rounded stochastically to bf16 are never carried).
void lars_lowbit_step_carrying_norms(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                     at::TensorList momentum_absmax, at::TensorList master_params,
                                     const at::Tensor& grad_norms, at::TensorList steps, at::IntArrayRef tensor_keys,
                                     double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                                     double weight_decay, double trust_coefficient, double eps, bool nesterov,
                                     bool trust_clip, bool mlperf_momentum, bool adapt,
                                     std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                                     const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf,
                                     const std::optional<at::Tensor>& trust_ratios,
                                     const std::vector<float>* known_w_norms, std::vector<float>* next_w_norms);

}  // namespace fastlars::cpu
