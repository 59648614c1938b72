// The interface between the host glue (ops.cpp, which knows ATen) and the kernels (*.cu, which do
// not): plain structs, raw pointers and a stream, so the .cu files compile without torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "tensor_table.h"

namespace fastlars::cuda {

enum class DType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// How one bucket of tensors is stored: the param (and grad) dtype, and whether an fp32 master copy
// is updated in its place (then the optimizer buffers are fp32, else they have the param dtype).
struct Storage {
  DType param;
  bool master;
};

// Device scalars every step kernel reads (null pointers mean "absent").
struct StepScalars {
  const float* lr_ptr;      // learning rate on the device (capturable), or null: use `lr`
  float lr;
  const float* grad_scale;  // GradScaler's scale: gradients are divided by it
  const float* found_inf;   // non-zero: the step writes nothing
  float* partials;          // per-chunk partial sums, call-wide chunk ids (N floats per chunk)
  float* ratios;            // per-tensor trust ratio, indexed by TensorTable::index
};

// ---------------------------------------------------------------------------- L2 norms
// Lists: 0 = the tensors. partials: one float per chunk.
constexpr int kNormDepth = 1;
using NormTable = TensorTable<kNormDepth>;

// partials[first_chunk + c] = Σ x² over launch-local chunk c (fp32 accumulation).
void launch_sumsq(const NormTable& table, DType dtype, float* partials, int grid, cudaStream_t stream);

// out[index[s]] = sqrt(Σ partials over slot s's chunks) / (*grad_scale when not null).
void launch_norm_finalize(const NormTable& table, const float* partials, const float* grad_scale, float* out,
                          cudaStream_t stream);

// ---------------------------------------------------------------------------------- LARS
// Lists: 0 param, 1 grad, 2 momentum buffer, 3 fp32 master (null without a master).
constexpr int kLarsDepth = 4;
using LarsTable = TensorTable<kLarsDepth>;

struct LarsOptions {
  float momentum;
  float weight_decay;
  float trust_coefficient;
  float eps;
  bool nesterov;
  bool trust_clip;
  bool mlperf_style;  // lr inside the momentum buffer (MLPerf), else outside (torch / timm)
  bool adapt;
  bool has_bounds;
  float ratio_lo;
  float ratio_hi;
  bool maximize;
  const float* grad_norms;  // ||g|| of the unscaled gradients, indexed by TensorTable::index
};

// One wave: pass 1 (Σw² per chunk), per-tensor trust ratios, pass 2 (fused momentum update).
void launch_lars_wave(const LarsTable& table, Storage storage, const LarsOptions& opt, const StepScalars& s,
                      int grid, cudaStream_t stream);

// ---------------------------------------------------------------------------------- LAMB
// Lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 fp32 master (null without a master).
constexpr int kLambDepth = 5;
using LambTable = TensorTable<kLambDepth>;

struct LambOptions {
  float beta1;
  float beta2;
  float beta3;            // 1 − β1 when grad_averaging, else 1 (computed in double on the host)
  float one_minus_beta2;  // 1 − β2 (computed in double on the host)
  float eps;
  float weight_decay;
  bool bias_correction;
  bool grad_averaging;
  bool decoupled_decay;
  bool trust_clip;
  bool adapt;
  bool has_bounds;
  float ratio_lo;
  float ratio_hi;
  bool maximize;
  const float* steps;      // step count t of each tensor (already incremented), by TensorTable::index
  const float* clip_coef;  // global-norm clip coefficient, or null
};

// One wave: pass 1 (new moments, written when fp32; Σw², Σu² per chunk), per-tensor trust
// ratios, pass 2 (u recomputed from the moments; w written). See lamb.cu.
void launch_lamb_wave(const LambTable& table, Storage storage, const LambOptions& opt, const StepScalars& s,
                      int grid, cudaStream_t stream);

}  // namespace fastlars::cuda
