// Host glue of the CUDA kernels: checks the tensors of a call, sorts them into dtype buckets,
// plans waves of chunks (chunk_plan.h), fills the kernel-argument tables and launches the kernels
// of launch.h on the current stream, then registers them for the CUDA dispatch key of the
// fastlars ops. Nothing here reads a device value back to the host.
//
// Op contract implemented (schemas are defined in fastlars/_ops.py):
//   fastlars::grad_norms(Tensor[] grads, Tensor? grad_scale) -> Tensor
//   fastlars::lars_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers,
//       Tensor(c!)[] master_params, Tensor grad_norms, float lr, Tensor? lr_tensor, float momentum,
//       float weight_decay, float trust_coefficient, float eps, bool nesterov, bool trust_clip,
//       bool mlperf_momentum, bool adapt, float[]? trust_ratio_bounds, bool maximize,
//       Tensor? grad_scale, Tensor? found_inf, Tensor(d!)? trust_ratios=None) -> ()
//   fastlars::lamb_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,
//       Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] master_params, Tensor[] steps, float lr,
//       Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay,
//       bool bias_correction, bool grad_averaging, bool decoupled_decay, bool trust_clip, bool adapt,
//       float[]? trust_ratio_bounds, bool maximize, Tensor? clip_coef, Tensor? grad_scale,
//       Tensor? found_inf, Tensor(e!)? trust_ratios=None) -> ()
// An empty master_params list means no master weights; an entry equal to its param (an fp32
// param in a group that keeps masters for its low-precision params) also means none for it.
// trust_ratios, when given, receives the per-tensor ratios the kernels computed (1 when the group
// does not adapt) by a masked copy on the stream that keeps its old values when found_inf is set.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/param_checks.h"
#include "glue.h"
#include "host_plan.h"

namespace fastlars::cuda {
namespace {

// The raw pointers of a call's lists; list `master_list` holds null where a tensor keeps no master.
CallTensors raw_call(const std::vector<at::TensorList>& lists, const std::vector<Storage>& storage, int master_list) {
  CallTensors call;
  call.storage = storage;
  call.ptr.resize(lists.size());
  for (size_t l = 0; l < lists.size(); ++l) {
    for (size_t i = 0; i < storage.size(); ++i) {
      const bool absent = static_cast<int>(l) == master_list && !storage[i].master;
      call.ptr[l].push_back(absent ? nullptr : lists[l][i].data_ptr());
    }
  }
  for (const auto& t : lists[0]) call.numel.push_back(t.numel());
  return call;
}

// Per-tensor storage of a step call, after checking every list against its param.
std::vector<Storage> step_storage(at::TensorList params, at::TensorList grads,
                                  const std::vector<std::pair<at::TensorList, const char*>>& buffers,
                                  at::TensorList masters) {
  const size_t n = params.size();
  check_lists(n, grads, "grads");
  for (const auto& [list, name] : buffers) check_lists(n, list, name);
  TORCH_CHECK(masters.empty() || masters.size() == n, "master_params: holds ", masters.size(),
              " tensors; expected none or one per param (", n, ")");
  const at::Device device = params[0].device();
  TORCH_CHECK(on_kernel_device(device), "params[0]: on ", device, "; these are the CUDA kernels");
  std::vector<Storage> storage(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_dense(p, "params", i, device);
    const DType dt = dtype_of(p, "params", i);
    const bool master = param_checks::check_grad_and_master(p, grads[i], masters, i, check_like);
    const at::ScalarType state_type = master ? at::kFloat : p.scalar_type();
    for (const auto& [list, name] : buffers) {
      check_like(list[i], p, name, i);
      TORCH_CHECK(list[i].scalar_type() == state_type, name, "[", i, "]: dtype ", list[i].scalar_type(),
                  "; expected ", state_type, master ? " (fp32 with a master copy)" : " (the param dtype)");
    }
    storage[i] = Storage{dt, master};
  }
  return storage;
}

// ------------------------------------------------------------------------------------ ops
at::Tensor grad_norms_cuda(at::TensorList grads, const std::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(!grads.empty(), "grads: empty list (the caller handles that case)");
  const at::Device device = grads[0].device();
  TORCH_CHECK(on_kernel_device(device), "grads[0]: on ", device, "; these are the CUDA kernels");
  const DeviceScope scope(device);
  std::vector<Storage> storage;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_dense(grads[i], "grads", i, device);
    storage.push_back(Storage{dtype_of(grads[i], "grads", i), false});
  }
  const float* scale = device_scalar(grad_scale, device, "grad_scale");
  const CallTensors call = raw_call({grads}, storage, -1);
  const CallPlan plan = plan_call<NormTable>(call, op_shape(Op::kGradNorms, false).bytes_per_elem, 0);
  const auto options = at::TensorOptions().device(device).dtype(at::kFloat);
  const int64_t n = static_cast<int64_t>(grads.size());
  const bool any_empty = std::find(call.numel.begin(), call.numel.end(), 0) != call.numel.end();
  at::Tensor out = any_empty ? at::zeros({n}, options) : at::empty({n}, options);
  at::Tensor partials = at::empty({plan.total_chunks}, options);
  const cudaStream_t stream = scope.stream();
  const int sms = device_facts(device).sm_count;
  for_each_wave<kNormDepth>(plan, call, [&](const NormTable& table, Storage st, const Wave& w) {
    launch_sumsq(table, st.param, partials.data_ptr<float>(), chunk_grid(w.chunks, sms), stream);
    FASTLARS_LAUNCH_CHECK();
    launch_norm_finalize(table, partials.data_ptr<float>(), scale, out.data_ptr<float>(), stream);
    FASTLARS_LAUNCH_CHECK();
  });
  return out;
}

void lars_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList master_params, const at::Tensor& grad_norms, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double momentum, double weight_decay,
                    double trust_coefficient, double eps, bool nesterov, bool trust_clip, bool mlperf_momentum,
                    bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& trust_ratios) {
  if (params.empty()) return;
  const std::vector<Storage> storage =
      step_storage(params, grads, {{momentum_buffers, "momentum_buffers"}}, master_params);
  const at::Device device = params[0].device();
  const DeviceScope scope(device);
  check_ratio_output(trust_ratios, params.size(), device);
  TORCH_CHECK(grad_norms.device() == device && grad_norms.scalar_type() == at::kFloat && grad_norms.dim() == 1 &&
                  grad_norms.numel() == static_cast<int64_t>(params.size()) && grad_norms.is_contiguous(),
              "grad_norms: expected a contiguous 1-D float32 tensor of ", params.size(), " elements on ", device);
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const LarsOptions opt =
      make_lars_options(momentum, weight_decay, trust_coefficient, eps, nesterov, trust_clip, mlperf_momentum, adapt,
                        bounds.has, bounds.lo, bounds.hi, maximize, grad_norms.data_ptr<float>());
  const Lr rate = learning_rate(lr, lr_tensor, device);
  const DeviceFacts facts = device_facts(device);
  const CallTensors call = raw_call({params, grads, momentum_buffers, master_params}, storage, 3);
  const CallPlan plan = plan_call<LarsTable>(call, op_shape(Op::kLars, adapt).bytes_per_elem, wave_bytes(facts, adapt));
  const auto options = at::TensorOptions().device(device).dtype(at::kFloat);
  at::Tensor partials = at::empty({adapt ? plan.total_chunks : 0}, options);
  // ones when recording: the kernels never write the ratio of an empty tensor (the reference's is 1)
  const int64_t n_ratios = adapt ? static_cast<int64_t>(params.size()) : 0;
  at::Tensor ratios = trust_ratios.has_value() && trust_ratios->defined() ? at::ones({n_ratios}, options)
                                                                          : at::empty({n_ratios}, options);
  const StepScalars s{rate.ptr, rate.value, device_scalar(grad_scale, device, "grad_scale"),
                      device_scalar(found_inf, device, "found_inf"), partials.data_ptr<float>(),
                      ratios.data_ptr<float>()};
  const cudaStream_t stream = scope.stream();
  for_each_wave<kLarsDepth>(plan, call, [&](const LarsTable& table, Storage st, const Wave& w) {
    launch_lars_wave(table, st, opt, s, chunk_grid(w.chunks, facts.sm_count), stream);
    FASTLARS_LAUNCH_CHECK();
  });
  record_ratios(trust_ratios, ratios, adapt, found_inf);
}

void lamb_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList master_params, at::TensorList steps, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                    double weight_decay, bool bias_correction, bool grad_averaging, bool decoupled_decay,
                    bool trust_clip, bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                    const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& trust_ratios) {
  if (params.empty()) return;
  const std::vector<Storage> storage =
      step_storage(params, grads, {{exp_avgs, "exp_avgs"}, {exp_avg_sqs, "exp_avg_sqs"}}, master_params);
  const at::Device device = params[0].device();
  const DeviceScope scope(device);
  check_ratio_output(trust_ratios, params.size(), device);
  check_lists(params.size(), steps, "steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device() == device, "steps[", i, "]: on ", steps[i].device(), ", the params are on ",
                device, " (a host-to-device copy would block and cannot be captured in a CUDA graph)");
  }
  at::Tensor step_values;
  if (bias_correction) {  // one small copy kernel gathers the 0-d step counts into one vector
    step_values = at::stack(steps).to(device, at::kFloat).reshape({-1}).contiguous();
  }
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const LambOptions opt = make_lamb_options(
      beta1, beta2, eps, weight_decay, bias_correction, grad_averaging, decoupled_decay, trust_clip, adapt, bounds.has,
      bounds.lo, bounds.hi, maximize, bias_correction ? step_values.data_ptr<float>() : nullptr,
      device_scalar(clip_coef, device, "clip_coef"));
  const Lr rate = learning_rate(lr, lr_tensor, device);
  const DeviceFacts facts = device_facts(device);
  const CallTensors call = raw_call({params, grads, exp_avgs, exp_avg_sqs, master_params}, storage, 4);
  const CallPlan plan = plan_call<LambTable>(call, op_shape(Op::kLamb, adapt).bytes_per_elem, wave_bytes(facts, adapt));
  const auto options = at::TensorOptions().device(device).dtype(at::kFloat);
  at::Tensor partials = at::empty({adapt ? 2 * plan.total_chunks : 0}, options);
  // ones when recording: the kernels never write the ratio of an empty tensor (the reference's is 1)
  const int64_t n_ratios = adapt ? static_cast<int64_t>(params.size()) : 0;
  at::Tensor ratios = trust_ratios.has_value() && trust_ratios->defined() ? at::ones({n_ratios}, options)
                                                                          : at::empty({n_ratios}, options);
  const StepScalars s{rate.ptr, rate.value, device_scalar(grad_scale, device, "grad_scale"),
                      device_scalar(found_inf, device, "found_inf"), partials.data_ptr<float>(),
                      ratios.data_ptr<float>()};
  const cudaStream_t stream = scope.stream();
  for_each_wave<kLambDepth>(plan, call, [&](const LambTable& table, Storage st, const Wave& w) {
    launch_lamb_wave(table, st, opt, s, chunk_grid(w.chunks, facts.sm_count), stream);
    FASTLARS_LAUNCH_CHECK();
  });
  record_ratios(trust_ratios, ratios, adapt, found_inf);
}

}  // namespace

#ifdef FASTLARS_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fastlars_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(fastlars, CUDA, m) {
#endif
  m.impl("grad_norms", &grad_norms_cuda);
  m.impl("lars_step_", &lars_step_cuda);
  m.impl("lamb_step_", &lamb_step_cuda);
}

}  // namespace fastlars::cuda
