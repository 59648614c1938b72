// C entry points running the CUDA kernels of csrc/cuda under the host emulation (cuda_emu.h) on
// host memory, with the same planning code as ops.cpp (host_plan.h). Built as a shared library
// by tests/test_native_cuda.py and driven through ctypes like a fastlars backend, so CI runs the
// kernel sources without a GPU. Return value: 0 (success).
#include "cuda_emu.h"  // first: it stands in for the CUDA headers

#include <cstdint>
#include <vector>

#include "host_plan.h"

namespace {

using namespace fastlars::cuda;

constexpr int kEmulatedSms = 2;  // small grids, so blocks stride over several chunks

CallTensors make_call(int n, const std::vector<void* const*>& lists, const int64_t* numel, const int* dtype,
                      void* const* masters) {
  CallTensors call;
  call.ptr.resize(lists.size());
  for (int i = 0; i < n; ++i) {
    for (size_t l = 0; l < lists.size(); ++l) call.ptr[l].push_back(lists[l] != nullptr ? lists[l][i] : nullptr);
    call.numel.push_back(numel[i]);
    const bool master = masters != nullptr && masters[i] != nullptr;
    call.storage.push_back(Storage{static_cast<DType>(dtype[i]), master});
  }
  return call;
}

}  // namespace

extern "C" {

int fl_emu_grad_norms(int n, void* const* tensors, const int64_t* numel, const int* dtype, const float* grad_scale,
                      float* out) {
  const CallTensors call = make_call(n, {tensors}, numel, dtype, nullptr);
  const CallPlan plan = plan_call<NormTable>(call, 0, 0);
  std::vector<float> partials(static_cast<size_t>(plan.total_chunks));
  for (int i = 0; i < n; ++i) out[i] = 0.0f;
  for_each_wave<kNormDepth>(plan, call, [&](const NormTable& t, Storage st, const Wave& w) {
    launch_sumsq(t, st.param, partials.data(), chunk_grid(w.chunks, kEmulatedSms), nullptr);
    launch_norm_finalize(t, partials.data(), grad_scale, out, nullptr);
  });
  return 0;
}

// f: momentum, weight_decay, trust_coefficient, eps, bound lo, bound hi
// b: nesterov, trust_clip, mlperf_momentum, adapt, has_bounds, maximize
int fl_emu_lars_step(int n, void* const* params, void* const* grads, void* const* bufs, void* const* masters,
                     const int64_t* numel, const int* dtype, const float* grad_norms, const float* lr_ptr, float lr,
                     const double* f, const int* b, const float* grad_scale, const float* found_inf,
                     int64_t wave_bytes) {
  const CallTensors call = make_call(n, {params, grads, bufs, masters}, numel, dtype, masters);
  const LarsOptions opt = make_lars_options(f[0], f[1], f[2], f[3], b[0], b[1], b[2], b[3], b[4], f[4], f[5], b[5],
                                            grad_norms);
  const CallPlan plan = plan_call<LarsTable>(call, 4, opt.adapt ? wave_bytes : 0);
  std::vector<float> partials(static_cast<size_t>(plan.total_chunks)), ratios(static_cast<size_t>(n));
  const StepScalars s{lr_ptr, lr, grad_scale, found_inf, partials.data(), ratios.data()};
  for_each_wave<kLarsDepth>(plan, call, [&](const LarsTable& t, Storage st, const Wave& w) {
    launch_lars_wave(t, st, opt, s, chunk_grid(w.chunks, kEmulatedSms), nullptr);
  });
  return 0;
}

// f: beta1, beta2, eps, weight_decay, bound lo, bound hi
// b: bias_correction, grad_averaging, decoupled_decay, trust_clip, adapt, has_bounds, maximize
int fl_emu_lamb_step(int n, void* const* params, void* const* grads, void* const* exp_avgs, void* const* exp_avg_sqs,
                     void* const* masters, const int64_t* numel, const int* dtype, const float* steps,
                     const float* lr_ptr, float lr, const double* f, const int* b, const float* clip_coef,
                     const float* grad_scale, const float* found_inf, int64_t wave_bytes) {
  const CallTensors call = make_call(n, {params, grads, exp_avgs, exp_avg_sqs, masters}, numel, dtype, masters);
  const LambOptions opt = make_lamb_options(f[0], f[1], f[2], f[3], b[0], b[1], b[2], b[3], b[4], b[5], f[4], f[5],
                                            b[6], steps, clip_coef);
  const CallPlan plan = plan_call<LambTable>(call, 16, opt.adapt ? wave_bytes : 0);
  std::vector<float> partials(static_cast<size_t>(2 * plan.total_chunks)), ratios(static_cast<size_t>(n));
  const StepScalars s{lr_ptr, lr, grad_scale, found_inf, partials.data(), ratios.data()};
  for_each_wave<kLambDepth>(plan, call, [&](const LambTable& t, Storage st, const Wave& w) {
    launch_lamb_wave(t, st, opt, s, chunk_grid(w.chunks, kEmulatedSms), nullptr);
  });
  return 0;
}

// out[0]: 16-byte vector accesses, out[1]: one-element accesses of the main arrays since the last call.
int fl_emu_access_counts(int64_t* out) {
  fastlars::emu::AccessCounts& c = fastlars::emu::access_counts();
  out[0] = c.vector;
  out[1] = c.scalar;
  c = fastlars::emu::AccessCounts{};
  return 0;
}

}  // extern "C"
