// LARS's trust-ratio pass, shared by the CPU ops with fp32 state (ops.cpp) and with low-precision state
// (lowbit_ops.cpp): the grad_norms argument's rule, then per tensor group (tensor_groups.h) ||w|| of the
// group's tensors (and ||g|| in the same pass when no norms were given), their ratios, and the group's
// update, which finds w (and g) of the group still in cache.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "../common/step_math.h"
#include "kernels.h"
#include "multi_tensor.h"
#include "op_checks.h"
#include "tensor_groups.h"

namespace fastlars::cpu {

// grad_norms of a LARS op over n params: n per-tensor ||g|| (already divided by grad_scale), or empty, which
// asks the op to take ||g|| in its ||w|| pass. Returns whether it is empty (the fold).
inline bool lars_folds_grad_norms(const at::Tensor& grad_norms, size_t n) {
  const bool fold = grad_norms.numel() == 0;
  TORCH_CHECK(grad_norms.device().is_cpu() && grad_norms.scalar_type() == at::kFloat && grad_norms.dim() == 1 &&
                  (fold || grad_norms.numel() == static_cast<int64_t>(n)),
              "grad_norms: expected a 1-D float32 CPU tensor of ", n, " elements (or none: computed in the step), "
              "got ", grad_norms.scalar_type(), " of shape ", grad_norms.sizes(), " on ", grad_norms.device());
  return fold;
}

struct LarsRatioArgs {
  float rate;  // the step's lr
  float trust_coefficient;
  float weight_decay;
  float eps;
  bool trust_clip;
  checks::Bounds bounds;
};

// For each tensor group of `chunks`: ratios[i] = lars_ratio(||w_i||, ||g_i||) of its tensors, ||w|| (and with
// `fold`, ||g|| / scale) as the chunk sums in chunk order, in double (as grad_norms_cpu computes ||g||), then
// update(first_chunk, chunk_count). `ts` holds weight/grad slots per tensor and numel. `known_w_norms`, when
// given, holds per tensor the ||w|| its weights still have (carried from the previous step's update by
// lars_update_norm, the same bits as this pass computes) or a negative value: a known norm is not summed
// again, and a group with every norm known and no ||g|| to fold skips its norm pass; consecutive such groups
// are updated in one call (one pass over the thread pool instead of one per group).
template <typename Tensors, typename Update>
void lars_ratios_then_update(const ElementKernels& kernels, const std::vector<Chunk>& chunks, const Tensors& ts,
                             const at::Tensor& grad_norms, bool fold, std::optional<float> scale,
                             const LarsRatioArgs& a, std::vector<float>& ratios, const Update& update,
                             const std::vector<float>* known_w_norms = nullptr) {
  const at::Tensor norms = fold ? grad_norms : grad_norms.contiguous();
  const float* given_norm = fold ? nullptr : norms.data_ptr<float>();
  const auto known = [&](size_t i) { return known_w_norms != nullptr && (*known_w_norms)[i] >= 0.0f; };
  const GroupPlan plan = plan_groups(chunks, ts.numel);
  const int stride = fold ? 2 : 1;
  std::vector<float> partials(stride * chunks.size());
  size_t pending_first = 0, pending_end = 0;  // chunks of the groups whose ratios are set, not yet updated
  const auto flush = [&] {
    if (pending_end > pending_first) update(chunks.data() + pending_first, static_cast<int64_t>(pending_end - pending_first));
    pending_first = pending_end;
  };
  for (const TensorGroup& group : plan.groups) {
    const Chunk* first = chunks.data() + group.first_chunk;
    const int64_t count = static_cast<int64_t>(group.end_chunk - group.first_chunk);
    bool norm_pass = fold;
    for (size_t i = group.first_tensor; i < group.end_tensor && !norm_pass; ++i) norm_pass = !known(i);
    if (norm_pass) {
      flush();
      for_each_chunk(first, count, 1, [&](int64_t k, const Chunk& c, float* scratch) {
        float* sums = &partials[stride * (group.first_chunk + k)];
        if (!known(static_cast<size_t>(c.tensor))) {
          sums[0] = kernels.sum_of_squares(load(ts.weight[c.tensor], c.begin, c.size, scratch), c.size);
        }
        if (fold) sums[1] = kernels.sum_of_squares(load(ts.grad[c.tensor], c.begin, c.size, scratch), c.size);
      });
    }
    for (size_t i = group.first_tensor; i < group.end_tensor; ++i) {
      float g_norm = 0.0f;
      if (fold) {
        g_norm = static_cast<float>(std::sqrt(plan.tensor_sum(partials, i, 2, 1)));
        if (scale.has_value()) g_norm = g_norm / *scale;
      } else {
        g_norm = given_norm[i];
      }
      const float w_norm = known(i) ? (*known_w_norms)[i]
                                    : static_cast<float>(std::sqrt(plan.tensor_sum(partials, i, stride, 0)));
      ratios[i] = math::lars_ratio(w_norm, g_norm, a.rate, a.trust_coefficient, a.weight_decay, a.eps, true,
                                   a.trust_clip, a.bounds.has, a.bounds.lo, a.bounds.hi);
    }
    if (norm_pass) {  // its update follows its norm pass while the group's arrays are still cached
      update(first, count);
      pending_first = pending_end = group.end_chunk;
    } else {
      pending_end = group.end_chunk;
    }
  }
  flush();
}

// After an update that summed each chunk's Σw'² of the new weights into next_partials: next_w_norms[i] =
// ||w'_i|| for each tensor i where carried(i), the chunk sums added per tensor in chunk order and in double,
// as the norm pass adds them, so the same bits.
template <typename Carried>
void store_carried_norms(const std::vector<Chunk>& chunks, const std::vector<float>& next_partials,
                         const Carried& carried, std::vector<float>& next_w_norms) {
  const std::vector<double> sums = per_tensor_sums(chunks, next_partials, next_w_norms.size());
  for (size_t i = 0; i < next_w_norms.size(); ++i) {
    if (carried(i)) next_w_norms[i] = static_cast<float>(std::sqrt(sums[i]));
  }
}

}  // namespace fastlars::cpu
