"""The foreach backend off the CPU: a step is a fixed number of launches whatever the tensor count.

Counted on this CPU machine without a GPU: the step runs on the ``meta`` device, which takes the
same code path as CUDA (everything but the CPU's own branches), under a TorchDispatchMode that counts
the launches a CUDA run would make. A multi-tensor op takes CUDA's fast path (one launch) only when,
at every index, its tensor lists hold tensors of equal shape and strides (ATen's can_use_fast_route);
else it runs one op per tensor, so it is counted as len(list) launches, as a list of 0-d tensors would
be. Views launch nothing; every other op counts one.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlars
from fastlars import functional
from fastlars.backends import foreach
from harness import SHAPES, make_params, synthetic_grads

MIXED_SHAPES = [(4, 5), (7,), (3, 2, 3, 3), (1,), (16,), (0,)]


def _tensor_lists(args: Any) -> list[list[torch.Tensor]]:
    return [list(a) for a in args if isinstance(a, list | tuple) and a and isinstance(a[0], torch.Tensor)]


def _fast_route(lists: list[list[torch.Tensor]]) -> bool:
    """ATen's condition for one multi-tensor launch: equal shape and strides at each index, dense."""
    return all(
        len({(t.shape, t.stride()) for t in column}) == 1 and column[0].is_contiguous()
        for column in zip(*lists)
    )


class LaunchCounter(TorchDispatchMode):
    """Launches a CUDA run of the dispatched ops would make (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:
            name = str(func.overloadpacket)
            lists = _tensor_lists(list(args) + list(kwargs.values()))
            foreach_op = name.startswith("aten._foreach") and lists
            self.launches[name] += 1 if not foreach_op or _fast_route(lists) else len(lists[0])
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.launches.values())


def _lamb_launches(n: int, device: str = "meta", **options: Any) -> LaunchCounter:
    shapes = [MIXED_SHAPES[i % len(MIXED_SHAPES)] for i in range(n)]
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    states = [[torch.zeros(s, device=device) for s in shapes] for _ in range(2)]
    steps = [torch.full((), 3.0, device=device) for _ in shapes]
    with LaunchCounter() as counter:
        functional.lamb_step(params, grads, *states, steps, backend="foreach", **{"lr": 0.01, **options})
    return counter


def _lars_launches(n: int, device: str = "meta", **options: Any) -> LaunchCounter:
    shapes = [MIXED_SHAPES[i % len(MIXED_SHAPES)] for i in range(n)]
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    buffers = [torch.zeros(s, device=device) for s in shapes]
    with LaunchCounter() as counter:
        functional.lars_step(params, grads, buffers, lr=0.1, weight_decay=1e-4, backend="foreach", **options)
    return counter


@pytest.mark.parametrize("options", [{}, {"max_grad_norm": 1.0}, {"bias_correction": False},
                                     {"decoupled_decay": True}, {"lr": torch.tensor(0.01)}], ids=str)
def test_lamb_step_launches_do_not_depend_on_the_tensor_count(options: dict) -> None:
    few, many = _lamb_launches(3, **options), _lamb_launches(30, **options)
    assert few.total == many.total, f"3 tensors: {dict(few.launches)}\n30 tensors: {dict(many.launches)}"
    assert few.total < 60


@pytest.mark.parametrize("options", [{}, {"nesterov": True}, {"momentum_style": "torch"},
                                     {"momentum_style": "torch", "nesterov": True}], ids=str)
def test_lars_step_launches_do_not_depend_on_the_tensor_count(options: dict) -> None:
    few, many = _lars_launches(3, **options), _lars_launches(30, **options)
    assert few.total == many.total, f"3 tensors: {dict(few.launches)}\n30 tensors: {dict(many.launches)}"
    assert few.total < 40


def test_the_counter_sees_a_list_of_0d_tensors_as_one_launch_per_tensor() -> None:
    xs = [torch.ones(s, device="meta") for s in MIXED_SHAPES]
    with LaunchCounter() as counter:
        torch._foreach_mul(xs, list(torch.ones(len(xs), device="meta").unbind(0)))
    assert counter.launches["aten._foreach_mul"] == len(xs)
    with LaunchCounter() as counter:
        torch._foreach_mul(xs, foreach.expand_per_tensor(torch.ones(len(xs), device="meta"), xs))
    assert counter.launches["aten._foreach_mul"] == 1


def test_expand_per_tensor_fills_each_shape_with_its_value() -> None:
    like = [torch.empty(s) for s in [*SHAPES, (2, 3, 4)]]
    values = torch.randn(len(like))
    out = foreach.expand_per_tensor(values, like)
    for v, o, t in zip(values, out, like):
        assert o.shape == t.shape and o.is_contiguous() and o.dtype == torch.float32
        assert torch.equal(o, torch.full(t.shape, v.item()))


@pytest.mark.parametrize("optim", ["lamb", "lars", "lars_torch_nesterov"])
def test_the_flat_path_gives_the_same_bits_as_per_tensor_scalars(optim: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device path's flat per-tensor factors, forced on the CPU, against the 0-d-tensor path."""

    def run() -> list[torch.Tensor]:
        params = make_params(SHAPES, torch.float32)
        if optim == "lamb":
            opt = fastlars.LAMB(params, lr=0.01, weight_decay=0.01, max_grad_norm=1.0, backend="foreach")
        else:
            extra = {"momentum_style": "torch", "nesterov": True} if optim == "lars_torch_nesterov" else {}
            opt = fastlars.LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-4, backend="foreach", **extra)
        for t in range(1, 6):
            for p, g in zip(params, synthetic_grads(params, t)):
                p.grad = g
            opt.step()
        return [p.detach().clone() for p in params] + [b for s in opt.state.values() for b in s.values()]

    per_scalar = run()
    monkeypatch.setattr(foreach, "per_tensor", lambda values, like: foreach.expand_per_tensor(values.float(), like))
    flat = run()
    assert all(torch.equal(a, b) for a, b in zip(per_scalar, flat, strict=True))
