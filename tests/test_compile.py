"""torch.compile(fullgraph=True) of a whole training step, optimizer.step() included, on CPU.

torch._dynamo.explain must report one graph and no break, and the compiled steps must reproduce the
eager trajectory. Backends that cannot be traced on this device are named in the parametrization
(none is skipped silently): Triton only traces on a GPU (its CPU interpreter has no data pointers
for fake tensors), so it is covered by the GPU-marked tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlars

TRACEABLE = [b for b in fastlars.available_backends("cpu") if b != "triton"]


def _setup(cls, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    kw = {"lr": 0.5, "momentum": 0.9} if cls is fastlars.LARS else {"lr": 0.01, "max_grad_norm": 1.0}
    opt = cls(fastlars.param_groups(model, 1e-3), backend=backend, **kw)
    return model, opt


@pytest.mark.parametrize("backend", TRACEABLE)
@pytest.mark.parametrize("cls", [fastlars.LARS, fastlars.LAMB])
def test_training_step_compiles_without_graph_breaks(backend, cls) -> None:
    # Tracing loss.backward() inside the compiled function needs this switch (torch >= 2.13).
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        _check_training_step(backend, cls)


@pytest.mark.parametrize("cls", [fastlars.LARS, fastlars.LAMB])
def test_training_step_without_the_non_finite_check_compiles(cls) -> None:
    """skip_nonfinite=False (the step's found_inf made inside it) traces as one graph too."""
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        _check_training_step("native", cls, skip_nonfinite=False)


def _check_training_step(backend, cls, skip_nonfinite=True) -> None:
    torch._dynamo.reset()
    model, opt = _setup(cls, backend)
    eager_model = copy.deepcopy(model)
    eager_opt = cls(fastlars.param_groups(eager_model, 1e-3), **opt.defaults)
    opt.skip_nonfinite = eager_opt.skip_nonfinite = skip_nonfinite
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))

    def make_step(m, o):
        def step(x, y):
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            return loss.detach()
        return step

    step = make_step(model, opt)
    step(x, y)  # eager first step creates the state, as in any training loop
    opt.zero_grad()
    explanation = torch._dynamo.explain(step)(x, y)
    opt.zero_grad()
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, str(explanation)

    compiled = torch.compile(make_step(model, opt), fullgraph=True)
    eager = make_step(eager_model, eager_opt)
    eager(x, y)  # mirror the eager first step and the explain() step of the compiled copy
    eager_opt.zero_grad()
    eager(x, y)
    eager_opt.zero_grad()
    for _ in range(5):
        torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        eager_opt.zero_grad()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
