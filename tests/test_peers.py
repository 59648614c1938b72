"""fastlars against implementations nobody here wrote: timm Lamb/Lars and torch_optimizer Lamb,
in the configurations where their semantics coincide with ours, plus the compat constructors.

The peers are imported inside the tests that use them (pytest.importorskip), never at module level, so
that this file still collects on a stack without them (the GPU machine's image has timm but not
torch-optimizer); tests/test_optional_imports.py checks that for every test module."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import fastlars
import formulas
from fastlars import compat
from harness import SHAPES, assert_params_match, lr_at, make_params, synthetic_grads

BACKENDS = [b for b in fastlars.available_backends("cpu") if b != "triton"]
SMALL_SHAPES = [(1,), (7,), (3, 5), (9, 11), (4, 2, 3, 3)]  # ||w|| < 10: torch_optimizer clamps ||w|| at 10


def _timm_optim() -> types.ModuleType:
    return pytest.importorskip("timm.optim", reason="timm is not installed")


def _run(make, shapes=SHAPES, steps=30, base_lr=None):
    params = make_params(shapes, torch.float32)
    opt = make(params)
    for t in range(1, steps + 1):
        if base_lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(t, base_lr)
        for p, g in zip(params, synthetic_grads(params, t)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [{}, {"max_grad_norm": None}, {"always_adapt": True, "weight_decay": 0.0}, {"trust_clip": True},
     {"decoupled_decay": True}, {"grad_averaging": False}, {"bias_correction": False}],
    ids=str,
)
def test_lamb_matches_timm(backend: str, options: dict) -> None:
    ours_opts = {k: v for k, v in options.items() if k != "always_adapt"}
    if options.get("always_adapt"):
        ours_opts["adapt"] = True
    ours_opts.setdefault("max_grad_norm", 1.0)  # timm's default clips at 1.0
    theirs = _run(lambda ps: _timm_optim().Lamb(ps, lr=0.01, **options), base_lr=0.01)
    ours = _run(lambda ps: fastlars.LAMB(ps, lr=0.01, backend=backend, **ours_opts), base_lr=0.01)
    assert_params_match(ours, theirs)
    via_compat = _run(lambda ps: compat.Lamb(ps, lr=0.01, **options), base_lr=0.01)
    assert_params_match(via_compat, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [{"momentum": 0.9, "weight_decay": 1e-2}, {"momentum": 0.9, "weight_decay": 1e-2, "nesterov": True},
     {"momentum": 0.0, "weight_decay": 1e-2}, {"momentum": 0.9, "weight_decay": 0.0, "always_adapt": True},
     {"momentum": 0.9, "weight_decay": 1e-2, "trust_clip": True}, {"momentum": 0.9, "weight_decay": 0.0}],
    ids=str,
)
def test_lars_matches_timm(backend: str, options: dict) -> None:
    theirs = _run(lambda ps: _timm_optim().Lars(ps, lr=2.0, **options), base_lr=2.0)
    ours = _run(lambda ps: fastlars.LARS(
        ps, lr=2.0, momentum=options["momentum"], weight_decay=options["weight_decay"],
        nesterov=options.get("nesterov", False), trust_clip=options.get("trust_clip", False),
        adapt=True if options.get("always_adapt") else None, eps=1e-8, momentum_style="torch", backend=backend,
    ), base_lr=2.0)
    assert_params_match(ours, theirs)
    via_compat = _run(lambda ps: compat.Lars(ps, lr=2.0, **options), base_lr=2.0)
    assert_params_match(via_compat, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lamb_matches_torch_optimizer(backend: str, weight_decay: float) -> None:
    """torch_optimizer.Lamb (debias=False) = LAMB without bias correction, always adapting, no clip."""
    torch_optimizer = pytest.importorskip("torch_optimizer", reason="torch-optimizer is not installed")
    theirs = _run(lambda ps: torch_optimizer.Lamb(ps, lr=0.01, weight_decay=weight_decay), SMALL_SHAPES)
    ours = _run(lambda ps: fastlars.LAMB(ps, lr=0.01, weight_decay=weight_decay, bias_correction=False,
                                         adapt=True, backend=backend), SMALL_SHAPES)
    assert_params_match(ours, theirs)


@pytest.mark.parametrize("use_nvlamb", [False, True])
def test_fused_lamb_compat_matches_apex_formulas(use_nvlamb: bool) -> None:
    """apex FusedLAMB's defaults (wd 0.01 inside the ratio, global clip 1.0, adapt only where wd≠0 unless
    use_nvlamb) written out in float64, against fastlars.compat.FusedLAMB; a no-decay group shows adapt."""
    params = make_params(SHAPES, torch.float32)
    groups = [{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0}]
    opt = compat.FusedLAMB(groups, lr=0.01, use_nvlamb=use_nvlamb)
    ws = [p.detach().double().numpy().ravel().copy() for p in params]
    states = [formulas.LambState(np.zeros_like(w), np.zeros_like(w)) for w in ws]
    opts = [{"weight_decay": 0.01 if i < 4 else 0.0, "adapt": True if use_nvlamb else None} for i in range(len(ws))]
    for t in range(1, 31):
        grads = synthetic_grads(params, t)
        flat = [g.double().numpy().ravel() for g in grads]
        clip = formulas.lamb_clip(flat, 1.0)
        ws = [formulas.lamb_update(w, g, s, 0.01, clip, o) for w, g, s, o in zip(ws, flat, states, opts)]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    assert_params_match(params, [torch.from_numpy(w).reshape(p.shape) for w, p in zip(ws, params)])


def test_compat_rejects_unimplemented_options() -> None:
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="amsgrad"):
        compat.FusedLAMB(p, amsgrad=True)
    with pytest.raises(ValueError, match="adam_w_mode"):
        compat.FusedLAMB(p, adam_w_mode=False)
    with pytest.raises(ValueError, match="caution"):
        compat.Lamb(p, caution=True)
    with pytest.raises(ValueError, match="dampening"):
        compat.Lars(p, dampening=0.1)


def test_compat_defaults_follow_the_originals() -> None:
    timm_optim = _timm_optim()
    p = [torch.zeros(3, requires_grad=True)]
    assert compat.FusedLAMB(p).defaults["max_grad_norm"] == 1.0
    assert compat.Lamb(p).defaults["max_grad_norm"] == timm_optim.Lamb(p).defaults["max_grad_norm"]
    lars = compat.Lars(p)
    assert lars.defaults["eps"] == timm_optim.Lars(p).defaults["eps"] and lars.defaults["momentum_style"] == "torch"
