"""Every option of LARS and LAMB against the formulas of design.md written out in float64 NumPy.

30 steps with a learning rate that changes every step (so the two LARS momentum styles differ),
for each backend that runs here. fp32 runs are compared with float64 formulas by norm-relative error ≤ 1e-5:
parameters, state, and the trust ratios the optimizer records (record_trust_ratios) at the last step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastlars
import formulas
from fastlars.backends import foreach, reference
from harness import SHAPES, lr_at, make_params, synthetic_grads

STEPS = 30
BACKENDS = [b for b in fastlars.available_backends("cpu") if b != "triton"]

LARS_OPTIONS = [
    {},
    {"momentum_style": "torch"},
    {"nesterov": True},
    {"nesterov": True, "momentum_style": "torch"},
    {"trust_clip": True},
    {"trust_ratio_bounds": (0.5, 2.0)},
    {"adapt": False},
    {"weight_decay": 0.0},
    {"weight_decay": 0.0, "adapt": True},
    {"eps": 1e-3, "trust_coefficient": 0.02},
    {"maximize": True},
    {"momentum": 0.0},
]
LAMB_OPTIONS = [
    {},
    {"bias_correction": False},
    {"grad_averaging": False},
    {"max_grad_norm": 1.0},
    {"decoupled_decay": True},
    {"trust_clip": True},
    {"trust_ratio_bounds": (0.2, 0.9)},
    {"adapt": False},
    {"weight_decay": 0.0},
    {"weight_decay": 0.0, "adapt": True},
    {"betas": (0.8, 0.95), "eps": 1e-4},
    {"maximize": True},
]


def _formula_run(kind: str, options: dict, base_lr: float, zero_params=(), zero_grads=()):
    params = make_params(SHAPES, torch.float32, zero=zero_params)
    ws = [p.detach().double().numpy().ravel().copy() for p in params]
    if kind == "lars":
        states = [formulas.LarsState(np.zeros_like(w)) for w in ws]
    else:
        states = [formulas.LambState(np.zeros_like(w), np.zeros_like(w)) for w in ws]
    for t in range(1, STEPS + 1):
        lr = lr_at(t, base_lr)
        current = [torch.tensor(w, dtype=torch.float32).reshape(p.shape) for w, p in zip(ws, params)]
        grads = [g.double().numpy().ravel() for g in synthetic_grads(current, t, zero=zero_grads)]
        if kind == "lars":
            ws = [formulas.lars_update(w, g, s, lr, options) for w, g, s in zip(ws, grads, states)]
        else:
            clip = formulas.lamb_clip(grads, options.get("max_grad_norm"))
            ws = [formulas.lamb_update(w, g, s, lr, clip, options) for w, g, s in zip(ws, grads, states)]
    return ws, states


def _fastlars_run(cls, options: dict, backend: str, base_lr: float, zero_params=(), zero_grads=()):
    params = make_params(SHAPES, torch.float32, zero=zero_params)
    opt = cls(params, lr=base_lr, backend=backend, **options)
    opt.record_trust_ratios()
    for t in range(1, STEPS + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(t, base_lr)
        for p, g in zip(params, synthetic_grads(params, t, zero=zero_grads)):
            p.grad = g
        opt.step()
    return params, opt


def _compare(actual: torch.Tensor, expected: np.ndarray, what: str, tol: float = 1e-5) -> None:
    """Norm-relative error ||a − e|| / ||e|| ≤ tol (fp32 arithmetic against float64 formulas)."""
    a = actual.detach().double().numpy().ravel()
    scale = max(float(np.linalg.norm(expected)), 1e-30)
    error = float(np.linalg.norm(a - expected)) / scale
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", LARS_OPTIONS, ids=str)
def test_lars_matches_formulas(backend: str, options: dict) -> None:
    opts = {"momentum": 0.9, "weight_decay": 1e-2, "trust_coefficient": 0.001, "eps": 0.0, **options}
    params, opt = _fastlars_run(fastlars.LARS, opts, backend, base_lr=2.0)
    ws, states = _formula_run("lars", opts, base_lr=2.0)
    for i, (p, w, s) in enumerate(zip(params, ws, states)):
        _compare(p, w, f"param {i}")
        _compare(opt.state[p]["momentum_buffer"], s.v, f"momentum_buffer {i}")
        assert float(opt.state[p]["step"]) == STEPS
    _compare(opt.trust_ratios[0], np.array([s.ratio for s in states]), "trust ratios")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=str)
def test_lamb_matches_formulas(backend: str, options: dict) -> None:
    opts = {"weight_decay": 0.01, **options}
    params, opt = _fastlars_run(fastlars.LAMB, opts, backend, base_lr=0.01)
    ws, states = _formula_run("lamb", opts, base_lr=0.01)
    for i, (p, w, s) in enumerate(zip(params, ws, states)):
        _compare(p, w, f"param {i}")
        _compare(opt.state[p]["exp_avg"], s.m, f"exp_avg {i}")
        _compare(opt.state[p]["exp_avg_sq"], s.v, f"exp_avg_sq {i}")
    _compare(opt.trust_ratios[0], np.array([s.ratio for s in states]), "trust ratios")


def test_two_lars_momentum_styles_differ_when_lr_changes() -> None:
    """The test above would be vacuous for momentum_style if both styles gave one trajectory."""
    a, _ = _fastlars_run(fastlars.LARS, {"weight_decay": 1e-2}, "reference", base_lr=2.0)
    b, _ = _fastlars_run(fastlars.LARS, {"weight_decay": 1e-2, "momentum_style": "torch"}, "reference", base_lr=2.0)
    assert not torch.allclose(a[4], b[4], rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kind,lr", [(fastlars.LARS, "lars", 2.0), (fastlars.LAMB, "lamb", 0.01)])
def test_zero_tensors_fall_back_to_ratio_one_and_still_move(backend, cls, kind, lr) -> None:
    """All-zero weights (ratio falls back to 1) move; all-zero grads with weight decay still decay."""
    opts = {"weight_decay": 1e-2}
    zero_params, zero_grads = (2, 4), (5,)
    params, _ = _fastlars_run(cls, opts, backend, lr, zero_params, zero_grads)
    ws, _ = _formula_run(kind, opts, lr, zero_params, zero_grads)
    for i, (p, w) in enumerate(zip(params, ws)):
        _compare(p, w, f"param {i}")
    assert params[2].abs().sum() > 0 and params[4].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_and_foreach_norms_stay_accurate_for_huge_tensors(dtype) -> None:
    """Norms of 2^24 + 5 elements on the CPU are within 1e-6 relative of float64 (torch's fp32 CPU
    vector_norm, and so _foreach_norm, is off by ~6.5e-4 there), for weights and unscaled gradients."""
    x = torch.randn((1 << 24) + 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    exact = x.double().square().sum().sqrt().item()
    assert abs(reference.l2_norm(x).item() / exact - 1) < 1e-6
    assert abs(foreach.norms([x, x[:5]])[0].item() / exact - 1) < 1e-6
    for backend in (reference, foreach):
        assert abs(backend.grad_norms([x], torch.tensor(4.0))[0].item() / (exact / 4) - 1) < 1e-6
