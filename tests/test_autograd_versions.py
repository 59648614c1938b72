"""Autograd sees every write of a step, on every backend, as it sees torch's own optimizers' writes.

The native and Triton kernels write params and state through data pointers. torch's in-place ops and
fused optimizers bump the version counter of each tensor they write, so a backward through a value
saved before the step raises "modified by an inplace operation" instead of silently using the updated
weights; fastlars must do the same (csrc/autograd_versions.cpp for the native ops, the HostPlan's own
bumps on its cached path, fastlars._ops.bump_versions for Triton). The Triton kernels are checked here on
a GPU and under the interpreter in tests/test_triton_interpreted.py.
"""

from __future__ import annotations

import pytest
import torch

import fastlars
from fastlars import _ops, backends
from harness import make_params, synthetic_grads

SHAPES = [(0,), (1,), (7,), (17, 33), (5000,)]
CONFIGS = [
    pytest.param(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2}, torch.float32, id="lars"),
    pytest.param(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2, "master_weights": True}, torch.bfloat16,
                 id="lars-bf16-master"),
    pytest.param(fastlars.LAMB, {"lr": 0.01, "max_grad_norm": 1.0}, torch.float32, id="lamb-clip"),
    pytest.param(fastlars.LAMB, {"lr": 0.01, "master_weights": True}, torch.float16, id="lamb-fp16-master"),
    pytest.param(fastlars.LARS, {"lr": 1.0, "state_dtype": "int8", "min_quantized_size": 16}, torch.float32,
                 id="lars-int8"),
    pytest.param(fastlars.LAMB, {"lr": 0.01, "state_dtype": "int8", "min_quantized_size": 16}, torch.float32,
                 id="lamb-int8"),
    pytest.param(fastlars.LAMB, {"lr": 0.01, "state_dtype": "bf16", "stochastic_rounding": True}, torch.bfloat16,
                 id="lamb-bf16-state-sr"),
]
LOW_PRECISION = ("state_dtype", "stochastic_rounding")


def _backends(device: str) -> list[tuple[str, bool]]:
    """(backend, host plan on) pairs: every backend, the native CPU one on its cached path and off it."""
    out = [("reference", True), ("foreach", True), ("native", True), ("triton", True)]
    return [*out, ("native", False)] if device == "cpu" else out


def _skip_unless_runs(backend: str, device: torch.device, kw: dict) -> None:
    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    if backend == "foreach" and any(k in kw for k in LOW_PRECISION):
        pytest.skip("the foreach backend steps fp32 state only")


def _written(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a step writes: the params and each tensor of their state (moments, codes, block scales,
    fp32 masters, step counters)."""
    out = [(f"param {i}", p) for i, p in enumerate(params)]
    for i, p in enumerate(params):
        out += [(f"state[{i}][{k!r}]", v) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)]
    return out


def steps_bump_every_written_tensor(cls, kw, dtype, device: str, backend: str, host_plan: bool) -> None:
    params = make_params(SHAPES, dtype, device)
    opt = cls(params, backend=backend, **kw)
    if not host_plan:
        opt.host_plan_enabled = False
    for t in range(1, 5):
        for p, g in zip(params, synthetic_grads(params, t)):
            p.grad = g
        before = {name: tensor._version for name, tensor in _written(opt, params)}
        opt.step()
        for name, tensor in _written(opt, params):
            if name in before:  # state made by this (first) step is new: nothing saved it before
                assert tensor._version > before[name], f"step {t}: {name} was written without a version bump"


@pytest.mark.parametrize("backend,host_plan", _backends("cpu"), ids=lambda v: str(v))
@pytest.mark.parametrize("cls,kw,dtype", CONFIGS)
def test_every_step_bumps_what_it_writes_cpu(cls, kw, dtype, backend, host_plan) -> None:
    _skip_unless_runs(backend, torch.device("cpu"), kw)
    steps_bump_every_written_tensor(cls, kw, dtype, "cpu", backend, host_plan)


@pytest.mark.cuda
@pytest.mark.parametrize("backend,host_plan", _backends("cuda"), ids=lambda v: str(v))
@pytest.mark.parametrize("cls,kw,dtype", CONFIGS)
def test_every_step_bumps_what_it_writes_cuda(cls, kw, dtype, backend, host_plan) -> None:
    _skip_unless_runs(backend, torch.device("cuda"), kw)
    steps_bump_every_written_tensor(cls, kw, dtype, "cuda", backend, host_plan)


def backward_after_a_step_raises(cls, kw, device: str, backend: str, host_plan: bool) -> None:
    w = torch.nn.Parameter(torch.randn(64, 32, device=device))
    x = torch.randn(8, 64, device=device, requires_grad=True)
    opt = cls([w], backend=backend, **kw)
    if not host_plan:
        opt.host_plan_enabled = False
    (x @ w).sum().backward()
    opt.step()  # creates the state; the next step is the cached one where there is a plan
    loss = (x @ w).sum()  # saves w for x's gradient
    w.grad = torch.randn_like(w)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend,host_plan", _backends("cpu"), ids=lambda v: str(v))
@pytest.mark.parametrize("cls,kw", [(fastlars.LARS, {"lr": 0.1}), (fastlars.LAMB, {"lr": 0.01}),
                                    (fastlars.LAMB, {"lr": 0.01, "state_dtype": "int8", "min_quantized_size": 0})],
                         ids=["lars", "lamb", "lamb-int8"])
def test_backward_through_weights_a_step_overwrote_raises(cls, kw, backend, host_plan) -> None:
    """As with torch.optim: autograd refuses to differentiate with weights changed under it."""
    _skip_unless_runs(backend, torch.device("cpu"), kw)
    backward_after_a_step_raises(cls, kw, "cpu", backend, host_plan)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("cls,kw", [(fastlars.LARS, {"lr": 0.1}), (fastlars.LAMB, {"lr": 0.01, "state_dtype": "int8",
                                                                                  "min_quantized_size": 0})],
                         ids=["lars", "lamb-int8"])
def test_backward_through_weights_a_step_overwrote_raises_cuda(cls, kw, backend) -> None:
    _skip_unless_runs(backend, torch.device("cuda"), kw)
    backward_after_a_step_raises(cls, kw, "cuda", backend, True)


def _native_reason() -> str | None:
    return backends.unavailable_reason("native", torch.device("cpu"))


@pytest.mark.skipif(_native_reason() is not None, reason=str(_native_reason()))
@pytest.mark.parametrize("name", [*_ops.SCHEMAS, *_ops.LOWBIT_SCHEMAS])
def test_every_op_that_writes_has_a_version_kernel(name) -> None:
    """An op whose schema writes arguments has the ADInplaceOrView kernel of csrc/autograd_versions.cpp (a new
    op left out of its list fails here); an op that writes nothing has none."""
    signature = {**_ops.SCHEMAS, **_ops.LOWBIT_SCHEMAS}[name]
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"{_ops.NAMESPACE}::{name}", "ADInplaceOrView")
    assert has == bool(_ops.written_arguments(signature))


@pytest.mark.skipif(_native_reason() is not None, reason=str(_native_reason()))
def test_an_op_that_refuses_its_arguments_bumps_nothing() -> None:
    w, g, v = torch.randn(8), torch.randn(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="momentum_buffers"):
        torch.ops.fastlars.lars_step_([w], [g], [v, v], [], torch.ones(1), 0.1, None, 0.9, 0.0, 1e-3, 0.0, False,
                                      False, True, True, None, False, None, None)
    assert (w._version, v._version) == (0, 0)


def test_written_arguments_reads_the_schemas() -> None:
    names = [name for _, name in _ops.written_arguments(_ops.SCHEMAS["lars_step_"])]
    assert names == ["params", "momentum_buffers", "master_params", "trust_ratios"]
    assert _ops.written_arguments(_ops.SCHEMAS["grad_norms"]) == ()


def test_bump_versions_takes_tensors_lists_and_nones() -> None:
    a, b, c = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    with torch.inference_mode():
        frozen = torch.zeros(2)
    _ops.bump_versions(a, [b, None], None, (c,), [frozen])
    assert (a._version, b._version, c._version) == (1, 1, 1)
