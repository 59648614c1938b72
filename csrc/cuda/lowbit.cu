// Multi-tensor LAMB and LARS on CUDA with low-precision optimizer state: bf16/fp16 buffers or blockwise int8
// codes with fp32 block scales (format: fastlars/backends/quantization.py; per-element maths: the one copy in
// csrc/common/quant_math.h), fp32 masters or bf16 params written by stochastic rounding. The maths of
// fastlars/backends/reference_lowbit.py (THE spec), with the chunking of lowbit_launch.h.
//
// A warp owns one block of 256 elements at a time (lane l: elements l + 32k, k < 8, coalesced), so the
// block's absmax of the NEW values is a warp max of sign-cleared bit patterns (an integer max:
// order-independent), taken before the block's codes and scale are written by the same warp.
// A lane loads all 8 elements of every array of a block before it uses any: the state format is looked at
// once per block (a switch around unrolled loads, never one per element), so the loads of a block are in
// flight together instead of one memory latency per element (tests/test_cuda_sass.py checks the SASS).
//
// LAMB, adapt (3 launches per table):
//   pass 1   m, v decoded (old scales), updated in fp32, stored (quantised / rounded) and replaced by what
//            the stored state decodes to; u from those; Σw², Σu² per chunk (fixed slots, no atomics)
//   ratios   r_i = lamb_ratio(||w_i||, ||u_i||), chunk partials summed in a fixed order
//   pass 2   u recomputed from the stored state (the same bits as pass 1's), w ← w − lr·r·u written to the
//            master and the param, or to a bf16 param by stochastic rounding
// LAMB without adapt: pass 1 writes the weights itself (r = 1).
// LARS: pass 1 Σw² (and Σg² when no grad_norms are given), ratios, then the update: momentum decoded,
//   updated in fp32, stored quantised; the weights move by the fp32 momentum.
// When *found_inf != 0 every kernel returns before writing; lr, t, the grad scale and the clip coefficient
// are read on the device (capturable, no host synchronisation).
#include "../common/quant_math.h"
#include "lamb_consts.cuh"
#include "launch.h"
#include "lowbit_launch.h"
#include "multi_tensor_apply.cuh"
#include "step_math.cuh"

namespace fastlars::cuda {
namespace {

namespace quant = ::fastlars::quant;
static_assert(quant::kBlockSize == kQuantBlock, "lowbit_launch.h's block is quant_math.h's");

constexpr int kWarp = 32;
constexpr int kPerLane = static_cast<int>(kQuantBlock) / kWarp;  // elements of a block per lane

// The largest value over the warp (every lane gets it).
__device__ __forceinline__ uint32_t warp_max(uint32_t x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const uint32_t other = __shfl_xor_sync(0xffffffffu, x, offset);
    x = other > x ? other : x;
  }
  return x;
}

// Calls body(slot, c, geometry) for every chunk of the launch this CUDA block owns (c: launch-local id).
template <typename Body>
__device__ __forceinline__ void for_each_lowbit_chunk(const LowbitTable& t, Body&& body) {
  const int64_t total = t.chunk_end[t.count - 1];
  int slot = 0;
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    slot = advance_slot(t.chunk_end, t.count, slot, c);
    body(slot, c, lowbit_chunk(t.numel[slot], t.row_length[slot], c - slot_begin(t.chunk_end, slot)));
  }
}

// One block of a chunk: tensor elements [start, start + len) and the index of its scale.
struct QuantBlock {
  int64_t start;
  int len;
  int64_t scale;
};

// Calls f(block) for every block of the chunk this warp owns (the block's warps take them in turn); the
// loop is uniform over a warp, so f may shuffle.
template <typename F>
__device__ __forceinline__ void for_each_quant_block(const ChunkGeometry& g, F&& f) {
  const int64_t per_segment = chunk_count(g.segment, kQuantBlock);
  const int64_t blocks = (g.n / g.segment) * per_segment;
  const int64_t warps = blockDim.x / kWarp;
  for (int64_t j = threadIdx.x / kWarp; j < blocks; j += warps) {
    const int64_t segment = j / per_segment;
    const int64_t offset = (j - segment * per_segment) * kQuantBlock;
    const int64_t len = g.segment - offset < kQuantBlock ? g.segment - offset : kQuantBlock;
    f(QuantBlock{g.begin + segment * g.segment + offset, static_cast<int>(len), g.scale_base + j});
  }
}

// Element k of this lane in a block (valid when < the block's length).
__device__ __forceinline__ int lane_element(int k) { return static_cast<int>(threadIdx.x % kWarp) + kWarp * k; }

// A lane's loads of a block are issued for every array before any loaded value is used: a conversion or a
// decode waits for its load, and a switch on the format between two arrays' loads would make the second
// array's loads wait for the first's. So loads fill raw bits (fetch_lane), and the fp32 values are made
// from them afterwards.

// The raw bits of element lane_element(k) of a block of `len` ≥ 1 elements at `block`, k < 8. Past the block's
// end a lane loads the block's first element instead (unpredicated loads, which need no merge with the
// register's old value, an instruction that would wait for the load); the conversions zero those slots.
template <typename Raw>
__device__ __forceinline__ void fetch_lane(const void* block, int len, uint32_t (&bits)[kPerLane]) {
  const Raw* x = static_cast<const Raw*>(block);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) bits[k] = x[lane_element(k) < len ? lane_element(k) : 0];
}

// The unsigned integer type as wide as T.
template <typename T>
using RawOf = std::conditional_t<sizeof(T) == 4, uint32_t, std::conditional_t<sizeof(T) == 2, uint16_t, uint8_t>>;

// The fp32 value of a T given as its bits.
template <typename T>
__device__ __forceinline__ float from_bits(uint32_t bits) {
  if constexpr (std::is_same_v<T, float>) {
    return quant::float_of(bits);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return quant::bf16_to_float(static_cast<uint16_t>(bits));
  } else {
    const uint16_t raw = static_cast<uint16_t>(bits);
    __half h;
    memcpy(&h, &raw, sizeof h);
    return to_float(h);
  }
}

// The fp32 values of a lane's fetched elements of a block of `len` elements (0 past its end).
template <typename T>
__device__ __forceinline__ void from_bits(const uint32_t (&bits)[kPerLane], int len, float (&x)[kPerLane]) {
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) x[k] = lane_element(k) < len ? from_bits<T>(bits[k]) : 0.0f;
}

// Stores x[k] rounded to nearest T as element lane_element(k) of a block of `len` elements at `block`, and
// replaces x[k] by the stored value.
template <typename T>
__device__ __forceinline__ void store_rounded(T* block, int len, float (&x)[kPerLane]) {
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const T r = from_float<T>(x[k]);
    x[k] = to_float(r);
    if (lane_element(k) < len) block[lane_element(k)] = r;
  }
}

// A lane's raw state of one block: its elements' stored bits and, for int8, the block's scale.
struct LaneState {
  uint32_t bits[kPerLane];
  float scale;
};

// One state buffer of one tensor.
struct StateRef {
  void* values;
  float* scales;
  StateFormat format;

  __device__ StateRef(const LowbitTable& t, int slot, int buffer)
      : values(t.ptr[3 + 2 * buffer][slot]),
        scales(static_cast<float*>(t.ptr[4 + 2 * buffer][slot])),
        format(static_cast<StateFormat>(t.format[buffer][slot])) {}

  // Issues the loads of this lane's elements of block b (and of the block's scale).
  __device__ void fetch(const QuantBlock& b, LaneState& s) const {
    s.scale = 0.0f;
    switch (format) {
      case StateFormat::kInt8:
        s.scale = scales[b.scale];
        return fetch_lane<uint8_t>(static_cast<const uint8_t*>(values) + b.start, b.len, s.bits);
      case StateFormat::kBFloat16:
      case StateFormat::kHalf:
        return fetch_lane<uint16_t>(static_cast<const uint16_t*>(values) + b.start, b.len, s.bits);
      default:
        return fetch_lane<uint32_t>(static_cast<const uint32_t*>(values) + b.start, b.len, s.bits);
    }
  }

  // The fp32 values of fetched elements (0 past the block's end).
  template <bool Signed>
  __device__ void decode(const QuantBlock& b, const LaneState& s, float (&x)[kPerLane]) const {
    switch (format) {
      case StateFormat::kInt8:
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          const uint8_t code = static_cast<uint8_t>(s.bits[k]);
          const float value =
              Signed ? quant::dequantize_signed(code, s.scale) : quant::dequantize_unsigned(code, s.scale);
          x[k] = lane_element(k) < b.len ? value : 0.0f;
        }
        return;
      case StateFormat::kBFloat16:
        return from_bits<__nv_bfloat16>(s.bits, b.len, x);
      case StateFormat::kHalf:
        return from_bits<__half>(s.bits, b.len, x);
      default:
        return from_bits<float>(s.bits, b.len, x);
    }
  }

  // Stores the new fp32 values x of this lane's elements of block b (quantised with the block's absmax, or
  // rounded to nearest) and replaces them by what the stored state decodes to. Called by the whole warp.
  template <bool Signed>
  __device__ void store_block(const QuantBlock& b, float (&x)[kPerLane]) const {
    switch (format) {
      case StateFormat::kBFloat16:
        return store_rounded(static_cast<__nv_bfloat16*>(values) + b.start, b.len, x);
      case StateFormat::kHalf:
        return store_rounded(static_cast<__half*>(values) + b.start, b.len, x);
      case StateFormat::kFloat:
        return store_rounded(static_cast<float*>(values) + b.start, b.len, x);
      default:
        break;
    }
    uint32_t absmax = 0;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const uint32_t bits = lane_element(k) < b.len ? quant::magnitude_bits(x[k]) : 0u;
      absmax = bits > absmax ? bits : absmax;
    }
    absmax = warp_max(absmax);
    const float inv = quant::inverse_scale(absmax);
    const float scale = quant::stored_scale(absmax);
    uint8_t* codes = static_cast<uint8_t*>(values);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      if (lane_element(k) >= b.len) continue;
      const uint8_t code = Signed ? quant::quantize_signed(x[k], inv) : quant::quantize_unsigned(x[k], inv);
      codes[b.start + lane_element(k)] = code;
      x[k] = Signed ? quant::dequantize_signed(code, scale) : quant::dequantize_unsigned(code, scale);
    }
    if (threadIdx.x % kWarp == 0) scales[b.scale] = scale;
  }
};

// The weights of one tensor: read from the master (when kept) or the param; written to both, or to a bf16
// param by stochastic rounding keyed by the element's index in the tensor.
template <typename T, bool Master>
struct Weights {
  T* p;
  const T* g;
  float* master;
  bool rounded;

  __device__ Weights(const LowbitTable& t, int slot)
      : p(static_cast<T*>(t.ptr[0][slot])),
        g(static_cast<const T*>(t.ptr[1][slot])),
        master(Master ? static_cast<float*>(t.ptr[2][slot]) : nullptr),
        rounded(t.rounded[slot] != 0) {}

  __device__ float weight(int64_t i) const {
    if constexpr (Master) {
      return master[i];
    } else {
      return to_float(p[i]);
    }
  }

  __device__ float grad(int64_t i) const { return to_float(g[i]); }

  using Read = std::conditional_t<Master, float, T>;  // the type the weights are read from

  // Issues the loads of this lane's weights of block b (the masters' when kept; fp32 values via from_weight_bits).
  __device__ void fetch_weights(const QuantBlock& b, uint32_t (&bits)[kPerLane]) const {
    const Read* read = Master ? reinterpret_cast<const Read*>(master) : reinterpret_cast<const Read*>(p);
    fetch_lane<RawOf<Read>>(read + b.start, b.len, bits);
  }

  __device__ void from_weight_bits(const uint32_t (&bits)[kPerLane], int len, float (&w)[kPerLane]) const {
    from_bits<Read>(bits, len, w);
  }

  // Issues the loads of this lane's raw gradients of block b (fp32 values via from_bits<T>).
  __device__ void fetch_grads(const QuantBlock& b, uint32_t (&bits)[kPerLane]) const {
    fetch_lane<RawOf<T>>(g + b.start, b.len, bits);
  }

  __device__ void write(int64_t i, float w, uint32_t key) const {
    if constexpr (Master) {
      master[i] = w;
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      if (rounded) {
        const uint64_t index = static_cast<uint64_t>(i);
        reinterpret_cast<uint16_t*>(p)[i] =
            quant::stochastic_round_bf16(w, quant::sr_bits(quant::sr_index_key(key, index), index));
        return;
      }
    }
    p[i] = from_float<T>(w);
  }
};

// sr_key(tensor key, t) of a stochastically rounded param at this step (0 otherwise).
__device__ __forceinline__ uint32_t rounding_key(const LowbitTable& t, int slot, const float* steps) {
  return t.rounded[slot] != 0 ? quant::sr_key(t.key[slot], steps[t.index[slot]]) : 0u;
}

// ------------------------------------------------------------------------------------ LAMB
// Pass 1 (Fused = false: Σw², Σu² per chunk) or the whole step without adapt (Fused: weights written, r = 1).
template <typename T, bool Master, bool Fused>
__global__ void __launch_bounds__(kThreads)
    lamb_lowbit_update(const __grid_constant__ LowbitTable table, const LambOptions opt, const StepScalars s) {
  if (skipped(s)) return;
  const float clip = opt.clip_coef != nullptr ? *opt.clip_coef : 1.0f;
  for_each_lowbit_chunk(table, [&](int slot, int64_t c, const ChunkGeometry& geometry) {
    const Weights<T, Master> weights(table, slot);
    const StateRef m_ref(table, slot, 0), v_ref(table, slot, 1);
    const math::LambConsts consts = lamb_consts(opt, s, table.index[slot]);
    const uint32_t key = Fused ? rounding_key(table, slot, opt.steps) : 0u;
    float acc[2] = {0.0f, 0.0f};
    for_each_quant_block(geometry, [&](const QuantBlock& b) {
      uint32_t w_bits[kPerLane], g_bits[kPerLane];
      LaneState m_raw, v_raw;
      weights.fetch_grads(b, g_bits);
      weights.fetch_weights(b, w_bits);
      m_ref.fetch(b, m_raw);
      v_ref.fetch(b, v_raw);
      float w[kPerLane], g[kPerLane], m[kPerLane], v[kPerLane];
      from_bits<T>(g_bits, b.len, g);
      weights.from_weight_bits(w_bits, b.len, w);
      m_ref.decode<true>(b, m_raw, m);
      v_ref.decode<false>(b, v_raw, v);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        float gk = math::true_grad(g[k], s.grad_scale, opt.maximize);
        if (opt.clip_coef != nullptr) gk = gk * clip;
        math::lamb_moments(m[k], v[k], gk, consts);
      }
      m_ref.store_block<true>(b, m);
      v_ref.store_block<false>(b, v);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        if (lane_element(k) >= b.len) continue;
        const float u = math::lamb_direction(w[k], m[k], v[k], consts);
        if constexpr (Fused) {
          weights.write(b.start + lane_element(k), w[k] - consts.lr * u, key);
        } else {
          acc[0] += w[k] * w[k];
          acc[1] += u * u;
        }
      }
    });
    if constexpr (!Fused) {
      block_sum<2>(acc);
      if (threadIdx.x == 0) {
        s.partials[2 * (table.first_chunk + c)] = acc[0];
        s.partials[2 * (table.first_chunk + c) + 1] = acc[1];
      }
    }
  });
}

__global__ void __launch_bounds__(kFinalizeThreads)
    lamb_lowbit_ratios(const __grid_constant__ LowbitTable table, const LambOptions opt, const StepScalars s) {
  if (skipped(s)) return;
  float acc[2];
  sum_slot_partials<2>(table, s.partials, acc);
  if (threadIdx.x == 0) {
    s.ratios[table.index[blockIdx.x]] = math::lamb_ratio(sqrtf(acc[0]), sqrtf(acc[1]), opt.adapt, opt.trust_clip,
                                                         opt.has_bounds, opt.ratio_lo, opt.ratio_hi);
  }
}

// Pass 2: u from the stored (new) state and w, w ← w − lr·r·u.
template <typename T, bool Master>
__global__ void __launch_bounds__(kThreads)
    lamb_lowbit_apply(const __grid_constant__ LowbitTable table, const LambOptions opt, const StepScalars s) {
  if (skipped(s)) return;
  for_each_lowbit_chunk(table, [&](int slot, int64_t, const ChunkGeometry& geometry) {
    const Weights<T, Master> weights(table, slot);
    const StateRef m_ref(table, slot, 0), v_ref(table, slot, 1);
    const int idx = table.index[slot];
    const math::LambConsts consts = lamb_consts(opt, s, idx);
    const float step = consts.lr * s.ratios[idx];
    const uint32_t key = rounding_key(table, slot, opt.steps);
    for_each_quant_block(geometry, [&](const QuantBlock& b) {
      uint32_t w_bits[kPerLane];
      LaneState m_raw, v_raw;
      weights.fetch_weights(b, w_bits);
      m_ref.fetch(b, m_raw);
      v_ref.fetch(b, v_raw);
      float w[kPerLane], m[kPerLane], v[kPerLane];
      weights.from_weight_bits(w_bits, b.len, w);
      m_ref.decode<true>(b, m_raw, m);
      v_ref.decode<false>(b, v_raw, v);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        if (lane_element(k) >= b.len) continue;
        const float u = math::lamb_direction(w[k], m[k], v[k], consts);
        weights.write(b.start + lane_element(k), w[k] - step * u, key);
      }
    });
  });
}

template <typename T, bool Master>
void lamb_lowbit(const LowbitTable& table, const LambOptions& opt, const StepScalars& s, int grid,
                 cudaStream_t stream) {
  static_assert(sizeof(LowbitTable) + sizeof(LambOptions) + sizeof(StepScalars) <= kParamBytes,
                "low-precision LAMB kernel arguments exceed the parameter space");
  if (opt.adapt) {
    launch(lamb_lowbit_update<T, Master, false>, grid, kThreads, stream, table, opt, s);
    launch(lamb_lowbit_ratios, table.count, kFinalizeThreads, stream, table, opt, s);
    launch(lamb_lowbit_apply<T, Master>, grid, kThreads, stream, table, opt, s);
  } else {
    launch(lamb_lowbit_update<T, Master, true>, grid, kThreads, stream, table, opt, s);
  }
}

// ------------------------------------------------------------------------------------ LARS
// Σw² per chunk and, when no grad_norms are given, Σg² of the raw gradients.
template <typename T, bool Master>
__global__ void __launch_bounds__(kThreads)
    lars_lowbit_norms(const __grid_constant__ LowbitTable table, const LowbitLarsOptions opt, const StepScalars s) {
  if (skipped(s)) return;
  const bool fold = opt.lars.grad_norms == nullptr;
  for_each_lowbit_chunk(table, [&](int slot, int64_t c, const ChunkGeometry& geometry) {
    const Weights<T, Master> weights(table, slot);
    float acc[2] = {0.0f, 0.0f};
    // kPerLane strided elements per iteration, their loads issued together; each thread sums its elements in
    // the order of e, as one element per iteration would.
    const int64_t stride = blockDim.x;
    int64_t e = threadIdx.x;
    for (; e + (kPerLane - 1) * stride < geometry.n; e += kPerLane * stride) {
      float w[kPerLane], g[kPerLane];
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        w[k] = weights.weight(geometry.begin + e + k * stride);
        g[k] = fold ? weights.grad(geometry.begin + e + k * stride) : 0.0f;
      }
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        acc[0] += w[k] * w[k];
        if (fold) acc[1] += g[k] * g[k];
      }
    }
    for (; e < geometry.n; e += stride) {
      const float w = weights.weight(geometry.begin + e);
      acc[0] += w * w;
      if (fold) {
        const float g = weights.grad(geometry.begin + e);
        acc[1] += g * g;
      }
    }
    block_sum<2>(acc);
    if (threadIdx.x == 0) {
      s.partials[2 * (table.first_chunk + c)] = acc[0];
      s.partials[2 * (table.first_chunk + c) + 1] = acc[1];
    }
  });
}

__global__ void __launch_bounds__(kFinalizeThreads)
    lars_lowbit_ratios(const __grid_constant__ LowbitTable table, const LowbitLarsOptions opt, const StepScalars s) {
  if (skipped(s)) return;
  float acc[2];
  sum_slot_partials<2>(table, s.partials, acc);
  if (threadIdx.x == 0) {
    const int idx = table.index[blockIdx.x];
    const LarsOptions& o = opt.lars;
    float g_norm = 0.0f;
    if (o.grad_norms != nullptr) {
      g_norm = o.grad_norms[idx];
    } else {
      g_norm = sqrtf(acc[1]);
      if (s.grad_scale != nullptr) g_norm = g_norm / *s.grad_scale;
    }
    s.ratios[idx] = math::lars_ratio(sqrtf(acc[0]), g_norm, read_lr(s), o.trust_coefficient, o.weight_decay, o.eps,
                                     o.adapt, o.trust_clip, o.has_bounds, o.ratio_lo, o.ratio_hi);
  }
}

template <typename T, bool Master>
__global__ void __launch_bounds__(kThreads)
    lars_lowbit_update(const __grid_constant__ LowbitTable table, const LowbitLarsOptions opt, const StepScalars s) {
  if (skipped(s)) return;
  const LarsOptions& o = opt.lars;
  const float lr = read_lr(s);
  for_each_lowbit_chunk(table, [&](int slot, int64_t, const ChunkGeometry& geometry) {
    const Weights<T, Master> weights(table, slot);
    const StateRef ref(table, slot, 0);
    const float r = o.adapt ? s.ratios[table.index[slot]] : 1.0f;
    const uint32_t key = rounding_key(table, slot, opt.steps);
    for_each_quant_block(geometry, [&](const QuantBlock& b) {
      uint32_t w_bits[kPerLane], g_bits[kPerLane];
      LaneState v_raw;
      weights.fetch_grads(b, g_bits);
      weights.fetch_weights(b, w_bits);
      ref.fetch(b, v_raw);
      float w[kPerLane], g[kPerLane], v[kPerLane];
      from_bits<T>(g_bits, b.len, g);
      weights.from_weight_bits(w_bits, b.len, w);
      ref.decode<true>(b, v_raw, v);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const float gk = math::true_grad(g[k], s.grad_scale, o.maximize);
        math::lars_element(w[k], v[k], gk, lr, r, o.momentum, o.weight_decay, o.nesterov, o.mlperf_style);
      }
      ref.store_block<true>(b, v);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        if (lane_element(k) < b.len) weights.write(b.start + lane_element(k), w[k], key);
      }
    });
  });
}

template <typename T, bool Master>
void lars_lowbit(const LowbitTable& table, const LowbitLarsOptions& opt, const StepScalars& s, int grid,
                 cudaStream_t stream) {
  static_assert(sizeof(LowbitTable) + sizeof(LowbitLarsOptions) + sizeof(StepScalars) <= kParamBytes,
                "low-precision LARS kernel arguments exceed the parameter space");
  if (opt.lars.adapt) {
    launch(lars_lowbit_norms<T, Master>, grid, kThreads, stream, table, opt, s);
    launch(lars_lowbit_ratios, table.count, kFinalizeThreads, stream, table, opt, s);
  }
  launch(lars_lowbit_update<T, Master>, grid, kThreads, stream, table, opt, s);
}

}  // namespace

void launch_lamb_lowbit(const LowbitTable& table, Storage storage, const LambOptions& opt, const StepScalars& s,
                        int grid, cudaStream_t stream) {
  switch (storage.param) {
    case DType::kFloat:
      return storage.master ? lamb_lowbit<float, true>(table, opt, s, grid, stream)
                            : lamb_lowbit<float, false>(table, opt, s, grid, stream);
    case DType::kBFloat16:
      return storage.master ? lamb_lowbit<__nv_bfloat16, true>(table, opt, s, grid, stream)
                            : lamb_lowbit<__nv_bfloat16, false>(table, opt, s, grid, stream);
    case DType::kHalf:
      return storage.master ? lamb_lowbit<__half, true>(table, opt, s, grid, stream)
                            : lamb_lowbit<__half, false>(table, opt, s, grid, stream);
  }
}

void launch_lars_lowbit(const LowbitTable& table, Storage storage, const LowbitLarsOptions& opt, const StepScalars& s,
                        int grid, cudaStream_t stream) {
  switch (storage.param) {
    case DType::kFloat:
      return storage.master ? lars_lowbit<float, true>(table, opt, s, grid, stream)
                            : lars_lowbit<float, false>(table, opt, s, grid, stream);
    case DType::kBFloat16:
      return storage.master ? lars_lowbit<__nv_bfloat16, true>(table, opt, s, grid, stream)
                            : lars_lowbit<__nv_bfloat16, false>(table, opt, s, grid, stream);
    case DType::kHalf:
      return storage.master ? lars_lowbit<__half, true>(table, opt, s, grid, stream)
                            : lars_lowbit<__half, false>(table, opt, s, grid, stream);
  }
}

}  // namespace fastlars::cuda
