// The element loops of the CPU kernels, compiled once per x86 instruction set (kernels_avx512.cpp,
// kernels_avx2.cpp, kernels_baseline.cpp each include kernels.inc under its own target) and picked
// once, at the first step, for the CPU the process runs on. Every build does the same fp32 operations
// in the same order (no fused multiply-add, sums in 16 fixed partial accumulators), so the results are
// bit-identical whichever build runs; only the vector width differs.
//
// Nothing here includes ATen: these files are compiled for instruction sets the rest of the library
// must not assume.
#pragma once

#include <cstdint>

#include "../common/quant_math.h"
#include "../common/step_math.h"

namespace fastlars::cpu {

// LARS per-tensor inputs of the update loop (scale: the GradScaler scale when `scaled`).
struct LarsArgs {
  bool scaled, maximize, nesterov, mlperf;
  float scale, lr, ratio, momentum, weight_decay;
};

// LAMB per-tensor inputs of the element loops (clip: the global-norm clip coefficient, 1 when off).
struct LambArgs {
  bool scaled, maximize;
  float scale, clip;
  math::LambConsts consts;  // its has_decay and decoupled flags select the loop
};

// One instruction-set build of the element loops. n is a chunk's length; all pointers are fp32.
struct ElementKernels {
  const char* isa;
  // Σ x².
  float (*sum_of_squares)(const float* x, int64_t n);
  // LARS: v, w ← lars_element(...) for every element.
  void (*lars_update)(float* w, float* v, const float* g, int64_t n, const LarsArgs& a);
  // LAMB pass 1: new m, v in place, sums[0] = Σw'², sums[1] = Σu² (w' decoupled-decayed; w is not
  // written), and u itself into u_out unless it is null.
  void (*lamb_moments)(const float* w, float* m, float* v, const float* g, float* u_out, int64_t n,
                       const LambArgs& a, float* sums);
  // LAMB pass 2 from a stored u: w ← w' − step·u.
  void (*lamb_apply_stored)(float* w, const float* u, int64_t n, const LambArgs& a, float step);
  // LAMB pass 2 recomputing u from the new moments: w ← w' − step·u(m, v).
  void (*lamb_apply_recomputed)(float* w, const float* m, const float* v, int64_t n, const LambArgs& a,
                                float step);
  // The new moments only (pass 2 of low-precision moments, whose pass 1 worked on copies).
  void (*lamb_moments_only)(float* m, float* v, const float* g, int64_t n, const LambArgs& a);
  // Moments and update in one pass (a group that does not adapt: step is lr).
  void (*lamb_full)(float* w, float* m, float* v, const float* g, int64_t n, const LambArgs& a, float step);
  // Bandwidth probes (not a step): Σx; x ← c·x + z, and y ← c·y + z unless y is null.
  float (*stream_sum)(const float* x, int64_t n);
  void (*stream_update)(float* x, float* y, const float* z, int64_t n, float c);
  // Low-precision state (format: fastlars/backends/quantization.py, maths: quant_math.h). A "piece" of n
  // elements starts at a block boundary of a row and holds whole blocks of quant::kBlockSize (the last one
  // may be ragged: it ends the row); `scales` holds one fp32 scale per block of the piece.
  // out ← decode(codes)·scale (mitchell4_signed / mitchell8_unsigned).
  void (*decode_signed)(const uint8_t* codes, const float* scales, float* out, int64_t n);
  void (*decode_unsigned)(const uint8_t* codes, const float* scales, float* out, int64_t n);
  // Per block: absmax, codes and stored scale written; x ← what the codes decode to.
  void (*quantize_signed)(float* x, uint8_t* codes, float* scales, int64_t n);
  void (*quantize_unsigned)(float* x, uint8_t* codes, float* scales, int64_t n);
  // LAMB direction from (decoded) moments: u into u_out unless null, sums[0] = Σw'², sums[1] = Σu² (w is
  // not written; w' is w after decoupled decay).
  void (*lamb_direction_sums)(const float* w, const float* m, const float* v, float* u_out, int64_t n,
                              const LambArgs& a, float* sums);
  // bf16 bits of w by stochastic rounding, element i drawing the bits of index first_index + i under `key`
  // (quant::sr_key of the tensor and step).
  void (*stochastic_round_bf16)(const float* w, uint16_t* out, int64_t n, uint32_t key, uint64_t first_index);
  // Blockwise int8 m and v (mitchell4_signed / mitchell8_unsigned) fused per block, on a piece as above. LAMB pass 1:
  // m, v decoded, updated, stored and replaced by what they decode to, then u of the decoded moments (into
  // u_out unless null) and its sums: element j adds w'² to lanes[(first_lane + j) mod 16] and u² to
  // lanes[16 + (first_lane + j) mod 16] (the order of lamb_direction_sums over the whole chunk).
  void (*lamb_int8_pass1)(const float* w, const float* g, uint8_t* m_codes, float* m_scales, uint8_t* v_codes,
                          float* v_scales, float* u_out, int64_t n, const LambArgs& a, int first_lane,
                          float* lanes);
  // LAMB pass 2 recomputing u from the stored codes: w ← w' − step·u(decode(m), decode(v)).
  void (*lamb_int8_apply)(float* w, const uint8_t* m_codes, const float* m_scales, const uint8_t* v_codes,
                          const float* v_scales, int64_t n, const LambArgs& a, float step);
  // LARS with an int8 momentum (mitchell4_signed): decoded, lars_element, stored quantised.
  void (*lars_int8_update)(float* w, uint8_t* codes, float* scales, const float* g, int64_t n, const LarsArgs& a);
  // lars_update, returning Σw² of the new weights summed exactly as sum_of_squares sums them (the same
  // lanes and order, so the same bits): the next step's ||w|| without reading w again.
  float (*lars_update_norm)(float* w, float* v, const float* g, int64_t n, const LarsArgs& a);
  // bf16 state (m16, v16: bf16 bit patterns of a chunk) fused per element, the same bits as widening into
  // fp32, the fp32 loop and rounding back (torch's round to nearest even) one loop after the other. LAMB
  // pass 1: m, v updated and stored, u of the stored moments (into u_out unless null), sums as
  // lamb_direction_sums; LAMB pass 2 recomputing u from the stored moments; LARS's update.
  void (*lamb_bf16_pass1)(const float* w, const float* g, uint16_t* m16, uint16_t* v16, float* u_out, int64_t n,
                          const LambArgs& a, float* sums);
  void (*lamb_bf16_apply)(float* w, const uint16_t* m16, const uint16_t* v16, int64_t n, const LambArgs& a,
                          float step);
  void (*lars_bf16_update)(float* w, uint16_t* v16, const float* g, int64_t n, const LarsArgs& a);
};

namespace isa_baseline {
extern const ElementKernels kernels;
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTLARS_CPU_X86_BUILDS 1
namespace isa_avx2 {
extern const ElementKernels kernels;
}
namespace isa_avx512 {
extern const ElementKernels kernels;
}
#endif

// The fastest build this CPU runs, chosen at the first call. FASTLARS_CPU_ISA=baseline|avx2|avx512
// caps the choice (a build the CPU cannot run is never chosen).
const ElementKernels& element_kernels();

}  // namespace fastlars::cpu
