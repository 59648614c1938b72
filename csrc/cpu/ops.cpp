// The CPU kernels of the fastlars ops (schemas in fastlars/_ops.py), registered for the CPU dispatch
// key. Each op handles the whole tensor list of a param group in parallel passes over chunks of all
// tensors (multi_tensor.h); the element loops (kernels.h) are built per x86 instruction set around the
// per-element arithmetic of csrc/common/step_math.h.
//
// grad_norms:  out[i] = ||g_i|| / grad_scale                         one pass, reads g
// lars_step_:  per group of tensors (tensor_groups.h; adapting groups only): pass 1 ||w_i|| (and ||g_i||
//              when grad_norms is empty: no separate gradient pass), pass 2 the update; the host path
//              calls lars_step_carrying_norms (lars_step.h), which skips pass 1 where ||w|| is known
// lamb_step_:  per group of tensors (tensor_groups.h): pass 1 new m, v (written when fp32), u into a
//              workspace, ||w_i||, ||u_i||; pass 2 w ← w − lr·r_i·u from the stored u (bf16/fp16
//              moments: pass 1 works on copies and pass 2 recomputes them from the old ones and g, so
//              u never sees rounded moments, as in the reference); groups that do not adapt take one pass.
// Scalars held in tensors (lr_tensor, grad_scale, found_inf, clip_coef, steps) live on the CPU here,
// so reading them costs no synchronisation; found_inf != 0 returns before anything is written. The
// optional trust_ratios output receives each tensor's ratio (1 when the group does not adapt).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../common/param_checks.h"
#include "../common/step_math.h"
#include "kernels.h"
#include "lamb_passes.h"
#include "lars_ratios.h"
#include "lars_step.h"
#include "multi_tensor.h"
#include "op_checks.h"
#include "parallel.h"

namespace fastlars::cpu {
namespace {

using namespace checks;

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
    const bool master = param_checks::check_grad_and_master(p, grads[i], masters, i, check_like);
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

// ------------------------------------------------------------------------------------ ops
at::Tensor grad_norms_cpu(at::TensorList grads, const std::optional<at::Tensor>& grad_scale) {
  begin_step_record();
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
  const ElementKernels& kernels = element_kernels();
  for_each_chunk(chunks, 1, [&](int64_t k, const Chunk& c, float* scratch) {
    partials[k] = kernels.sum_of_squares(load(slots[c.tensor], c.begin, c.size, scratch), c.size);
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

}  // namespace

void lars_step_carrying_norms(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                              at::TensorList master_params, const at::Tensor& grad_norms, double lr,
                              const std::optional<at::Tensor>& lr_tensor, double momentum, double weight_decay,
                              double trust_coefficient, double eps, bool nesterov, bool trust_clip,
                              bool mlperf_momentum, bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds,
                              bool maximize, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& trust_ratios,
                              const std::vector<float>* known_w_norms, std::vector<float>* next_w_norms) {
  begin_step_record();
  if (next_w_norms != nullptr) next_w_norms->assign(params.size(), -1.0f);
  if (params.empty()) return;
  const StepTensors ts = step_tensors(params, grads, {{momentum_buffers, "momentum_buffers"}}, master_params);
  const size_t n = params.size();
  float* const ratio_out = ratio_output(trust_ratios, n);
  // An empty grad_norms asks for ||g|| from the norm pass, beside ||w|| (the caller needs no norms before it).
  const bool fold = lars_folds_grad_norms(grad_norms, n);
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const std::optional<float> skip = host_scalar(found_inf, "found_inf");
  const std::optional<float> scale = host_scalar(grad_scale, "grad_scale");
  const float rate = host_scalar(lr_tensor, "lr_tensor").value_or(static_cast<float>(lr));
  if (skip.has_value() && *skip != 0.0f) return;

  const ElementKernels& kernels = element_kernels();
  const std::vector<Chunk> chunks = plan_chunks(ts.numel);
  const LarsArgs args{scale.has_value(), maximize, nesterov, mlperf_momentum, scale.value_or(1.0f), rate, 1.0f,
                      static_cast<float>(momentum), static_cast<float>(weight_decay)};
  // With next_w_norms (adapting groups): each chunk's Σw'² of the new fp32 weights, for the next step's ||w||.
  const bool carry = next_w_norms != nullptr && adapt;
  std::vector<float> next_partials(carry ? chunks.size() : 0);
  const auto update = [&](const Chunk* first, int64_t count, const std::vector<float>& ratios) {
    const int64_t first_index = first - chunks.data();
    for_each_chunk(first, count, 3, [&](int64_t k, const Chunk& c, float* scratch) {
      float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
      float* v = load(ts.buffers[0][c.tensor], c.begin, c.size, scratch + kChunk);
      const float* g = load(ts.grad[c.tensor], c.begin, c.size, scratch + 2 * kChunk);
      LarsArgs tensor_args = args;
      tensor_args.ratio = ratios[c.tensor];
      if (carry && ts.weight[c.tensor].type == at::kFloat) {
        next_partials[first_index + k] = kernels.lars_update_norm(w, v, g, c.size, tensor_args);
      } else {
        kernels.lars_update(w, v, g, c.size, tensor_args);
      }
      store(ts.buffers[0][c.tensor], c.begin, c.size, v);
      store_weight(ts, c, w);
    }, Order::back);  // after the norm pass (or the gradient-norm op) over the same chunks
  };
  std::vector<float> ratios(n, 1.0f);
  if (!adapt) {
    update(chunks.data(), static_cast<int64_t>(chunks.size()), ratios);
    if (ratio_out != nullptr) std::copy(ratios.begin(), ratios.end(), ratio_out);
    return;
  }
  lars_ratios_then_update(kernels, chunks, ts, grad_norms, fold, scale,
                          {rate, static_cast<float>(trust_coefficient), static_cast<float>(weight_decay),
                           static_cast<float>(eps), trust_clip, bounds},
                          ratios, [&](const Chunk* first, int64_t count) { update(first, count, ratios); },
                          known_w_norms);
  if (ratio_out != nullptr) std::copy(ratios.begin(), ratios.end(), ratio_out);
  if (carry) {
    store_carried_norms(chunks, next_partials, [&](size_t i) { return ts.weight[i].type == at::kFloat; },
                        *next_w_norms);
  }
}

namespace {

void lars_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList master_params, const at::Tensor& grad_norms, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double momentum, double weight_decay,
                   double trust_coefficient, double eps, bool nesterov, bool trust_clip, bool mlperf_momentum,
                   bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& trust_ratios) {
  lars_step_carrying_norms(params, grads, momentum_buffers, master_params, grad_norms, lr, lr_tensor, momentum,
                           weight_decay, trust_coefficient, eps, nesterov, trust_clip, mlperf_momentum, adapt,
                           trust_ratio_bounds, maximize, grad_scale, found_inf, trust_ratios, nullptr, nullptr);
}

void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList master_params, at::TensorList steps, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                   double weight_decay, bool bias_correction, bool grad_averaging, bool decoupled_decay,
                   bool trust_clip, bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                   const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& trust_ratios) {
  begin_step_record();
  if (params.empty()) return;
  const StepTensors ts =
      step_tensors(params, grads, {{exp_avgs, "exp_avgs"}, {exp_avg_sqs, "exp_avg_sqs"}}, master_params);
  const size_t n = params.size();
  float* const ratio_out = ratio_output(trust_ratios, n);
  check_count(n, steps, "steps");
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const std::optional<float> skip = host_scalar(found_inf, "found_inf");
  const std::optional<float> scale = host_scalar(grad_scale, "grad_scale");
  const std::optional<float> clip = host_scalar(clip_coef, "clip_coef");
  const float rate = host_scalar(lr_tensor, "lr_tensor").value_or(static_cast<float>(lr));
  const std::vector<LambArgs> args = lamb_args(steps, scale, clip, rate, beta1, beta2, eps, weight_decay,
                                                bias_correction, grad_averaging, decoupled_decay, maximize);
  if (skip.has_value() && *skip != 0.0f) return;

  const ElementKernels& kernels = element_kernels();
  const std::vector<Chunk> chunks = plan_chunks(ts.numel);
  const auto& m_slots = ts.buffers[0];
  const auto& v_slots = ts.buffers[1];
  if (!adapt) {  // one pass: moments and update, step = lr
    for_each_chunk(chunks, 4, [&](int64_t, const Chunk& c, float* scratch) {
      float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
      float* m = load(m_slots[c.tensor], c.begin, c.size, scratch + kChunk);
      float* v = load(v_slots[c.tensor], c.begin, c.size, scratch + 2 * kChunk);
      const float* g = load(ts.grad[c.tensor], c.begin, c.size, scratch + 3 * kChunk);
      kernels.lamb_full(w, m, v, g, c.size, args[c.tensor], rate);
      store(m_slots[c.tensor], c.begin, c.size, m);
      store(v_slots[c.tensor], c.begin, c.size, v);
      store_weight(ts, c, w);
    });
    if (ratio_out != nullptr) std::fill(ratio_out, ratio_out + n, 1.0f);
    return;
  }

  // fp32 moments are written in place by pass 1; low-precision ones are worked on as copies there and
  // recomputed from the old values and g in pass 2, so u never sees rounded moments (as in the reference).
  const auto moments = ts.fp32_state ? load : load_copy;
  const auto pass1 = [&](const Chunk& c, float* scratch, float* u, float* sums) {
    const float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
    float* m = moments(m_slots[c.tensor], c.begin, c.size, scratch + kChunk);
    float* v = moments(v_slots[c.tensor], c.begin, c.size, scratch + 2 * kChunk);
    const float* g = load(ts.grad[c.tensor], c.begin, c.size, scratch + 3 * kChunk);
    kernels.lamb_moments(w, m, v, g, u, c.size, args[c.tensor], sums);
  };
  const auto pass2 = [&](const Chunk& c, float* scratch, float* u, float step) {
    float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
    if (ts.fp32_state) {
      if (u != nullptr) {
        kernels.lamb_apply_stored(w, u, c.size, args[c.tensor], step);
      } else {
        float* m = load(m_slots[c.tensor], c.begin, c.size, scratch + kChunk);
        float* v = load(v_slots[c.tensor], c.begin, c.size, scratch + 2 * kChunk);
        kernels.lamb_apply_recomputed(w, m, v, c.size, args[c.tensor], step);
      }
    } else {
      float* m = load(m_slots[c.tensor], c.begin, c.size, scratch + kChunk);
      float* v = load(v_slots[c.tensor], c.begin, c.size, scratch + 2 * kChunk);
      const float* g = load(ts.grad[c.tensor], c.begin, c.size, scratch + 3 * kChunk);
      if (u != nullptr) {
        kernels.lamb_moments_only(m, v, g, c.size, args[c.tensor]);
        kernels.lamb_apply_stored(w, u, c.size, args[c.tensor], step);
      } else {
        kernels.lamb_full(w, m, v, g, c.size, args[c.tensor], step);
      }
      store(m_slots[c.tensor], c.begin, c.size, m);
      store(v_slots[c.tensor], c.begin, c.size, v);
    }
    store_weight(ts, c, w);
  };
  lamb_group_passes(chunks, ts.numel, {rate, true, trust_clip, bounds}, ratio_out, 4, pass1, 4, pass2);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlars, CPU, m) {
  m.impl("grad_norms", &grad_norms_cpu);
  m.impl("lars_step_", &lars_step_cpu);
  m.impl("lamb_step_", &lamb_step_cpu);
}

}  // namespace fastlars::cpu
