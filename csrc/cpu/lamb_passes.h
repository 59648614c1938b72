// LAMB's two passes over a param group, group of tensors by group (tensor_groups.h), shared by the CPU ops
// with fp32 state (ops.cpp) and with low-precision state (lowbit_ops.cpp), which differ only in their chunk
// bodies:
//   pass 1, per chunk: the moments and the direction u, with the chunk's partial sums Σw'² and Σu²; u goes
//           to the workspace when the group stores it (its arrays fit the caches, max_stored_elements);
//   then, per tensor of the group: ratio = lamb_ratio(||w||, ||u||) of the chunk sums (in chunk order, in
//           double) and its step = lr·ratio;
//   pass 2, per chunk, from the end of each thread's range (what pass 1 read last, still cached): w ← w − step·u.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/step_math.h"
#include "multi_tensor.h"
#include "op_checks.h"
#include "tensor_groups.h"

namespace fastlars::cpu {

struct LambRatioArgs {
  float rate;  // the step's lr
  bool adapt;
  bool trust_clip;
  checks::Bounds bounds;
};

// Runs both passes over `chunks` (of tensors of `numel` elements). pass1(chunk, scratch, u, sums) gets
// `pass1_arrays` scratch arrays, the chunk's slice of the workspace or nullptr (the group recomputes u in
// pass 2) and where to write its two partial sums; pass2(chunk, scratch, u, step) gets
// `pass2_arrays` scratch arrays, the same u and its tensor's step. ratio_out, when given, receives each
// tensor's ratio.
template <typename Pass1, typename Pass2>
void lamb_group_passes(const std::vector<Chunk>& chunks, const std::vector<int64_t>& numel, const LambRatioArgs& a,
                       float* ratio_out, int pass1_arrays, const Pass1& pass1, int pass2_arrays, const Pass2& pass2) {
  const GroupPlan plan = plan_groups(chunks, numel);
  const int64_t stored_limit = max_stored_elements();
  float* const workspace = update_workspace(plan, stored_limit);
  std::vector<float> partials(2 * chunks.size());
  std::vector<float> steps_by_tensor(numel.size(), a.rate);
  for (const TensorGroup& group : plan.groups) {
    const bool store_u = group.elements <= stored_limit;
    const Chunk* first = chunks.data() + group.first_chunk;
    const int64_t count = static_cast<int64_t>(group.end_chunk - group.first_chunk);
    const auto u_of = [&](const Chunk& c) -> float* {
      return store_u ? workspace + plan.offset[c.tensor] + c.begin : nullptr;
    };

    for_each_chunk(first, count, pass1_arrays, [&](int64_t k, const Chunk& c, float* scratch) {
      pass1(c, scratch, u_of(c), &partials[2 * (group.first_chunk + k)]);
    });

    for (size_t i = group.first_tensor; i < group.end_tensor; ++i) {
      const float w_norm = static_cast<float>(std::sqrt(plan.tensor_sum(partials, i, 2, 0)));
      const float u_norm = static_cast<float>(std::sqrt(plan.tensor_sum(partials, i, 2, 1)));
      const float ratio =
          math::lamb_ratio(w_norm, u_norm, a.adapt, a.trust_clip, a.bounds.has, a.bounds.lo, a.bounds.hi);
      steps_by_tensor[i] = a.rate * ratio;
      if (ratio_out != nullptr) ratio_out[i] = ratio;
    }

    for_each_chunk(first, count, pass2_arrays, [&](int64_t, const Chunk& c, float* scratch) {
      pass2(c, scratch, u_of(c), steps_by_tensor[c.tensor]);
    }, Order::back);
  }
}

}  // namespace fastlars::cpu
