// Multi-tensor LAMB on CUDA, one wave of tensors at a time (see chunk_plan.h):
//
//   pass 1   new moments m', v' and the direction u from (w, g, m, v); per chunk Σw², Σu²;
//            m', v' are written when they are fp32 (reads w, g, m, v; writes m, v: 24 B/elem)
//   ratios   r_i = lamb_ratio(||w_i||, ||u_i||) from the chunk partials, fixed order, no atomics
//   pass 2   u recomputed from the stored m', v' and w; w − lr·r·u written (reads w, m, v; writes
//            w: 16 B/elem). Together 40 B/elem from HBM where a wave exceeds L2, 28 B (the
//            compulsory traffic) where pass 2 finds the wave in L2.
//
// u is never stored (apex writes it into the grad buffer and reads it back: +8 B/elem). Moments
// kept in bf16/fp16 (no master weights) are not written in pass 1: pass 2 then recomputes them
// from g, so u is always formed from the unrounded fp32 moments, as in the reference. Groups that
// do not adapt run one fused pass (r = 1). When *found_inf != 0 nothing is written; lr, t, the
// grad scale and the clip coefficient are read on the device (capturable).
#include "launch.h"
#include "multi_tensor_apply.cuh"
#include "lamb_consts.cuh"
#include "step_math.cuh"

namespace fastlars::cuda {
namespace {

// The lists of one slot, offset to a chunk. S: the dtype of m and v.
template <typename T, typename S, bool Master>
struct LambChunk {
  T* p;
  const T* g;
  S* m;
  S* v;
  float* master;

  __device__ LambChunk(const LambTable& t, int slot, int64_t begin)
      : p(static_cast<T*>(t.ptr[0][slot]) + begin),
        g(static_cast<const T*>(t.ptr[1][slot]) + begin),
        m(static_cast<S*>(t.ptr[2][slot]) + begin),
        v(static_cast<S*>(t.ptr[3][slot]) + begin),
        master(Master ? static_cast<float*>(t.ptr[4][slot]) + begin : nullptr) {}

  __device__ bool aligned() const {
    bool ok = vec_aligned(p) && vec_aligned(g) && vec_aligned(m) && vec_aligned(v);
    if constexpr (Master) ok = ok && vec_aligned(master);
    return ok;
  }

  template <int W>
  __device__ __forceinline__ void load_w(int64_t i, float (&w)[W]) const {
    if constexpr (Master) {
      load<W>(master, i, w);
    } else {
      load<W>(p, i, w);
    }
  }

  // Loads W elements at i and computes the new moments and u in registers (w decayed when decoupled).
  template <int W>
  __device__ __forceinline__ void compute(int64_t i, const LambOptions& opt, const StepScalars& s,
                                          const math::LambConsts& c, float clip, float (&w)[W], float (&mm)[W],
                                          float (&vv)[W], float (&u)[W]) const {
    float gr[W];
    load_w<W>(i, w);
    load<W>(g, i, gr);
    load<W>(m, i, mm);
    load<W>(v, i, vv);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      float gk = math::true_grad(gr[k], s.grad_scale, opt.maximize);
      if (opt.clip_coef != nullptr) gk = gk * clip;
      u[k] = math::lamb_element(w[k], mm[k], vv[k], gk, c);
    }
  }

  // Loads W elements at i whose moments are already the new ones, and forms u from them.
  template <int W>
  __device__ __forceinline__ void direction(int64_t i, const math::LambConsts& c, float (&w)[W],
                                            float (&u)[W]) const {
    float mm[W], vv[W];
    load_w<W>(i, w);
    load<W>(m, i, mm);
    load<W>(v, i, vv);
#pragma unroll
    for (int k = 0; k < W; ++k) u[k] = math::lamb_direction(w[k], mm[k], vv[k], c);
  }
};

// Whether pass 1 writes the new moments (they are fp32, so pass 2 reads back exactly what it
// would recompute) instead of leaving them to pass 2.
template <typename T, bool Master>
constexpr bool kStoreMoments = Master || std::is_same_v<T, float>;

template <typename T, bool Master>
__global__ void __launch_bounds__(kThreads) lamb_pass1(const __grid_constant__ LambTable table, const LambOptions opt,
                                                       const StepScalars s) {
  using S = std::conditional_t<Master, float, T>;
  if (skipped(s)) return;
  const float clip = opt.clip_coef != nullptr ? *opt.clip_coef : 1.0f;
  for_each_chunk(table, [&](int slot, int64_t c, int64_t begin, int64_t n) {
    const LambChunk<T, S, Master> chunk(table, slot, begin);
    const math::LambConsts consts = lamb_consts(opt, s, table.index[slot]);
    float acc[2] = {0.0f, 0.0f};
    for_each_element<kVecOf<T>>(n, chunk.aligned(), [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      float w[W], mm[W], vv[W], u[W];
      chunk.template compute<W>(i, opt, s, consts, clip, w, mm, vv, u);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        acc[0] += w[k] * w[k];
        acc[1] += u[k] * u[k];
      }
      if constexpr (kStoreMoments<T, Master>) {
        store<W>(chunk.m, i, mm);
        store<W>(chunk.v, i, vv);
      }
    });
    block_sum<2>(acc);
    if (threadIdx.x == 0) {
      s.partials[2 * (table.first_chunk + c)] = acc[0];
      s.partials[2 * (table.first_chunk + c) + 1] = acc[1];
    }
  });
}

__global__ void __launch_bounds__(kFinalizeThreads)
    lamb_ratios(const __grid_constant__ LambTable table, const LambOptions opt, const StepScalars s) {
  if (skipped(s)) return;
  float acc[2];
  sum_slot_partials<2>(table, s.partials, acc);
  if (threadIdx.x == 0) {
    s.ratios[table.index[blockIdx.x]] =
        math::lamb_ratio(sqrtf(acc[0]), sqrtf(acc[1]), opt.adapt, opt.trust_clip, opt.has_bounds, opt.ratio_lo,
                         opt.ratio_hi);
  }
}

// FromMoments: m and v already hold the new moments (pass 1 wrote them); else they are updated here.
template <typename T, bool Master, bool FromMoments>
__global__ void __launch_bounds__(kThreads) lamb_pass2(const __grid_constant__ LambTable table, const LambOptions opt,
                                                       const StepScalars s) {
  using S = std::conditional_t<Master, float, T>;
  if (skipped(s)) return;
  const float clip = opt.clip_coef != nullptr ? *opt.clip_coef : 1.0f;
  for_each_chunk(table, [&](int slot, int64_t, int64_t begin, int64_t n) {
    const LambChunk<T, S, Master> chunk(table, slot, begin);
    const int idx = table.index[slot];
    const math::LambConsts consts = lamb_consts(opt, s, idx);
    const float step = consts.lr * (opt.adapt ? s.ratios[idx] : 1.0f);
    for_each_element<kVecOf<T>>(n, chunk.aligned(), [&](auto width, int64_t i) {
      constexpr int W = decltype(width)::value;
      float w[W], u[W];
      if constexpr (FromMoments) {
        chunk.template direction<W>(i, consts, w, u);
      } else {
        float mm[W], vv[W];
        chunk.template compute<W>(i, opt, s, consts, clip, w, mm, vv, u);
        store<W>(chunk.m, i, mm);
        store<W>(chunk.v, i, vv);
      }
#pragma unroll
      for (int k = 0; k < W; ++k) w[k] = w[k] - step * u[k];
      if constexpr (Master) store<W>(chunk.master, i, w);
      store<W>(chunk.p, i, w);
    });
  });
}

template <typename T, bool Master>
void lamb_wave(const LambTable& table, const LambOptions& opt, const StepScalars& s, int grid, cudaStream_t stream) {
  static_assert(sizeof(LambTable) + sizeof(LambOptions) + sizeof(StepScalars) <= kParamBytes,
                "LAMB kernel arguments exceed the parameter space");
  if (opt.adapt) {
    launch(lamb_pass1<T, Master>, grid, kThreads, stream, table, opt, s);
    launch(lamb_ratios, table.count, kFinalizeThreads, stream, table, opt, s);
    launch(lamb_pass2<T, Master, kStoreMoments<T, Master>>, grid, kThreads, stream, table, opt, s);
  } else {
    launch(lamb_pass2<T, Master, false>, grid, kThreads, stream, table, opt, s);
  }
}

}  // namespace

void launch_lamb_wave(const LambTable& table, Storage storage, const LambOptions& opt, const StepScalars& s, int grid,
                      cudaStream_t stream) {
  switch (storage.param) {
    case DType::kFloat:
      return storage.master ? lamb_wave<float, true>(table, opt, s, grid, stream)
                            : lamb_wave<float, false>(table, opt, s, grid, stream);
    case DType::kBFloat16:
      return storage.master ? lamb_wave<__nv_bfloat16, true>(table, opt, s, grid, stream)
                            : lamb_wave<__nv_bfloat16, false>(table, opt, s, grid, stream);
    case DType::kHalf:
      return storage.master ? lamb_wave<__half, true>(table, opt, s, grid, stream)
                            : lamb_wave<__half, false>(table, opt, s, grid, stream);
  }
}

}  // namespace fastlars::cuda
