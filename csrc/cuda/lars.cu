// Multi-tensor LARS on CUDA, one wave of tensors at a time (see chunk_plan.h):
//
//   pass 1   partials[c] = Σ w² over chunk c                         (reads w: 4 B/elem in fp32)
//   ratios   r_i = lars_ratio(||w_i||, ||g_i||) from the chunk partials, fixed order, no atomics
//   pass 2   d = g/scale + λ·w, fused momentum update, w and v written (reads w, g, v; writes w, v)
//
// A wave's tensors are sized so that pass 2 finds w still in L2. Groups that do not adapt skip
// pass 1 and the ratios (r = 1). When *found_inf != 0 pass 2 writes nothing; no host sync anywhere.
#include "launch.h"
#include "multi_tensor_apply.cuh"
#include "step_math.cuh"

namespace fastlars::cuda {
namespace {

// Σ w² per chunk, w the fp32 master when kept, else the param.
template <typename T, bool Master>
__global__ void __launch_bounds__(kThreads) lars_pass1(const __grid_constant__ LarsTable table, const StepScalars s) {
  if (skipped(s)) return;
  for_each_chunk(table, [&](int slot, int64_t c, int64_t begin, int64_t n) {
    float acc[1] = {0.0f};
    if constexpr (Master) {
      const float* w = static_cast<const float*>(table.ptr[3][slot]) + begin;
      for_each_element<kVecOf<T>>(n, vec_aligned(w), [&](auto width, int64_t i) {
        constexpr int W = decltype(width)::value;
        float x[W];
        load<W>(w, i, x);
#pragma unroll
        for (int k = 0; k < W; ++k) acc[0] += x[k] * x[k];
      });
    } else {
      const T* w = static_cast<const T*>(table.ptr[0][slot]) + begin;
      for_each_element<kVecOf<T>>(n, vec_aligned(w), [&](auto width, int64_t i) {
        constexpr int W = decltype(width)::value;
        float x[W];
        load<W>(w, i, x);
#pragma unroll
        for (int k = 0; k < W; ++k) acc[0] += x[k] * x[k];
      });
    }
    block_sum<1>(acc);
    if (threadIdx.x == 0) s.partials[table.first_chunk + c] = acc[0];
  });
}

__global__ void __launch_bounds__(kFinalizeThreads)
    lars_ratios(const __grid_constant__ LarsTable table, const LarsOptions opt, const StepScalars s) {
  if (skipped(s)) return;
  float acc[1];
  sum_slot_partials<1>(table, s.partials, acc);
  if (threadIdx.x == 0) {
    const int idx = table.index[blockIdx.x];
    s.ratios[idx] = math::lars_ratio(sqrtf(acc[0]), opt.grad_norms[idx], read_lr(s), opt.trust_coefficient,
                                     opt.weight_decay, opt.eps, opt.adapt, opt.trust_clip, opt.has_bounds,
                                     opt.ratio_lo, opt.ratio_hi);
  }
}

template <typename T, bool Master>
__global__ void __launch_bounds__(kThreads) lars_pass2(const __grid_constant__ LarsTable table, const LarsOptions opt,
                                                       const StepScalars s) {
  using S = std::conditional_t<Master, float, T>;  // momentum buffer dtype
  if (skipped(s)) return;
  const float lr = read_lr(s);
  for_each_chunk(table, [&](int slot, int64_t, int64_t begin, int64_t n) {
    T* p = static_cast<T*>(table.ptr[0][slot]) + begin;
    const T* g = static_cast<const T*>(table.ptr[1][slot]) + begin;
    S* v = static_cast<S*>(table.ptr[2][slot]) + begin;
    float* master = Master ? static_cast<float*>(table.ptr[3][slot]) + begin : nullptr;
    const float r = opt.adapt ? s.ratios[table.index[slot]] : 1.0f;
    bool aligned = vec_aligned(p) && vec_aligned(g) && vec_aligned(v);
    if constexpr (Master) aligned = aligned && vec_aligned(master);
    for_each_element<kVecOf<T>>(n, aligned, [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      float w[W], gr[W], mom[W];
      if constexpr (Master) {
        load<W>(master, i, w);
      } else {
        load<W>(p, i, w);
      }
      load<W>(g, i, gr);
      load<W>(v, i, mom);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float gk = math::true_grad(gr[k], s.grad_scale, opt.maximize);
        math::lars_element(w[k], mom[k], gk, lr, r, opt.momentum, opt.weight_decay, opt.nesterov, opt.mlperf_style);
      }
      store<W>(v, i, mom);
      if constexpr (Master) store<W>(master, i, w);
      store<W>(p, i, w);
    });
  });
}

template <typename T, bool Master>
void lars_wave(const LarsTable& table, const LarsOptions& opt, const StepScalars& s, int grid, cudaStream_t stream) {
  static_assert(sizeof(LarsTable) + sizeof(LarsOptions) + sizeof(StepScalars) <= kParamBytes,
                "LARS kernel arguments exceed the parameter space");
  if (opt.adapt) {
    launch(lars_pass1<T, Master>, grid, kThreads, stream, table, s);
    launch(lars_ratios, table.count, kFinalizeThreads, stream, table, opt, s);
  }
  launch(lars_pass2<T, Master>, grid, kThreads, stream, table, opt, s);
}

}  // namespace

void launch_lars_wave(const LarsTable& table, Storage storage, const LarsOptions& opt, const StepScalars& s, int grid,
                      cudaStream_t stream) {
  switch (storage.param) {
    case DType::kFloat:
      return storage.master ? lars_wave<float, true>(table, opt, s, grid, stream)
                            : lars_wave<float, false>(table, opt, s, grid, stream);
    case DType::kBFloat16:
      return storage.master ? lars_wave<__nv_bfloat16, true>(table, opt, s, grid, stream)
                            : lars_wave<__nv_bfloat16, false>(table, opt, s, grid, stream);
    case DType::kHalf:
      return storage.master ? lars_wave<__half, true>(table, opt, s, grid, stream)
                            : lars_wave<__half, false>(table, opt, s, grid, stream);
  }
}

}  // namespace fastlars::cuda
