// ADInplaceOrView kernels of the fastlars ops (autograd_versions.h).
#include "autograd_versions.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

namespace fastlars {

void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.defined() && !t.is_inference()) torch::autograd::impl::bump_version(t);
  }
}

namespace {

// Runs the op below ADInplaceOrView, then bumps every tensor of the arguments its schema marks as written
// (a Tensor, a Tensor? that is given, or each tensor of a Tensor[]). An op that throws wrote nothing (the
// ops check every argument before their first write) and bumps nothing.
void run_then_bump_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t arguments = schema.arguments().size();
  const size_t first = stack->size() - arguments;
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments; ++i) {
    if (!schema.is_mutable({c10::SchemaArgType::input, i})) continue;
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) {
      written.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) written.push_back(t);
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  bump_versions(written);
}

}  // namespace

// The ops of fastlars/_ops.py that write their arguments (tests/test_autograd_versions.py checks that
// every op with a written argument bumps it).
TORCH_LIBRARY_IMPL(fastlars, ADInplaceOrView, m) {
  for (const char* name : {"lars_step_", "lamb_step_", "lars_lowbit_step_", "lamb_lowbit_step_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_then_bump_written>());
  }
}

}  // namespace fastlars
