// Pass 1 of a LARS step without a GradScaler, for the host plan (host_step.cpp): the gradient norms that
// decide the skip and, in the same pass, the weight norms of tensors too big to stay cached between
// their norm pass and their update (ops.cpp).
//
// lars_step_ takes a group's ||w|| in a pass just before the group's update, so the update finds w in
// cache, but only while w and the update's other four streams fit: the 32 MiB L3 of a 2-core AMD EPYC
// keeps a tensor of 2-9 MiB (ResNet-50's convolutions, BERT-base's projections) and none of a 94 MiB one
// (BERT-base's word embedding), whose w is then read twice from memory. Reading such a w in the pass that
// reads every g costs less than a pass of its own (two streams read at once go faster than one at a time
// on that machine). Measured there, 2 threads, BERT-base, LARS.step() with the host plan, 3 runs of 21
// interleaved steps (load 1.8-2.3 from other jobs): 51.5 -> 46.9, 70.4 -> 68.4, 74.5 -> 71.3 ms with the
// word embedding in pass 1; every tensor above 256K elements in pass 1 lost the cache reuse (45.9, 72.2,
// 76.8 ms) and made ResNet-50 no faster.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastlars::cpu {

// Tensors of more elements than this (16 MiB of fp32, half that L3) have ||w|| taken in pass 1;
// FASTLARS_LARS_PASS1_WEIGHT_ELEMENTS replaces it (read at every step).
constexpr int64_t kStreamedWeightElements = int64_t{1} << 22;

// A 1-D fp32 tensor of 2n elements for the n params: out[i] = ||g_i|| / grad_scale (as grad_norms
// computes it) and out[n + i] = ||w_i|| (w the fp32 master when one is given) for tensors of more than
// the limit above, -1 for the others (their step computes it while their group is cached).
// lars_step_ takes this tensor as its grad_norms. Both norms are summed as the ops sum them (per chunk,
// chunk sums in order in double), so the step is bit-identical to one given ||g|| alone.
at::Tensor lars_norms_cpu(at::TensorList params, at::TensorList grads, at::TensorList master_params,
                          const std::optional<at::Tensor>& grad_scale);

// Whether lars_norms_cpu reads a weight for one of these params (one of them is that big).
bool lars_norms_read_weights(at::TensorList params);

}  // namespace fastlars::cpu
