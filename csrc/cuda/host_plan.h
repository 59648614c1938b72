// Host side of a multi-tensor call, without ATen: dtype buckets, wave plans, kernel-argument
// tables and option records. ops.cpp (the torch glue) and the host emulation tests share it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "launch.h"

namespace fastlars::cuda {

// The raw tensors of one call: ptr[l][i] is list l's storage for the call's tensor i (null when
// absent, e.g. no master copy), numel[i] its size, storage[i] how it is stored.
struct CallTensors {
  std::vector<std::vector<void*>> ptr;
  std::vector<int64_t> numel;
  std::vector<Storage> storage;
};

struct Bucket {
  Storage storage;
  std::vector<int64_t> members;  // positions in the call's lists
  Plan plan;
};

struct CallPlan {
  std::vector<Bucket> buckets;
  int64_t total_chunks = 0;  // chunk ids run over the whole call, bucket after bucket
};

// Groups the tensors by storage and plans each bucket's waves (tables of `Table::kCapacity`
// tensors; a wave closes after `wave_bytes` first-pass bytes at `bytes_per_elem`, 0: no limit).
template <typename Table>
CallPlan plan_call(const CallTensors& call, int64_t bytes_per_elem, int64_t wave_bytes) {
  CallPlan out;
  for (size_t i = 0; i < call.storage.size(); ++i) {
    const Storage s = call.storage[i];
    auto it = std::find_if(out.buckets.begin(), out.buckets.end(),
                           [&](const Bucket& b) { return b.storage.param == s.param && b.storage.master == s.master; });
    if (it == out.buckets.end()) it = out.buckets.insert(out.buckets.end(), Bucket{s, {}, {}});
    it->members.push_back(static_cast<int64_t>(i));
  }
  for (Bucket& b : out.buckets) {
    std::vector<int64_t> sizes;
    for (int64_t m : b.members) sizes.push_back(call.numel[m]);
    b.plan = plan_waves(sizes, Table::kCapacity, kChunk, bytes_per_elem, wave_bytes, out.total_chunks);
    out.total_chunks = b.plan.total_chunks;
  }
  return out;
}

// Calls fn(table, storage, wave) for every wave of the plan, in order.
template <int Depth, typename Fn>
void for_each_wave(const CallPlan& plan, const CallTensors& call, Fn&& fn) {
  for (const Bucket& b : plan.buckets) {
    for (const Wave& w : b.plan.waves) {
      TensorTable<Depth> t;
      t.count = static_cast<int32_t>(w.count);
      t.first_chunk = w.first_chunk;
      int64_t end = 0;
      for (int64_t s = 0; s < w.count; ++s) {
        const int64_t pos = b.members[b.plan.tensors[w.first + s]];
        for (int l = 0; l < Depth; ++l) t.ptr[l][s] = call.ptr[l][pos];
        t.numel[s] = call.numel[pos];
        end += chunk_count(t.numel[s], kChunk);
        t.chunk_end[s] = end;
        t.index[s] = static_cast<int32_t>(pos);
      }
      fn(t, b.storage, w);
    }
  }
}

inline LarsOptions make_lars_options(double momentum, double weight_decay, double trust_coefficient, double eps,
                                     bool nesterov, bool trust_clip, bool mlperf_momentum, bool adapt,
                                     bool has_bounds, double lo, double hi, bool maximize, const float* grad_norms) {
  LarsOptions o{};
  o.momentum = static_cast<float>(momentum);
  o.weight_decay = static_cast<float>(weight_decay);
  o.trust_coefficient = static_cast<float>(trust_coefficient);
  o.eps = static_cast<float>(eps);
  o.nesterov = nesterov;
  o.trust_clip = trust_clip;
  o.mlperf_style = mlperf_momentum;
  o.adapt = adapt;
  o.has_bounds = has_bounds;
  o.ratio_lo = static_cast<float>(lo);
  o.ratio_hi = static_cast<float>(hi);
  o.maximize = maximize;
  o.grad_norms = grad_norms;
  return o;
}

// 1 − β1 and 1 − β2 are formed in double and rounded once, as the reference's Python floats are.
inline LambOptions make_lamb_options(double beta1, double beta2, double eps, double weight_decay, bool bias_correction,
                                     bool grad_averaging, bool decoupled_decay, bool trust_clip, bool adapt,
                                     bool has_bounds, double lo, double hi, bool maximize, const float* steps,
                                     const float* clip_coef) {
  LambOptions o{};
  o.beta1 = static_cast<float>(beta1);
  o.beta2 = static_cast<float>(beta2);
  o.beta3 = static_cast<float>(grad_averaging ? 1.0 - beta1 : 1.0);
  o.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  o.eps = static_cast<float>(eps);
  o.weight_decay = static_cast<float>(weight_decay);
  o.bias_correction = bias_correction;
  o.grad_averaging = grad_averaging;
  o.decoupled_decay = decoupled_decay;
  o.trust_clip = trust_clip;
  o.adapt = adapt;
  o.has_bounds = has_bounds;
  o.ratio_lo = static_cast<float>(lo);
  o.ratio_hi = static_cast<float>(hi);
  o.maximize = maximize;
  o.steps = steps;
  o.clip_coef = clip_coef;
  return o;
}

}  // namespace fastlars::cuda
