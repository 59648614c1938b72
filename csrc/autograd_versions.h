// What the fastlars ops tell autograd about the tensors they write, on every device.
//
// The kernels write params and state through raw pointers, which autograd cannot see. torch's own
// in-place ops and fused optimizers bump the version counter of each tensor they write (their generated
// ADInplaceOrView kernels), so a backward through a value saved before the step raises "modified by an
// inplace operation" instead of silently using the new one. autograd_versions.cpp gives every fastlars op
// whose schema writes arguments (`Tensor(a!)`, fastlars/_ops.py) an ADInplaceOrView kernel that runs the op
// and then bumps each tensor its schema marks as written; callers that run kernels past the dispatcher
// (HostPlan) bump what they wrote with bump_versions.
#pragma once

#include <ATen/ATen.h>

namespace fastlars {

// Each tensor's version counter + 1, as an in-place torch op would; inference tensors have none and are
// left alone (torch.autograd.graph.increment_version's rule).
void bump_versions(at::TensorList tensors);

}  // namespace fastlars
