// Host glue shared by the CUDA ops (ops.cpp: fp32 state; lowbit_ops.cpp: low-precision state): the device
// of a call (current device and stream, SM count and L2 size), the checks of its tensors and scalars, the
// learning rate, trust-ratio bounds and the trust_ratios output. ATen only; nothing here reads a device
// value back to the host.
#pragma once

#include <ATen/ATen.h>
#ifndef FASTLARS_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdint>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <vector>

#include "launch.h"

namespace fastlars::cuda {

// ------------------------------------------------------------------------------ the device
// With FASTLARS_CUDA_EMULATION this file builds for the tests instead (tests/test_native_cuda.py):
// the kernels run under csrc/cuda/test/emu on CPU tensors, registered for the CPU key of the
// namespace fastlars_emu, so CI exercises this glue end to end without a GPU.
#ifdef FASTLARS_CUDA_EMULATION
constexpr bool kEmulated = true;
#define FASTLARS_LAUNCH_CHECK() ((void)0)
#else
constexpr bool kEmulated = false;
#define FASTLARS_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif

inline bool on_kernel_device(const at::Device& d) { return kEmulated ? d.is_cpu() : d.is_cuda(); }

// Makes `device` current for the call and names the stream the kernels go to.
class DeviceScope {
 public:
#ifdef FASTLARS_CUDA_EMULATION
  explicit DeviceScope(const at::Device&) {}
  cudaStream_t stream() const { return nullptr; }
#else
  explicit DeviceScope(const at::Device& d) : guard_(d), stream_(c10::cuda::getCurrentCUDAStream(d.index())) {}
  cudaStream_t stream() const { return stream_.stream(); }

 private:
  c10::cuda::CUDAGuard guard_;
  c10::cuda::CUDAStream stream_;
#endif
};

struct DeviceFacts {
  int sm_count = 0;
  int64_t l2_bytes = 0;
};

inline DeviceFacts device_facts(const at::Device& device) {  // by value: the cache may grow meanwhile
#ifdef FASTLARS_CUDA_EMULATION
  static const DeviceFacts emulated{2, 128 * 1024};  // small grids and waves: every path is taken
  (void)device;
  return emulated;
#else
  static std::mutex lock;
  static std::vector<std::optional<DeviceFacts>> cache;
  const int index = device.index();
  std::lock_guard<std::mutex> guard(lock);
  if (static_cast<int>(cache.size()) <= index) cache.resize(index + 1);
  if (!cache[index]) {
    DeviceFacts facts;
    int l2 = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&facts.sm_count, cudaDevAttrMultiProcessorCount, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, index));
    facts.l2_bytes = static_cast<int64_t>(l2);
    cache[index] = facts;
  }
  return *cache[index];
#endif
}

// Pass-1 bytes per wave of `op` (launch_plan.h): the plan FASTLARS_CUDA_PLAN names (wave: half the L2,
// so pass 2 finds the wave there; onepass: no budget), FASTLARS_CUDA_WAVE_BYTES overriding it; read at
// every call, for benchmarks. 0 when the op has one pass (no adapt).
inline int64_t wave_bytes(const DeviceFacts& facts, bool adapt) {
  if (!adapt) return 0;
  PlanKind kind = PlanKind::kOnePass;
  try {
    kind = plan_from_env();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  return wave_budget_from_env(kind, facts.l2_bytes);
}

// ---------------------------------------------------------------------------------- checks
inline DType dtype_of(const at::Tensor& t, const char* what, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kHalf;
    default:
      TORCH_CHECK(false, what, "[", i, "]: dtype ", t.scalar_type(), " is not supported by the CUDA kernels (float32, "
                  "bfloat16 or float16)");
  }
}

// Element-wise kernels walk the storage linearly, so every tensor of one element must be dense
// with the same strides (contiguous, channels_last, ...) as its param.
inline void check_like(const at::Tensor& t, const at::Tensor& param, const char* what, size_t i) {
  TORCH_CHECK(t.device() == param.device(), what, "[", i, "]: on ", t.device(), ", its param is on ", param.device());
  TORCH_CHECK(t.sizes() == param.sizes(), what, "[", i, "]: shape ", t.sizes(), " differs from its param's ",
              param.sizes());
  bool same_order = true;  // strides of size-1 dimensions do not matter
  for (int64_t d = 0; d < param.dim(); ++d) same_order &= param.size(d) == 1 || t.stride(d) == param.stride(d);
  TORCH_CHECK(same_order, what, "[", i, "]: strides ", t.strides(), " order its elements differently from its "
              "param's ", param.strides());
}

inline void check_dense(const at::Tensor& t, const char* what, size_t i, const at::Device& device) {
  TORCH_CHECK(t.device() == device, what, "[", i, "]: on ", t.device(), ", expected ", device,
              " like the other tensors of the call");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), what, "[", i, "]: the CUDA kernels need a dense tensor "
              "(contiguous or a permutation of it)");
}

inline void check_lists(size_t n, at::TensorList list, const char* what) {
  TORCH_CHECK(list.size() == n, what, ": holds ", list.size(), " tensors, params hold ", n);
}

// A device fp32 scalar (1 element) for a kernel to read, or null when absent.
inline const float* device_scalar(const std::optional<at::Tensor>& t, const at::Device& device, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == device, what, ": on ", t->device(), ", expected ", device);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1, what, ": expected one float32 element, got ",
              t->scalar_type(), " with ", t->numel(), " elements");
  return t->data_ptr<float>();
}

// lr as a device pointer (lr_tensor on the device: read by the kernels) or a host value.
struct Lr {
  const float* ptr = nullptr;
  float value = 0.0f;
  at::Tensor keep;  // a converted copy must outlive the launches (stream-ordered by the allocator)
};

inline Lr learning_rate(double lr, const std::optional<at::Tensor>& lr_tensor, const at::Device& device) {
  Lr out;
  out.value = static_cast<float>(lr);
  if (!lr_tensor.has_value() || !lr_tensor->defined()) return out;
  const at::Tensor& t = *lr_tensor;
  TORCH_CHECK(t.numel() == 1, "lr_tensor: expected one element, got ", t.numel());
  if (t.device().is_cpu()) {
#ifndef FASTLARS_CUDA_EMULATION
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "lr_tensor: on the CPU while a CUDA graph is being captured; its value would be frozen into "
                "the graph (put lr on the params' device)");
#endif
    out.value = t.item<float>();  // host memory: no device synchronisation
    return out;
  }
  TORCH_CHECK(t.device() == device, "lr_tensor: on ", t.device(), ", the params are on ", device);
  out.keep = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  out.ptr = out.keep.data_ptr<float>();
  return out;
}

struct Bounds {
  bool has = false;
  double lo = 0.0;
  double hi = 0.0;
};

inline Bounds ratio_bounds(const std::optional<at::ArrayRef<double>>& bounds) {
  if (!bounds.has_value()) return {};
  TORCH_CHECK(bounds->size() == 2 && (*bounds)[0] <= (*bounds)[1],
              "trust_ratio_bounds: expected (lo, hi) with lo <= hi, got ", *bounds);
  return {true, (*bounds)[0], (*bounds)[1]};
}

// The optional trust_ratios output: a contiguous fp32 vector of n elements on the params' device.
inline void check_ratio_output(const std::optional<at::Tensor>& out, size_t n, const at::Device& device) {
  if (!out.has_value() || !out->defined()) return;
  TORCH_CHECK(out->device() == device && out->scalar_type() == at::kFloat && out->dim() == 1 &&
                  out->numel() == static_cast<int64_t>(n) && out->is_contiguous(),
              "trust_ratios: expected a contiguous 1-D float32 tensor of ", n, " elements on ", device, ", got ",
              out->scalar_type(), " of shape ", out->sizes(), " on ", out->device());
}

// trust_ratios ← the step's ratios (1 when not adapting), kept where found_inf is set; no host sync.
inline void record_ratios(const std::optional<at::Tensor>& out, const at::Tensor& ratios, bool adapt,
                   const std::optional<at::Tensor>& found_inf) {
  if (!out.has_value() || !out->defined()) return;
  at::Tensor value = adapt ? ratios : at::ones_like(*out);
  if (found_inf.has_value() && found_inf->defined()) value = at::where(found_inf->reshape({}) != 0, *out, value);
  out->copy_(value);
}

}  // namespace fastlars::cuda
