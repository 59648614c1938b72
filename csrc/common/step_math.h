// Per-element and per-tensor LARS/LAMB arithmetic shared by the CPU kernels (csrc/cpu) and the CUDA
// kernels (csrc/cuda), in fp32, in the same order of operations as fastlars/backends/reference.py (the
// spec) so results agree to rounding. FASTLARS_HD makes every function __host__ __device__ under nvcc
// and a plain inline function elsewhere, so the CPU tests run the arithmetic the GPU runs: nvcc builds
// with -fmad=false and the host with -ffp-contract=off (setup.py), so neither fuses a*b+c; the device's
// powf (LAMB's bias corrections) may differ from glibc's in the last bit.
#pragma once

#include <math.h>

// A file may define FASTLARS_HD itself first (csrc/cpu/kernels.inc makes the functions static, so each
// instruction-set build of the CPU element loops keeps its own copy).
#ifndef FASTLARS_HD
#if defined(__CUDACC__)
#define FASTLARS_HD __host__ __device__ __forceinline__
#else
#define FASTLARS_HD inline
#endif
#endif

namespace fastlars::math {

// The gradient of the loss: g / grad_scale (absent: g), negated for maximize.
FASTLARS_HD float true_grad(float g, const float* grad_scale, bool maximize) {
  if (grad_scale != nullptr) g = g / *grad_scale;
  return maximize ? -g : g;
}

// min/max clamp of a trust ratio to [lo, hi] when bounds are set.
FASTLARS_HD float clamp_ratio(float r, bool has_bounds, float lo, float hi) {
  if (!has_bounds) return r;
  return fminf(fmaxf(r, lo), hi);
}

// LARS: r = η·||w|| / (||g|| + λ·||w|| + ε); trust_clip: min(r / lr, 1); clamped to the bounds;
// 1 when ||w|| = 0 or ||g|| = 0 or the group does not adapt.
FASTLARS_HD float lars_ratio(float w_norm, float g_norm, float lr, float eta, float weight_decay, float eps,
                                  bool adapt, bool trust_clip, bool has_bounds, float lo, float hi) {
  if (!adapt) return 1.0f;
  float r = eta * w_norm / (g_norm + weight_decay * w_norm + eps);
  if (trust_clip) r = fminf(r / lr, 1.0f);
  r = clamp_ratio(r, has_bounds, lo, hi);
  return (w_norm > 0.0f && g_norm > 0.0f) ? r : 1.0f;
}

// LAMB: r = ||w|| / ||u||; trust_clip: min(r, 1); clamped to the bounds; 1 when a norm is 0 or
// the group does not adapt.
FASTLARS_HD float lamb_ratio(float w_norm, float u_norm, bool adapt, bool trust_clip, bool has_bounds, float lo,
                                  float hi) {
  if (!adapt) return 1.0f;
  float r = w_norm / u_norm;
  if (trust_clip) r = fminf(r, 1.0f);
  r = clamp_ratio(r, has_bounds, lo, hi);
  return (w_norm > 0.0f && u_norm > 0.0f) ? r : 1.0f;
}

// One LARS element. d = g + λ·w;
//   mlperf: v ← μ·v + (lr·r)·d ; w ← w − v                (nesterov: w − (μ·v + (lr·r)·d))
//   torch:  v ← μ·v + r·d      ; w ← w − lr·v             (nesterov: w − lr·(μ·v + r·d))
FASTLARS_HD void lars_element(float& w, float& v, float g, float lr, float r, float momentum,
                                   float weight_decay, bool nesterov, bool mlperf_style) {
  const float d = g + weight_decay * w;
  float update;
  if (mlperf_style) {
    const float step = lr * r;
    v = momentum * v + step * d;
    update = nesterov ? momentum * v + step * d : v;
  } else {
    v = momentum * v + r * d;
    update = nesterov ? lr * (momentum * v + r * d) : lr * v;
  }
  w = w - update;
}

// LAMB constants of one tensor at step t.
struct LambConsts {
  float beta1, beta2;
  float beta3;                // 1 − β1 (grad_averaging) or 1, rounded from double as the reference does
  float one_minus_beta2;      // 1 − β2, rounded from double
  float inv_bc1, inv_bc2;     // 1 / (1 − β^t) (bias_correction) or 1: a multiply per element, not a divide
  float eps, weight_decay, lr;
  bool has_decay;             // weight_decay != 0 (a separate flag so a kernel can make it a constant)
  bool decoupled;
};

// w after LAMB's decoupled decay, w − (lr·λ)·w; w itself without it.
FASTLARS_HD float lamb_decayed_weight(float w, const LambConsts& c) {
  return (c.has_decay && c.decoupled) ? w - (c.lr * c.weight_decay) * w : w;
}

// LAMB direction of one element from its new moments (w is the fp32 weight):
//   u = (m·(1/bc1)) / (√(v·(1/bc2)) + ε)     (bc = 1 − β^t; within an ulp of the reference's m/bc1)
//   coupled decay: u += λ·w ;  decoupled decay: w ← w − (lr·λ)·w  (w then enters the ratio decayed)
FASTLARS_HD float lamb_direction(float& w, float m, float v, const LambConsts& c) {
  float u = (m * c.inv_bc1) / (sqrtf(v * c.inv_bc2) + c.eps);
  if (c.has_decay && !c.decoupled) u = u + c.weight_decay * w;
  w = lamb_decayed_weight(w, c);
  return u;
}

// LAMB moments of one element (g the clipped true gradient): m ← β1·m + β3·g ; v ← β2·v + (1−β2)·g².
// lamb_element: the moments, then lamb_direction; returns u, with m, v and (decoupled) w updated in
// the caller's registers.
FASTLARS_HD void lamb_moments(float& m, float& v, float g, const LambConsts& c) {
  m = c.beta1 * m + c.beta3 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
}

FASTLARS_HD float lamb_element(float& w, float& m, float& v, float g, const LambConsts& c) {
  lamb_moments(m, v, g, c);
  return lamb_direction(w, m, v, c);
}

}  // namespace fastlars::math
