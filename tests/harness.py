"""Shared test machinery: deterministic multi-step trajectories and per-dtype tolerances.

Every backend test drives an optimizer through the same synthetic trajectory (seeded gradients
that also depend on the current weights, a learning rate that changes every step) and compares
parameters AND optimizer state with another run. Use these helpers instead of writing new loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

# bitsandbytes-style tolerances (atol, rtol) per parameter dtype, for multi-step trajectories.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 1e-2),
}

# Shapes every backend must handle: empty, one element, odd sizes, a multi-dim conv kernel, and a
# tensor large enough to span several chunks of any multi-tensor kernel.
SHAPES: list[tuple[int, ...]] = [(0,), (1,), (7,), (3, 5), (17, 33), (8, 3, 3, 3), (1031,), (65_537,)]


def lr_at(step: int, base: float) -> float:
    """A learning rate that changes every step (so the two LARS momentum styles differ)."""
    return base * (1.0 + 0.5 * math.sin(0.7 * step))


def make_params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: str = "cpu", seed: int = 0,
                zero: Sequence[int] = ()) -> list[Tensor]:
    """Leaf parameters with seeded values; indices in ``zero`` start as all-zero tensors."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        value = torch.zeros(shape) if i in zero else torch.randn(shape, generator=gen) * 0.5
        out.append(value.to(device=device, dtype=dtype).requires_grad_(True))
    return out


def synthetic_grads(params: Sequence[Tensor], step: int, seed: int = 0, scale: float = 1.0,
                    zero: Sequence[int] = ()) -> list[Tensor]:
    """Seeded noise plus a pull towards 0.3·w, in each param's dtype and device."""
    gen = torch.Generator().manual_seed(10_000 * seed + step)
    grads = []
    for i, p in enumerate(params):
        noise = torch.randn(p.shape, generator=gen)
        g = scale * (noise + 0.3 * p.detach().float().cpu())
        if i in zero:
            g = torch.zeros_like(g)
        grads.append(g.to(device=p.device, dtype=p.dtype))
    return grads


def run_trajectory(
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    dtype: torch.dtype = torch.float32,
    steps: int = 30,
    base_lr: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    zero_params: Sequence[int] = (),
    zero_grads: Sequence[int] = (),
    grad_hook: Callable[[int, list[Tensor]], None] | None = None,
) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """Run ``steps`` optimizer steps and return (params, optimizer).

    ``base_lr``: when set, every group's lr follows :func:`lr_at` (a float, or a tensor when the
    group's lr is a tensor). ``grad_hook(step, grads)`` may edit the gradients in place.
    """
    params = make_params(shapes, dtype, device, seed, zero=zero_params)
    opt = make_optimizer(params)
    for t in range(1, steps + 1):
        if base_lr is not None:
            for group in opt.param_groups:
                lr = lr_at(t, base_lr)
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
        grads = synthetic_grads(params, t, seed, zero=zero_grads)
        if grad_hook is not None:
            grad_hook(t, grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return params, opt


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare within the tolerance of ``dtype`` (the parameters' storage dtype)."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def assert_same_trajectory(a: tuple[list[Tensor], torch.optim.Optimizer],
                           b: tuple[list[Tensor], torch.optim.Optimizer], dtype: torch.dtype) -> None:
    """Parameters and every state tensor of two runs agree within the dtype's tolerance."""
    (pa, oa), (pb, ob) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_close(x.detach(), y.detach(), dtype, f"param {i} {tuple(x.shape)}")
        sa, sb = oa.state[x], ob.state[y]
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} vs {sorted(sb)}"
        for key in sa:
            assert_close(sa[key], sb[key], dtype, f"param {i} state[{key!r}]")


STATE_RTOL = 2e-6
"""Tight fp32 tolerance for :func:`assert_state_tight`: five times below the 1e-5 relative error of a
(1 − β2) formed in fp32 on the device (1 − 0.999f = 0.00099998713), which the dtype tolerances let pass."""


def assert_state_tight(a: tuple[list[Tensor], torch.optim.Optimizer],
                       b: tuple[list[Tensor], torch.optim.Optimizer], rtol: float = STATE_RTOL) -> None:
    """fp32 parameters and every state tensor (exp_avg, exp_avg_sq, momentum_buffer, ...) of run ``a``
    agree with run ``b`` elementwise: |a − b| ≤ rtol·(|b| + rms(b)).

    The rms term absorbs elements that cancel to near zero (a momentum buffer, an exp_avg), so the bound
    is relative where values are typical; a systematic relative bias of 5·rtol fails wherever it sits.
    """
    (pa, oa), (pb, ob) = a, b

    def check(x: Tensor, y: Tensor, what: str) -> None:
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        if y.numel() == 0 or not torch.is_floating_point(y):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
            return
        scale = y.abs() + y.square().mean().sqrt()
        excess = ((x - y).abs() / scale.clamp_min(torch.finfo(torch.float64).tiny)).nan_to_num(nan=float("inf"))
        worst = excess.max().item()
        assert worst <= rtol, f"{what}: relative error {worst:.3g} > {rtol:g} (|a-b| / (|b| + rms(b)))"

    for i, (x, y) in enumerate(zip(pa, pb)):
        check(x, y, f"param {i} {tuple(x.shape)}")
        sa, sb = oa.state[x], ob.state[y]
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} vs {sorted(sb)}"
        for key in sa:
            if isinstance(sa[key], Tensor):
                check(sa[key], sb[key], f"param {i} state[{key!r}]")


def options_grid(base: dict[str, Any], variants: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``base`` updated by each variant (for parametrize)."""
    return [{**base, **v} for v in variants]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual − expected|| / ||expected|| in float64 (0 when both are empty or zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.norm().item()
    diff = (a - e).norm().item()
    return diff if scale == 0 else diff / scale


def assert_params_match(actual: Sequence[Tensor], expected: Sequence[Tensor], tol: float = 1e-5) -> None:
    """Each pair of tensors agrees to a norm-relative error of ``tol``."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = relative_error(a, e)
        assert err <= tol, f"tensor {i} {tuple(a.shape)}: relative error {err:.3g} > {tol}"
