// CPU kernels of the low-precision-state ops (schemas in fastlars/_ops.py), the maths of
// fastlars/backends/reference_lowbit.py. A state buffer of a tensor is either a floating tensor (fp32,
// bf16 or fp16: "full") or uint8 codes with fp32 block scales (format: fastlars/backends/quantization.py;
// per-element maths: csrc/common/quant_math.h), so one call takes mixed lists (small tensors keep fp32).
//
// Chunks (multi_tensor.h) of a quantised tensor start at block boundaries: a row of R ≥ kChunk elements is
// cut into chunks of kChunk (a multiple of the block), shorter rows are taken ⌊kChunk / R⌋ rows at a time.
//
// lamb_lowbit_step_, per group of tensors (tensor_groups.h):
//   pass 1 per chunk: m, v loaded (decoded / widened), updated in fp32, stored (blockwise quantised with
//          the absmax of the NEW values / rounded to bf16) and replaced by what the stored state decodes
//          to; u from those decoded values, Σw'², Σu² (u kept in the workspace when the group fits the
//          caches);
//   ratios r_i = ||w'_i|| / ||u_i||;
//   pass 2 per chunk: u (the workspace, or recomputed from the stored state: the same bits), w ← w' − lr·r·u,
//          written to the master and the param, or to a bf16 param by stochastic rounding.
// lars_lowbit_step_: pass 1 ||w|| (and ||g|| when grad_norms is empty); pass 2 the momentum decoded,
//   updated in fp32, stored quantised, and w moved by the fp32 momentum.
// int8 and bf16 state take fused loops (kernels.h: per block / per element, the same bits as the unfused
// load_state → fp32 loop → store_state sequence that other mixes, e.g. one moment in fp32, take).
// found_inf != 0 returns after the checks, before anything is written.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/param_checks.h"
#include "../common/quant_math.h"
#include "../common/step_math.h"
#include "kernels.h"
#include "lamb_passes.h"
#include "lars_ratios.h"
#include "lars_step.h"
#include "multi_tensor.h"
#include "op_checks.h"
#include "parallel.h"

namespace fastlars::cpu {
namespace {

using namespace checks;
constexpr int64_t kBlock = quant::kBlockSize;
static_assert(kChunk % quant::kBlockSize == 0, "chunks along a row must end on block boundaries");

// One state buffer of one tensor: full values, or codes with their block scales.
struct StateSlot {
  Slot full;
  uint8_t* codes = nullptr;
  float* scales = nullptr;
  bool quantized() const { return codes != nullptr; }
};

struct LowbitTensors {
  std::vector<Slot> param, grad, weight;
  std::vector<bool> master, rounded;
  std::vector<int64_t> numel, row_length, blocks_per_row;
  std::vector<std::vector<StateSlot>> buffers;  // [buffer][tensor]
};

// Whether t's memory order is the order quantization.storage_permutation gives (row-major, or
// channels_last for 4-d / 5-d tensors): blocks and stochastic-rounding indices follow memory order.
bool memory_order_is_storage_order(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (t.dim() == 5) return t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

LowbitTensors lowbit_tensors(at::TensorList params, at::TensorList grads,
                             const std::vector<std::tuple<at::TensorList, at::TensorList, const char*>>& buffers,
                             at::TensorList masters, bool stochastic_rounding) {
  const size_t n = params.size();
  check_count(n, grads, "grads");
  for (const auto& [values, scales, name] : buffers) {
    check_count(n, values, name);
    check_count(n, scales, name);
  }
  TORCH_CHECK(masters.empty() || masters.size() == n, "master_params: holds ", masters.size(),
              " tensors; expected none or one per param (", n, ")");
  LowbitTensors out;
  out.buffers.resize(buffers.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_dense_cpu(p, "params", i);
    check_supported_dtype(p, "params", i);
    const bool master = param_checks::check_grad_and_master(p, grads[i], masters, i, check_like);
    const bool rounded = stochastic_rounding && masters.empty() && p.scalar_type() == at::kBFloat16;
    bool any_codes = false;
    const int64_t rows = p.dim() >= 2 ? p.size(0) : 1;
    int64_t row_length = p.dim() >= 2 ? 1 : p.numel();  // of the shape, also without rows (block_layout)
    for (int64_t d = 1; d < p.dim(); ++d) row_length *= p.size(d);
    const int64_t blocks_per_row = (row_length + kBlock - 1) / kBlock;
    for (size_t b = 0; b < buffers.size(); ++b) {
      const auto& [values, scales, name] = buffers[b];
      const at::Tensor& x = values[i];
      check_like(x, p, name, i);
      StateSlot slot;
      if (x.scalar_type() == at::kByte) {
        any_codes = true;
        const at::Tensor& s = scales[i];
        TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 &&
                        s.size(0) == rows && s.size(1) == blocks_per_row,
                    name, "_absmax[", i, "]: expected a contiguous float32 CPU tensor of shape (", rows, ", ",
                    blocks_per_row, ") (blocks of ", kBlock, " along rows of ", row_length, "), got ",
                    s.scalar_type(), " of shape ", s.sizes(), " on ", s.device());
        slot.codes = x.data_ptr<uint8_t>();
        slot.scales = s.data_ptr<float>();
      } else {
        check_supported_dtype(x, name, i);
        slot.full = {x.data_ptr(), x.scalar_type()};
      }
      out.buffers[b].push_back(slot);
    }
    TORCH_CHECK(!(any_codes || rounded) || memory_order_is_storage_order(p), "params[", i, "]: strides ",
                p.strides(), " are neither contiguous nor channels_last; int8 blocks and stochastic rounding follow "
                "the storage order of those layouts only (the reference backend takes any layout)");
    out.param.push_back({p.data_ptr(), p.scalar_type()});
    out.grad.push_back({grads[i].data_ptr(), grads[i].scalar_type()});
    out.weight.push_back(master ? Slot{masters[i].data_ptr(), at::kFloat} : out.param.back());
    out.master.push_back(master);
    out.rounded.push_back(rounded);
    out.numel.push_back(p.numel());
    out.row_length.push_back(row_length);
    out.blocks_per_row.push_back(blocks_per_row);
  }
  return out;
}

// Chunks of every tensor in tensor order, starting at block boundaries (see the file comment).
std::vector<Chunk> plan_block_chunks(const LowbitTensors& ts) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < ts.numel.size(); ++t) {
    const int64_t n = ts.numel[t], row = ts.row_length[t];
    if (n == 0) continue;
    if (row >= kChunk) {
      for (int64_t r = 0; r < n; r += row) {
        for (int64_t b = 0; b < row; b += kChunk) chunks.push_back({static_cast<int64_t>(t), r + b, std::min(kChunk, row - b)});
      }
    } else {
      const int64_t step = (kChunk / row) * row;
      for (int64_t b = 0; b < n; b += step) chunks.push_back({static_cast<int64_t>(t), b, std::min(step, n - b)});
    }
  }
  return chunks;
}

// Calls f(offset in chunk, length, index of the first block's scale) for each run of the chunk within one row.
template <typename F>
void for_each_row_piece(const LowbitTensors& ts, const Chunk& c, const F& f) {
  const int64_t row = ts.row_length[c.tensor], per_row = ts.blocks_per_row[c.tensor];
  for (int64_t pos = c.begin, end = c.begin + c.size; pos < end;) {
    const int64_t r = pos / row, in_row = pos - r * row;
    const int64_t piece_end = std::min(end, (r + 1) * row);
    f(pos - c.begin, piece_end - pos, r * per_row + in_row / kBlock);
    pos = piece_end;
  }
}

// A buffer stored as bf16 (state_dtype="bf16"), which the fused bf16 loops take, and its chunk's bit patterns.
bool bf16_state(const StateSlot& s) { return !s.quantized() && s.full.type == at::kBFloat16; }
uint16_t* bf16_bits(const StateSlot& s, const Chunk& c) { return static_cast<uint16_t*>(s.full.base) + c.begin; }

// The fp32 values of a buffer's chunk: decoded codes or widened values in `scratch`, fp32 storage itself.
float* load_state(const LowbitTensors& ts, const StateSlot& s, bool is_signed, const Chunk& c, float* scratch) {
  if (!s.quantized()) return load(s.full, c.begin, c.size, scratch);
  const ElementKernels& k = element_kernels();
  const auto decode = is_signed ? k.decode_signed : k.decode_unsigned;
  for_each_row_piece(ts, c, [&](int64_t off, int64_t n, int64_t block) {
    decode(s.codes + c.begin + off, s.scales + block, scratch + off, n);
  });
  return scratch;
}

// Stores new fp32 values x of a buffer's chunk (quantised / rounded) and replaces x by what the stored
// state now decodes to.
void store_state(const LowbitTensors& ts, const StateSlot& s, bool is_signed, const Chunk& c, float* x) {
  if (s.quantized()) {
    const ElementKernels& k = element_kernels();
    const auto quantize = is_signed ? k.quantize_signed : k.quantize_unsigned;
    for_each_row_piece(ts, c, [&](int64_t off, int64_t n, int64_t block) {
      quantize(x + off, s.codes + c.begin + off, s.scales + block, n);
    });
    return;
  }
  store(s.full, c.begin, c.size, x);
  if (s.full.type != at::kFloat) load(s.full, c.begin, c.size, x);  // widened back into x
}

// LAMB pass 1 of a chunk whose m and v are both int8, fused per block (kernels.h): the chunk's sums[0] =
// Σw'², sums[1] = Σu² in the order of lamb_direction_sums over the chunk (so the same bits).
void lamb_int8_pass1(const ElementKernels& kernels, const LowbitTensors& ts, const Chunk& c, const StateSlot& m,
                     const StateSlot& v, const float* w, const float* g, float* u, const LambArgs& args,
                     float* sums) {
  float lanes[32] = {};
  for_each_row_piece(ts, c, [&](int64_t off, int64_t len, int64_t block) {
    kernels.lamb_int8_pass1(w + off, g + off, m.codes + c.begin + off, m.scales + block, v.codes + c.begin + off,
                            v.scales + block, u != nullptr ? u + off : nullptr, len, args,
                            static_cast<int>(off & 15), lanes);
  });
  float sw = 0.0f, su = 0.0f;
  for (int k = 0; k < 16; ++k) {
    sw += lanes[k];
    su += lanes[16 + k];
  }
  sums[0] = sw;
  sums[1] = su;
}

// Writes the new fp32 weights of a chunk: master (if any) and param rounded to nearest, or the bf16
// param by stochastic rounding under `key`.
void store_weights(const LowbitTensors& ts, const Chunk& c, const float* w, uint32_t key) {
  if (ts.rounded[c.tensor]) {
    element_kernels().stochastic_round_bf16(w, static_cast<uint16_t*>(ts.param[c.tensor].base) + c.begin, c.size,
                                            key, static_cast<uint64_t>(c.begin));
    return;
  }
  store(ts.weight[c.tensor], c.begin, c.size, w);
  if (ts.master[c.tensor]) store(ts.param[c.tensor], c.begin, c.size, w);
}

// Per-tensor stochastic-rounding keys of this step: sr_key(tensor key, t) (0 for tensors not rounded).
std::vector<uint32_t> rounding_keys(const LowbitTensors& ts, at::IntArrayRef tensor_keys, at::TensorList steps) {
  const size_t n = ts.numel.size();
  std::vector<uint32_t> keys(n, 0);
  if (tensor_keys.empty()) return keys;
  TORCH_CHECK(tensor_keys.size() == n, "rounding_keys: holds ", tensor_keys.size(), " keys, params hold ", n);
  check_count(n, steps, "steps");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensor_keys[i] >= 0 && tensor_keys[i] <= 0xFFFFFFFFll, "rounding_keys[", i,
                "]: expected a 32-bit key, got ", tensor_keys[i]);
    if (ts.rounded[i]) {
      keys[i] = quant::sr_key(static_cast<uint32_t>(tensor_keys[i]), host_scalar(steps[i], "steps").value());
    }
  }
  return keys;
}

void lamb_lowbit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_absmax, at::TensorList exp_avg_sqs, at::TensorList exp_avg_sq_absmax,
                          at::TensorList master_params, at::TensorList steps, at::IntArrayRef tensor_keys, double lr,
                          const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                          double weight_decay, bool bias_correction, bool grad_averaging, bool decoupled_decay,
                          bool trust_clip, bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds,
                          bool maximize, const std::optional<at::Tensor>& clip_coef,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          const std::optional<at::Tensor>& trust_ratios) {
  begin_step_record();
  if (params.empty()) return;
  const LowbitTensors ts = lowbit_tensors(
      params, grads, {{exp_avgs, exp_avg_absmax, "exp_avgs"}, {exp_avg_sqs, exp_avg_sq_absmax, "exp_avg_sqs"}},
      master_params, !tensor_keys.empty());
  const size_t n = params.size();
  float* const ratio_out = ratio_output(trust_ratios, n);
  check_count(n, steps, "steps");
  const std::vector<uint32_t> keys = rounding_keys(ts, tensor_keys, steps);
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const std::optional<float> skip = host_scalar(found_inf, "found_inf");
  const std::optional<float> scale = host_scalar(grad_scale, "grad_scale");
  const std::optional<float> clip = host_scalar(clip_coef, "clip_coef");
  const float rate = host_scalar(lr_tensor, "lr_tensor").value_or(static_cast<float>(lr));
  const std::vector<LambArgs> args = lamb_args(steps, scale, clip, rate, beta1, beta2, eps, weight_decay,
                                                bias_correction, grad_averaging, decoupled_decay, maximize);
  if (skip.has_value() && *skip != 0.0f) return;

  const ElementKernels& kernels = element_kernels();
  const std::vector<Chunk> chunks = plan_block_chunks(ts);
  const auto& m_slots = ts.buffers[0];
  const auto& v_slots = ts.buffers[1];
  // u is kept for pass 2 only while the group fits the caches (lamb_passes.h); a bigger tensor recomputes it
  // from the stored state (2 bytes of codes per element read instead of 4 written and 4 read).
  const auto pass1 = [&](const Chunk& c, float* scratch, float* u, float* sums) {
    const float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
    const float* g = load(ts.grad[c.tensor], c.begin, c.size, scratch + kChunk);
    const StateSlot& m_slot = m_slots[c.tensor];
    const StateSlot& v_slot = v_slots[c.tensor];
    if (m_slot.quantized() && v_slot.quantized()) {
      lamb_int8_pass1(kernels, ts, c, m_slot, v_slot, w, g, u, args[c.tensor], sums);
      return;
    }
    if (bf16_state(m_slot) && bf16_state(v_slot)) {
      kernels.lamb_bf16_pass1(w, g, bf16_bits(m_slot, c), bf16_bits(v_slot, c), u, c.size, args[c.tensor], sums);
      return;
    }
    float* m = load_state(ts, m_slot, true, c, scratch + 2 * kChunk);
    float* v = load_state(ts, v_slot, false, c, scratch + 3 * kChunk);
    kernels.lamb_moments_only(m, v, g, c.size, args[c.tensor]);
    store_state(ts, m_slot, true, c, m);
    store_state(ts, v_slot, false, c, v);
    kernels.lamb_direction_sums(w, m, v, u, c.size, args[c.tensor], sums);
  };
  const auto pass2 = [&](const Chunk& c, float* scratch, const float* u, float step) {
    float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
    const StateSlot& m_slot = m_slots[c.tensor];
    const StateSlot& v_slot = v_slots[c.tensor];
    if (u != nullptr) {
      kernels.lamb_apply_stored(w, u, c.size, args[c.tensor], step);
    } else if (m_slot.quantized() && v_slot.quantized()) {
      for_each_row_piece(ts, c, [&](int64_t off, int64_t len, int64_t block) {
        kernels.lamb_int8_apply(w + off, m_slot.codes + c.begin + off, m_slot.scales + block,
                                v_slot.codes + c.begin + off, v_slot.scales + block, len, args[c.tensor], step);
      });
    } else if (bf16_state(m_slot) && bf16_state(v_slot)) {
      kernels.lamb_bf16_apply(w, bf16_bits(m_slot, c), bf16_bits(v_slot, c), c.size, args[c.tensor], step);
    } else {
      const float* m = load_state(ts, m_slot, true, c, scratch + kChunk);
      const float* v = load_state(ts, v_slot, false, c, scratch + 2 * kChunk);
      kernels.lamb_apply_recomputed(w, m, v, c.size, args[c.tensor], step);
    }
    store_weights(ts, c, w, keys[c.tensor]);
  };
  lamb_group_passes(chunks, ts.numel, {rate, adapt, trust_clip, bounds}, ratio_out, 4, pass1, 3, pass2);
}

}  // namespace

void lars_lowbit_step_carrying_norms(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                     at::TensorList momentum_absmax, at::TensorList master_params,
                                     const at::Tensor& grad_norms, at::TensorList steps, at::IntArrayRef tensor_keys,
                                     double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                                     double weight_decay, double trust_coefficient, double eps, bool nesterov,
                                     bool trust_clip, bool mlperf_momentum, bool adapt,
                                     std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                                     const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf,
                                     const std::optional<at::Tensor>& trust_ratios,
                                     const std::vector<float>* known_w_norms, std::vector<float>* next_w_norms) {
  begin_step_record();
  if (next_w_norms != nullptr) next_w_norms->assign(params.size(), -1.0f);
  if (params.empty()) return;
  const LowbitTensors ts = lowbit_tensors(params, grads, {{momentum_buffers, momentum_absmax, "momentum_buffers"}},
                                          master_params, !tensor_keys.empty());
  const size_t n = params.size();
  float* const ratio_out = ratio_output(trust_ratios, n);
  const std::vector<uint32_t> keys = rounding_keys(ts, tensor_keys, steps);
  const bool fold = lars_folds_grad_norms(grad_norms, n);
  const Bounds bounds = ratio_bounds(trust_ratio_bounds);
  const std::optional<float> skip = host_scalar(found_inf, "found_inf");
  const std::optional<float> scale = host_scalar(grad_scale, "grad_scale");
  const float rate = host_scalar(lr_tensor, "lr_tensor").value_or(static_cast<float>(lr));
  if (skip.has_value() && *skip != 0.0f) return;

  const ElementKernels& kernels = element_kernels();
  const std::vector<Chunk> chunks = plan_block_chunks(ts);
  const LarsArgs args{scale.has_value(), maximize, nesterov, mlperf_momentum, scale.value_or(1.0f), rate, 1.0f,
                      static_cast<float>(momentum), static_cast<float>(weight_decay)};
  const auto& slots = ts.buffers[0];
  // With next_w_norms (adapting groups): each chunk's Σw'² of the new fp32 weights, summed by sum_of_squares
  // over the chunk just updated (still in cache) as the next step's norm pass would sum it, so the same bits.
  const bool carry = next_w_norms != nullptr && adapt;
  const auto carried = [&](size_t t) { return ts.weight[t].type == at::kFloat && !ts.rounded[t]; };
  std::vector<float> next_partials(carry ? chunks.size() : 0);
  std::vector<float> ratios(n, 1.0f);
  const auto update = [&](const Chunk* first, int64_t count) {
    const int64_t first_index = first - chunks.data();
    for_each_chunk(first, count, 3, [&](int64_t k, const Chunk& c, float* scratch) {
      float* w = load(ts.weight[c.tensor], c.begin, c.size, scratch);
      const float* g = load(ts.grad[c.tensor], c.begin, c.size, scratch + 2 * kChunk);
      LarsArgs tensor_args = args;
      tensor_args.ratio = ratios[c.tensor];
      const StateSlot& slot = slots[c.tensor];
      if (slot.quantized()) {
        for_each_row_piece(ts, c, [&](int64_t off, int64_t len, int64_t block) {
          kernels.lars_int8_update(w + off, slot.codes + c.begin + off, slot.scales + block, g + off, len,
                                   tensor_args);
        });
      } else if (bf16_state(slot)) {
        kernels.lars_bf16_update(w, bf16_bits(slot, c), g, c.size, tensor_args);
      } else {
        float* v = load_state(ts, slot, true, c, scratch + kChunk);
        kernels.lars_update(w, v, g, c.size, tensor_args);
        store_state(ts, slot, true, c, v);
      }
      store_weights(ts, c, w, keys[c.tensor]);
      if (carry && carried(static_cast<size_t>(c.tensor))) {
        next_partials[first_index + k] = kernels.sum_of_squares(w, c.size);
      }
    }, Order::back);  // after the norm pass over the same chunks
  };
  if (!adapt) {
    update(chunks.data(), static_cast<int64_t>(chunks.size()));
    if (ratio_out != nullptr) std::copy(ratios.begin(), ratios.end(), ratio_out);
    return;
  }
  lars_ratios_then_update(kernels, chunks, ts, grad_norms, fold, scale,
                          {rate, static_cast<float>(trust_coefficient), static_cast<float>(weight_decay),
                           static_cast<float>(eps), trust_clip, bounds},
                          ratios, update, known_w_norms);
  if (ratio_out != nullptr) std::copy(ratios.begin(), ratios.end(), ratio_out);
  if (carry) store_carried_norms(chunks, next_partials, carried, *next_w_norms);
}

namespace {

void lars_lowbit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                          at::TensorList momentum_absmax, at::TensorList master_params, const at::Tensor& grad_norms,
                          at::TensorList steps, at::IntArrayRef tensor_keys, double lr,
                          const std::optional<at::Tensor>& lr_tensor, double momentum, double weight_decay,
                          double trust_coefficient, double eps, bool nesterov, bool trust_clip, bool mlperf_momentum,
                          bool adapt, std::optional<at::ArrayRef<double>> trust_ratio_bounds, bool maximize,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          const std::optional<at::Tensor>& trust_ratios) {
  lars_lowbit_step_carrying_norms(params, grads, momentum_buffers, momentum_absmax, master_params, grad_norms, steps,
                                  tensor_keys, lr, lr_tensor, momentum, weight_decay, trust_coefficient, eps, nesterov,
                                  trust_clip, mlperf_momentum, adapt, trust_ratio_bounds, maximize, grad_scale,
                                  found_inf, trust_ratios, nullptr, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlars, CPU, m) {
  m.impl("lamb_lowbit_step_", &lamb_lowbit_step_cpu);
  m.impl("lars_lowbit_step_", &lars_lowbit_step_cpu);
}

}  // namespace fastlars::cpu
