// Host glue of the low-precision-state CUDA kernels (lowbit.cu): checks a call's tensors, cuts them into
// block-aligned chunks (lowbit_launch.h), fills kernel-argument tables per storage (param dtype, master or
// not) and launches on the current stream; registers fastlars::lamb_lowbit_step_ and lars_lowbit_step_ for
// the CUDA dispatch key with the semantics of the CPU op (csrc/cpu/lowbit_ops.cpp; schemas and argument
// meanings in fastlars/_ops.py). A state buffer is a floating tensor (fp32/bf16/fp16, its absmax entry an
// unused placeholder) or uint8 codes whose absmax entry holds the fp32 block scales, so lists may mix
// formats. Every check runs before the first launch; nothing reads a device value back to the host (lr,
// t, grad_scale, clip_coef and found_inf are read by the kernels), so a step can be captured in a graph.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/param_checks.h"
#include "glue.h"
#include "host_plan.h"
#include "lowbit_launch.h"

namespace fastlars::cuda {
namespace {

// The raw tensors of one call, per tensor.
struct LowbitCall {
  std::vector<std::array<void*, kLowbitLists>> ptr;
  std::vector<int64_t> numel, row_length;
  std::vector<std::array<uint8_t, 2>> format;
  std::vector<uint8_t> rounded;
  std::vector<uint32_t> key;
  std::vector<Storage> storage;
};

// Whether t's memory order is the order quantization.storage_permutation gives (row-major, or
// channels_last for 4-d / 5-d tensors): blocks and stochastic-rounding indices follow memory order.
bool memory_order_is_storage_order(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (t.dim() == 5) return t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

StateFormat state_format(const at::Tensor& x, const char* name, size_t i) {
  if (x.scalar_type() == at::kByte) return StateFormat::kInt8;
  switch (dtype_of(x, name, i)) {
    case DType::kBFloat16:
      return StateFormat::kBFloat16;
    case DType::kHalf:
      return StateFormat::kHalf;
    default:
      return StateFormat::kFloat;
  }
}

using BufferLists = std::vector<std::tuple<at::TensorList, at::TensorList, const char*>>;

// Checks every list against its param and gathers the call; `keys`: the rounding_keys argument.
LowbitCall lowbit_call(at::TensorList params, at::TensorList grads, const BufferLists& buffers,
                       at::TensorList masters, at::IntArrayRef keys) {
  const size_t n = params.size();
  check_lists(n, grads, "grads");
  for (const auto& [values, scales, name] : buffers) {
    check_lists(n, values, name);
    check_lists(n, scales, name);
  }
  TORCH_CHECK(masters.empty() || masters.size() == n, "master_params: holds ", masters.size(),
              " tensors; expected none or one per param (", n, ")");
  TORCH_CHECK(keys.empty() || keys.size() == n, "rounding_keys: holds ", keys.size(), " keys, params hold ", n);
  const at::Device device = params[0].device();
  TORCH_CHECK(on_kernel_device(device), "params[0]: on ", device, "; these are the CUDA kernels");
  LowbitCall call;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_dense(p, "params", i, device);
    const DType dt = dtype_of(p, "params", i);
    const bool master = param_checks::check_grad_and_master(p, grads[i], masters, i, check_like);
    if (!keys.empty()) {
      TORCH_CHECK(keys[i] >= 0 && keys[i] <= 0xFFFFFFFFll, "rounding_keys[", i, "]: expected a 32-bit key, got ",
                  keys[i]);
    }
    const bool rounded = !keys.empty() && masters.empty() && dt == DType::kBFloat16;
    const int64_t rows = p.dim() >= 2 ? p.size(0) : 1;
    int64_t row_length = p.dim() >= 2 ? 1 : p.numel();  // of the shape, also when there are no rows
    for (int64_t d = 1; d < p.dim(); ++d) row_length *= p.size(d);
    std::array<void*, kLowbitLists> ptr{};
    std::array<uint8_t, 2> format{};
    bool any_codes = false;
    for (size_t b = 0; b < buffers.size(); ++b) {
      const auto& [values, scales, name] = buffers[b];
      const at::Tensor& x = values[i];
      check_like(x, p, name, i);
      const StateFormat f = state_format(x, name, i);
      format[b] = static_cast<uint8_t>(f);
      ptr[3 + 2 * b] = x.data_ptr();
      if (f == StateFormat::kInt8) {
        any_codes = true;
        const at::Tensor& s = scales[i];
        const int64_t per_row = blocks_per_row(row_length);
        TORCH_CHECK(s.device() == device && s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 &&
                        s.size(0) == rows && s.size(1) == per_row,
                    name, "_absmax[", i, "]: expected a contiguous float32 tensor on ", device, " of shape (", rows,
                    ", ", per_row, ") (blocks of ", kQuantBlock, " along rows of ", row_length, "), got ",
                    s.scalar_type(), " of shape ", s.sizes(), " on ", s.device());
        ptr[4 + 2 * b] = s.data_ptr();
      }
    }
    TORCH_CHECK(!(any_codes || rounded) || memory_order_is_storage_order(p), "params[", i, "]: strides ",
                p.strides(), " are neither contiguous nor channels_last; int8 blocks and stochastic rounding follow "
                "the storage order of those layouts only (the reference backend takes any layout)");
    ptr[0] = p.data_ptr();
    ptr[1] = grads[i].data_ptr();
    ptr[2] = master ? masters[i].data_ptr() : nullptr;
    call.ptr.push_back(ptr);
    call.numel.push_back(p.numel());
    call.row_length.push_back(row_length);
    call.format.push_back(format);
    call.rounded.push_back(rounded ? 1 : 0);
    call.key.push_back(keys.empty() ? 0u : static_cast<uint32_t>(keys[i]));
    call.storage.push_back(Storage{dt, master});
  }
  return call;
}

int64_t total_chunks(const LowbitCall& call) {
  int64_t total = 0;
  for (size_t i = 0; i < call.numel.size(); ++i) total += lowbit_chunk_count(call.numel[i], call.row_length[i]);
  return total;
}

// Calls fn(table, storage, chunks) for every launch: the call's non-empty tensors grouped by storage, a
// table at a time; chunk ids run over the whole call (2 partials per chunk, fixed slots).
template <typename Fn>
void for_each_table(const LowbitCall& call, Fn&& fn) {
  std::vector<Storage> kinds;
  for (const Storage& s : call.storage) {
    bool seen = false;
    for (const Storage& k : kinds) seen |= k.param == s.param && k.master == s.master;
    if (!seen) kinds.push_back(s);
  }
  int64_t next_chunk = 0;
  LowbitTable table;
  for (const Storage& kind : kinds) {
    int64_t end = 0;
    table.count = 0;
    table.first_chunk = next_chunk;
    const auto flush = [&] {
      if (table.count > 0) fn(table, kind, end);
      next_chunk += end;
      end = 0;
      table.count = 0;
      table.first_chunk = next_chunk;
    };
    for (size_t i = 0; i < call.numel.size(); ++i) {
      const Storage& s = call.storage[i];
      if (s.param != kind.param || s.master != kind.master || call.numel[i] == 0) continue;
      const int slot = table.count;
      for (int l = 0; l < kLowbitLists; ++l) table.ptr[l][slot] = call.ptr[i][l];
      table.numel[slot] = call.numel[i];
      table.row_length[slot] = call.row_length[i];
      end += lowbit_chunk_count(call.numel[i], call.row_length[i]);
      table.chunk_end[slot] = end;
      table.index[slot] = static_cast<int32_t>(i);
      table.key[slot] = call.key[i];
      table.format[0][slot] = call.format[i][0];
      table.format[1][slot] = call.format[i][1];
      table.rounded[slot] = call.rounded[i];
      table.count = slot + 1;
      if (table.count == LowbitTable::kCapacity) flush();
    }
    flush();
  }
}

// The per-tensor step counts t as one fp32 vector on the device (one small gather kernel; no host sync).
at::Tensor step_vector(at::TensorList steps, size_t n, const at::Device& device) {
  check_lists(n, steps, "steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device() == device && steps[i].numel() == 1, "steps[", i, "]: expected one element on ",
                device, ", got ", steps[i].numel(), " on ", steps[i].device(),
                " (a host-to-device copy would block and cannot be captured in a CUDA graph)");
  }
  return at::stack(steps).to(device, at::kFloat).reshape({-1}).contiguous();
}

// Where the kernels put the ratios: ones when they are recorded (an empty tensor's ratio is 1 and no kernel
// writes it), nothing when the step does not adapt.
at::Tensor ratio_buffer(const std::optional<at::Tensor>& trust_ratios, bool adapt, size_t n,
                        const at::TensorOptions& options) {
  const int64_t count = adapt ? static_cast<int64_t>(n) : 0;
  return trust_ratios.has_value() && trust_ratios->defined() ? at::ones({count}, options) : at::empty({count}, options);
}

// The launches of one step: this step's device scalars (lr, grad scale, found_inf), two partial sums per
// chunk when it adapts and the ratio buffer, then launch(table, storage, scalars, grid, stream) for each
// table of the call, and the ratios recorded into trust_ratios.
template <typename Launch>
void launch_tables(const LowbitCall& call, const at::Device& device, const DeviceScope& scope, bool adapt, double lr,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& trust_ratios,
                   const Launch& launch) {
  const Lr rate = learning_rate(lr, lr_tensor, device);
  const auto options = at::TensorOptions().device(device).dtype(at::kFloat);
  at::Tensor partials = at::empty({adapt ? 2 * total_chunks(call) : 0}, options);
  at::Tensor ratios = ratio_buffer(trust_ratios, adapt, call.numel.size(), options);
  const StepScalars s{rate.ptr, rate.value, device_scalar(grad_scale, device, "grad_scale"),
                      device_scalar(found_inf, device, "found_inf"), partials.data_ptr<float>(),
                      ratios.data_ptr<float>()};
  const int sms = device_facts(device).sm_count;
  const cudaStream_t stream = scope.stream();
  for_each_table(call, [&](const LowbitTable& table, Storage st, int64_t chunks) {
    launch(table, st, s, chunk_grid(chunks, sms), stream);
    FASTLARS_LAUNCH_CHECK();
  });
  record_ratios(trust_ratios, ratios, adapt, found_inf);
}

void lamb_lowbit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_absmax, at::TensorList exp_avg_sqs,
                           at::TensorList exp_avg_sq_absmax, at::TensorList master_params, at::TensorList steps,
                           at::IntArrayRef tensor_keys, double lr, const std::optional<at::Tensor>& lr_tensor,
                           double beta1, double beta2, double eps, double weight_decay, bool bias_correction,
                           bool grad_averaging, bool decoupled_decay, bool trust_clip, bool adapt,
                           std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                           const std::optional<at::Tensor>& clip_coef, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::Tensor>& trust_ratios) {
  if (params.empty()) return;
  const LowbitCall call = lowbit_call(
      params, grads, {{exp_avgs, exp_avg_absmax, "exp_avgs"}, {exp_avg_sqs, exp_avg_sq_absmax, "exp_avg_sqs"}},
      master_params, tensor_keys);
  const at::Device device = params[0].device();
  const DeviceScope scope(device);
  check_ratio_output(trust_ratios, params.size(), device);
  const at::Tensor step_values = step_vector(steps, params.size(), device);
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const LambOptions opt = make_lamb_options(beta1, beta2, eps, weight_decay, bias_correction, grad_averaging,
                                            decoupled_decay, trust_clip, adapt, bounds.has, bounds.lo, bounds.hi,
                                            maximize, step_values.data_ptr<float>(),
                                            device_scalar(clip_coef, device, "clip_coef"));
  launch_tables(call, device, scope, adapt, lr, lr_tensor, grad_scale, found_inf, trust_ratios,
                [&](const LowbitTable& table, Storage st, const StepScalars& s, int grid, cudaStream_t stream) {
                  launch_lamb_lowbit(table, st, opt, s, grid, stream);
                });
}

void lars_lowbit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           at::TensorList momentum_absmax, at::TensorList master_params, const at::Tensor& grad_norms,
                           at::TensorList steps, at::IntArrayRef tensor_keys, double lr,
                           const std::optional<at::Tensor>& lr_tensor, double momentum, double weight_decay,
                           double trust_coefficient, double eps, bool nesterov, bool trust_clip, bool mlperf_momentum,
                           bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::Tensor>& trust_ratios) {
  if (params.empty()) return;
  const LowbitCall call = lowbit_call(params, grads, {{momentum_buffers, momentum_absmax, "momentum_buffers"}},
                                      master_params, tensor_keys);
  const size_t n = params.size();
  const at::Device device = params[0].device();
  const DeviceScope scope(device);
  check_ratio_output(trust_ratios, n, device);
  const bool fold = grad_norms.numel() == 0;
  TORCH_CHECK(grad_norms.device() == device && grad_norms.scalar_type() == at::kFloat && grad_norms.dim() == 1 &&
                  (fold || grad_norms.numel() == static_cast<int64_t>(n)) && grad_norms.is_contiguous(),
              "grad_norms: expected a contiguous 1-D float32 tensor of ", n, " elements on ", device,
              " (or none: computed in the step), got ", grad_norms.scalar_type(), " of shape ", grad_norms.sizes(),
              " on ", grad_norms.device());
  bool any_rounded = false;
  for (uint8_t r : call.rounded) any_rounded |= r != 0;
  const at::Tensor step_values = any_rounded ? step_vector(steps, n, device) : at::Tensor();
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const LowbitLarsOptions opt{
      make_lars_options(momentum, weight_decay, trust_coefficient, eps, nesterov, trust_clip, mlperf_momentum, adapt,
                        bounds.has, bounds.lo, bounds.hi, maximize, fold ? nullptr : grad_norms.data_ptr<float>()),
      any_rounded ? step_values.data_ptr<float>() : nullptr};
  launch_tables(call, device, scope, adapt, lr, lr_tensor, grad_scale, found_inf, trust_ratios,
                [&](const LowbitTable& table, Storage st, const StepScalars& s, int grid, cudaStream_t stream) {
                  launch_lars_lowbit(table, st, opt, s, grid, stream);
                });
}

}  // namespace

#ifdef FASTLARS_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fastlars_lowbit_emu, CPU, m) {  // tests/test_native_cuda_lowbit.py
#else
TORCH_LIBRARY_IMPL(fastlars, CUDA, m) {
#endif
  m.impl("lamb_lowbit_step_", &lamb_lowbit_step_cuda);
  m.impl("lars_lowbit_step_", &lars_lowbit_step_cuda);
}

}  // namespace fastlars::cuda
