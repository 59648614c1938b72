// The host path of a whole optimizer step on the CPU (fastlars._C.HostPlan): what
// TrustRatioOptimizer.step() does in Python for native CPU groups, in one call per step.
//
// A plan caches, per param group, the tensors a step touches (params, state buffers, fp32 masters, step
// counters) and the Python objects they came from. Each step it first checks, without changing
// anything, that they are still what the optimizer holds (same params in each group's list, the same
// ones with a gradient, the same state dicts and state tensors) and that every tensor passes the checks
// of the native ops; then it computes the gradient norms, the skip flag (GradScaler's found_inf, or any
// non-finite norm), advances the step counters and the skipped-step counter, and runs the update op of
// each group. When a check fails it returns false having changed nothing, and the Python step runs
// instead (and raises today's errors, naming the parameter).
#pragma once

#include <torch/extension.h>

namespace fastlars::cpu {

// Adds the class HostPlan to the extension module.
void register_host_plan(pybind11::module_& m);

}  // namespace fastlars::cpu
