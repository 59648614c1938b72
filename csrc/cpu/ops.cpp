// The CPU kernels of the fastlars ops (schemas in fastlars/_ops.py), registered for the CPU dispatch
// key. Each op handles the whole tensor list of a param group in parallel passes over chunks of all
// tensors (multi_tensor.h), with the per-element arithmetic of csrc/common/step_math.h.
//
// grad_norms:  out[i] = ||g_i|| / grad_scale                         one pass, reads g
// lars_step_:  pass 1 ||w_i|| (adapting groups only); pass 2 the update   reads w twice, g and v once
// lamb_step_:  pass 1 new m, v (written when fp32) and ||w_i||, ||u_i||; pass 2 recomputes u from the
//              stored moments and writes w (bf16/fp16 moments: recomputed from the old ones and g, so
//              u never sees rounded moments, as in the reference); groups that do not adapt take one pass.
// Scalars held in tensors (lr_tensor, grad_scale, found_inf, clip_coef, steps) live on the CPU here,
// so reading them costs no synchronisation; found_inf != 0 returns before anything is written.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../common/step_math.h"
#include "multi_tensor.h"

namespace fastlars::cpu {
namespace {

// ---------------------------------------------------------------------------------- checks
void check_supported_dtype(const at::Tensor& t, const char* what, size_t i) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, what, "[", i, "]: dtype ", type,
              " is not supported by the CPU kernels (float32, bfloat16 or float16)");
}

void check_dense_cpu(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), what, "[", i, "]: on ", t.device(), "; these are the CPU kernels");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), what, "[", i,
              "]: the CPU kernels need a dense tensor (contiguous or a permutation of it)");
}

// Element-wise kernels walk storage linearly: a companion tensor must order its elements as its param does.
void check_like(const at::Tensor& t, const at::Tensor& param, const char* what, size_t i) {
  check_dense_cpu(t, what, i);
  TORCH_CHECK(t.sizes() == param.sizes(), what, "[", i, "]: shape ", t.sizes(), " differs from its param's ",
              param.sizes());
  bool same_order = true;
  for (int64_t d = 0; d < param.dim(); ++d) same_order &= param.size(d) == 1 || t.stride(d) == param.stride(d);
  TORCH_CHECK(same_order, what, "[", i, "]: strides ", t.strides(), " order its elements differently from its "
              "param's ", param.strides());
}

void check_count(size_t n, at::TensorList list, const char* what) {
  TORCH_CHECK(list.size() == n, what, ": holds ", list.size(), " tensors, params hold ", n);
}

// The value of an optional one-element CPU tensor, or `absent`.
std::optional<float> host_scalar(const std::optional<at::Tensor>& t, const char* what) {
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

Bounds ratio_bounds(const std::optional<at::ArrayRef<double>>& bounds) {
  if (!bounds.has_value()) return {};
  TORCH_CHECK(bounds->size() == 2 && (*bounds)[0] <= (*bounds)[1],
              "trust_ratio_bounds: expected (lo, hi) with lo <= hi, got ", *bounds);
  return {true, static_cast<float>((*bounds)[0]), static_cast<float>((*bounds)[1])};
}

// Per tensor: where its weight lives (the fp32 master, else the param) and whether a master exists.
struct StepTensors {
  std::vector<Slot> param, grad, weight;
  std::vector<std::vector<Slot>> buffers;
  std::vector<bool> master;
  std::vector<int64_t> numel;
  bool fp32_state = true;  // every buffer is fp32
};

StepTensors step_tensors(at::TensorList params, at::TensorList grads,
                         const std::vector<std::pair<at::TensorList, const char*>>& buffers,
                         at::TensorList masters) {
  const size_t n = params.size();
  check_count(n, grads, "grads");
  for (const auto& [list, name] : buffers) check_count(n, list, name);
  TORCH_CHECK(masters.empty() || masters.size() == n, "master_params: holds ", masters.size(),
              " tensors; expected none or one per param (", n, ")");
  StepTensors out;
  out.buffers.resize(buffers.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_dense_cpu(p, "params", i);
    check_supported_dtype(p, "params", i);
    check_like(grads[i], p, "grads", i);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "grads[", i, "]: dtype ", grads[i].scalar_type(),
                " differs from its param's ", p.scalar_type());
    // An entry that is the param itself (or shares its storage) means: no master for this one.
    const bool master =
        !masters.empty() && !masters[i].is_same(p) && !(p.numel() > 0 && masters[i].data_ptr() == p.data_ptr());
    if (master) {
      check_like(masters[i], p, "master_params", i);
      TORCH_CHECK(masters[i].scalar_type() == at::kFloat, "master_params[", i, "]: expected float32, got ",
                  masters[i].scalar_type());
    }
    const at::ScalarType state_type = master ? at::kFloat : p.scalar_type();
    for (size_t b = 0; b < buffers.size(); ++b) {
      const auto& [list, name] = buffers[b];
      check_like(list[i], p, name, i);
      TORCH_CHECK(list[i].scalar_type() == state_type, name, "[", i, "]: dtype ", list[i].scalar_type(),
                  "; expected ", state_type, master ? " (fp32 with a master copy)" : " (the param dtype)");
      out.buffers[b].push_back({list[i].data_ptr(), state_type});
    }
    out.fp32_state &= state_type == at::kFloat;
    out.param.push_back({p.data_ptr(), p.scalar_type()});
    out.grad.push_back({grads[i].data_ptr(), grads[i].scalar_type()});
    out.weight.push_back(master ? Slot{masters[i].data_ptr(), at::kFloat} : out.param.back());
    out.master.push_back(master);
    out.numel.push_back(p.numel());
  }
  return out;
}

// Writes the new fp32 weights of a chunk: to the master (if any) and, rounded, to the param.
void store_weight(const StepTensors& ts, const Chunk& c, const float* w) {
  store(ts.weight[c.tensor], c.begin, c.size, w);
  if (ts.master[c.tensor]) store(ts.param[c.tensor], c.begin, c.size, w);
}

// ------------------------------------------------------------------------------ hot loops
// The options are template parameters, so after inlining the shared maths has no branch left in the
// element loops and they vectorise (gcc does not unswitch these loops on its own).
// Calls f.template operator()<B0, B1, ...>() with the runtime flags as compile-time constants.
template <bool... Fixed, typename F>
void with_flags(const F& f) {
  f.template operator()<Fixed...>();
}
template <bool... Fixed, typename F, typename... Rest>
void with_flags(const F& f, bool flag, Rest... rest) {
  if (flag) {
    with_flags<Fixed..., true>(f, rest...);
  } else {
    with_flags<Fixed..., false>(f, rest...);
  }
}

template <bool kScaled, bool kMaximize, bool kNesterov, bool kMlperf>
void lars_chunk(float* __restrict__ w, float* __restrict__ v, const float* __restrict__ g, int64_t n, float scale,
                float lr, float ratio, float momentum, float weight_decay) {
  const float* s = kScaled ? &scale : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = math::true_grad(g[i], s, kMaximize);
    math::lars_element(w[i], v[i], gi, lr, ratio, momentum, weight_decay, kNesterov, kMlperf);
  }
}

template <bool kScaled, bool kMaximize, bool kDecay, bool kDecoupled>
math::LambConsts fixed(math::LambConsts c) {
  c.has_decay = kDecay;
  c.decoupled = kDecoupled;
  return c;
}

// Pass 1 of LAMB: new moments in m, v (in place) and Σw², Σu² of the chunk (w itself untouched).
// Blocks of 16 elements with 16 partial sums each, so the loop vectorises without reassociating.
template <bool kScaled, bool kMaximize, bool kDecay, bool kDecoupled>
void lamb_moments_chunk(const float* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                        const float* __restrict__ g, int64_t n, float scale, float clip, math::LambConsts consts,
                        float* sums) {
  const math::LambConsts c = fixed<kScaled, kMaximize, kDecay, kDecoupled>(consts);
  const float* s = kScaled ? &scale : nullptr;
  float ww[16] = {}, uu[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 16; ++k) {
      float wi = w[i + k];
      const float gi = math::true_grad(g[i + k], s, kMaximize) * clip;
      const float u = math::lamb_element(wi, m[i + k], v[i + k], gi, c);
      ww[k] += wi * wi;
      uu[k] += u * u;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    float wi = w[i];
    const float gi = math::true_grad(g[i], s, kMaximize) * clip;
    const float u = math::lamb_element(wi, m[i], v[i], gi, c);
    ww[k] += wi * wi;
    uu[k] += u * u;
  }
  float sw = 0.0f, su = 0.0f;
  for (int k = 0; k < 16; ++k) {
    sw += ww[k];
    su += uu[k];
  }
  sums[0] = sw;
  sums[1] = su;
}

// Pass 2 of LAMB from stored fp32 moments: w ← w' − (lr·r)·u.
template <bool kScaled, bool kMaximize, bool kDecay, bool kDecoupled>
void lamb_apply_chunk(float* __restrict__ w, const float* __restrict__ m, const float* __restrict__ v, int64_t n,
                      math::LambConsts consts, float step) {
  const math::LambConsts c = fixed<kScaled, kMaximize, kDecay, kDecoupled>(consts);
  for (int64_t i = 0; i < n; ++i) {
    float wi = w[i];
    const float u = math::lamb_direction(wi, m[i], v[i], c);
    w[i] = wi - step * u;
  }
}

// One whole LAMB element pass (moments from the old ones and g, then the update): pass 2 with
// low-precision moments, and the only pass of a group that does not adapt.
template <bool kScaled, bool kMaximize, bool kDecay, bool kDecoupled>
void lamb_full_chunk(float* __restrict__ w, float* __restrict__ m, float* __restrict__ v, const float* __restrict__ g,
                     int64_t n, float scale, float clip, math::LambConsts consts, float step) {
  const math::LambConsts c = fixed<kScaled, kMaximize, kDecay, kDecoupled>(consts);
  const float* s = kScaled ? &scale : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    float wi = w[i];
    const float gi = math::true_grad(g[i], s, kMaximize) * clip;
    const float u = math::lamb_element(wi, m[i], v[i], gi, c);
    w[i] = wi - step * u;
  }
}

// ------------------------------------------------------------------------------------ ops
at::Tensor grad_norms_cpu(at::TensorList grads, const std::optional<at::Tensor>& grad_scale) {
  const size_t n = grads.size();
  std::vector<Slot> slots;
  std::vector<int64_t> numels;
  for (size_t i = 0; i < n; ++i) {
    check_dense_cpu(grads[i], "grads", i);
    check_supported_dtype(grads[i], "grads", i);
    slots.push_back({grads[i].data_ptr(), grads[i].scalar_type()});
    numels.push_back(grads[i].numel());
  }
  const std::optional<float> scale = host_scalar(grad_scale, "grad_scale");
  const std::vector<Chunk> chunks = plan_chunks(numels);
  std::vector<float> partials(chunks.size());
  for_each_chunk(chunks, 1, [&](int64_t k, const Chunk& c, float* scratch) {
    partials[k] = sum_of_squares(load(slots[c.tensor], c.begin, c.size, scratch), c.size);
  });
  const std::vector<double> sums = per_tensor_sums(chunks, partials, n);
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (size_t i = 0; i < n; ++i) {
    const float norm = static_cast<float>(std::sqrt(sums[i]));
    o[i] = scale.has_value() ? norm / *scale : norm;
  }
  return out;
}

void lars_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList master_params, const at::Tensor& grad_norms, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double momentum, double weight_decay,
                   double trust_coefficient, double eps, bool nesterov, bool trust_clip, bool mlperf_momentum,
                   bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const StepTensors ts = step_tensors(params, grads, {{momentum_buffers, "momentum_buffers"}}, master_params);
  const size_t n = params.size();
  TORCH_CHECK(grad_norms.device().is_cpu() && grad_norms.scalar_type() == at::kFloat && grad_norms.dim() == 1 &&
                  grad_norms.numel() == static_cast<int64_t>(n),
              "grad_norms: expected a 1-D float32 CPU tensor of ", n, " elements, got ", grad_norms.scalar_type(),
              " of shape ", grad_norms.sizes(), " on ", grad_norms.device());
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const std::optional<float> skip = host_scalar(found_inf, "found_inf");
  const std::optional<float> scale = host_scalar(grad_scale, "grad_scale");
  const float rate = host_scalar(lr_tensor, "lr_tensor").value_or(static_cast<float>(lr));
  if (skip.has_value() && *skip != 0.0f) return;

  const std::vector<Chunk> chunks = plan_chunks(ts.numel);
  std::vector<float> ratios(n, 1.0f);
  if (adapt) {
    std::vector<float> partials(chunks.size());
    for_each_chunk(chunks, 1, [&](int64_t k, const Chunk& c, float* scratch) {
      partials[k] = sum_of_squares(load(ts.weight[c.tensor], c.begin, c.size, scratch), c.size);
    });
    const std::vector<double> sums = per_tensor_sums(chunks, partials, n);
    const at::Tensor norms = grad_norms.contiguous();
    const float* g_norm = norms.data_ptr<float>();
    for (size_t i = 0; i < n; ++i) {
      ratios[i] = math::lars_ratio(static_cast<float>(std::sqrt(sums[i])), g_norm[i], rate,
                                   static_cast<float>(trust_coefficient), static_cast<float>(weight_decay),
                                   static_cast<float>(eps), true, trust_clip, bounds.has, bounds.lo, bounds.hi);
    }
  }
  const float scale_value = scale.value_or(1.0f);
  for_each_chunk(chunks, 3, [&](int64_t, const Chunk& c, float* scratch) {
    float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
    float* v = load(ts.buffers[0][c.tensor], c.begin, c.size, scratch + kChunk);
    const float* g = load(ts.grad[c.tensor], c.begin, c.size, scratch + 2 * kChunk);
    with_flags([&]<bool kScaled, bool kMaximize, bool kNesterov, bool kMlperf>() {
      lars_chunk<kScaled, kMaximize, kNesterov, kMlperf>(w, v, g, c.size, scale_value, rate, ratios[c.tensor],
                                                         static_cast<float>(momentum),
                                                         static_cast<float>(weight_decay));
    }, scale.has_value(), maximize, nesterov, mlperf_momentum);
    store(ts.buffers[0][c.tensor], c.begin, c.size, v);
    store_weight(ts, c, w);
  });
}

void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList master_params, at::TensorList steps, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                   double weight_decay, bool bias_correction, bool grad_averaging, bool decoupled_decay,
                   bool trust_clip, bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                   const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const StepTensors ts =
      step_tensors(params, grads, {{exp_avgs, "exp_avgs"}, {exp_avg_sqs, "exp_avg_sqs"}}, master_params);
  const size_t n = params.size();
  check_count(n, steps, "steps");
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const std::optional<float> skip = host_scalar(found_inf, "found_inf");
  const std::optional<float> scale = host_scalar(grad_scale, "grad_scale");
  const std::optional<float> clip = host_scalar(clip_coef, "clip_coef");
  const float rate = host_scalar(lr_tensor, "lr_tensor").value_or(static_cast<float>(lr));
  std::vector<math::LambConsts> consts(n);
  for (size_t i = 0; i < n; ++i) {
    math::LambConsts& c = consts[i];
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
  if (skip.has_value() && *skip != 0.0f) return;

  const float scale_value = scale.value_or(1.0f);
  const float clip_value = clip.value_or(1.0f);
  const bool has_decay = weight_decay != 0.0;
  const std::vector<Chunk> chunks = plan_chunks(ts.numel);
  const auto& m_slots = ts.buffers[0];
  const auto& v_slots = ts.buffers[1];
  std::vector<float> steps_by_tensor(n, rate);
  if (adapt) {
    std::vector<float> partials(2 * chunks.size());
    // When every moment is fp32, pass 1 writes them in place; otherwise it works on copies and pass 2
    // recomputes them from the old values.
    const auto moments = ts.fp32_state ? load : load_copy;
    for_each_chunk(chunks, 4, [&](int64_t k, const Chunk& c, float* scratch) {
      const float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
      float* m = moments(m_slots[c.tensor], c.begin, c.size, scratch + kChunk);
      float* v = moments(v_slots[c.tensor], c.begin, c.size, scratch + 2 * kChunk);
      const float* g = load(ts.grad[c.tensor], c.begin, c.size, scratch + 3 * kChunk);
      with_flags([&]<bool kScaled, bool kMaximize, bool kDecay, bool kDecoupled>() {
        lamb_moments_chunk<kScaled, kMaximize, kDecay, kDecoupled>(w, m, v, g, c.size, scale_value, clip_value,
                                                                   consts[c.tensor], &partials[2 * k]);
      }, scale.has_value(), maximize, has_decay, decoupled_decay);
    });
    const std::vector<double> w_sums = per_tensor_sums(chunks, partials, n, 2, 0);
    const std::vector<double> u_sums = per_tensor_sums(chunks, partials, n, 2, 1);
    for (size_t i = 0; i < n; ++i) {
      const float ratio = math::lamb_ratio(static_cast<float>(std::sqrt(w_sums[i])),
                                           static_cast<float>(std::sqrt(u_sums[i])), true, trust_clip, bounds.has,
                                           bounds.lo, bounds.hi);
      steps_by_tensor[i] = rate * ratio;
    }
  }
  const bool moments_written = adapt && ts.fp32_state;
  for_each_chunk(chunks, 4, [&](int64_t, const Chunk& c, float* scratch) {
    float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
    float* m = load(m_slots[c.tensor], c.begin, c.size, scratch + kChunk);
    float* v = load(v_slots[c.tensor], c.begin, c.size, scratch + 2 * kChunk);
    if (moments_written) {
      with_flags([&]<bool kScaled, bool kMaximize, bool kDecay, bool kDecoupled>() {
        lamb_apply_chunk<kScaled, kMaximize, kDecay, kDecoupled>(w, m, v, c.size, consts[c.tensor],
                                                                 steps_by_tensor[c.tensor]);
      }, false, false, has_decay, decoupled_decay);
    } else {
      const float* g = load(ts.grad[c.tensor], c.begin, c.size, scratch + 3 * kChunk);
      with_flags([&]<bool kScaled, bool kMaximize, bool kDecay, bool kDecoupled>() {
        lamb_full_chunk<kScaled, kMaximize, kDecay, kDecoupled>(w, m, v, g, c.size, scale_value, clip_value,
                                                                consts[c.tensor], steps_by_tensor[c.tensor]);
      }, scale.has_value(), maximize, has_decay, decoupled_decay);
      store(m_slots[c.tensor], c.begin, c.size, m);
      store(v_slots[c.tensor], c.begin, c.size, v);
    }
    store_weight(ts, c, w);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlars, CPU, m) {
  m.impl("grad_norms", &grad_norms_cpu);
  m.impl("lars_step_", &lars_step_cpu);
  m.impl("lamb_step_", &lamb_step_cpu);
}

}  // namespace fastlars::cpu
