"""The cached host path of steps over native CPU groups: when to build a fastlars._C.HostPlan.

A Python step of :class:`~fastlars.optim._base.TrustRatioOptimizer` gathers and re-validates every
gradient, rebuilds the per-parameter lists and counts steps with small torch ops; on a model of small
tensors that host work costs more than the update. After a Python step whose groups all run the native
CPU kernels, the optimizer builds a plan (csrc/cpu/host_step.h) that caches the group lists and does
the next steps in one call, with the same ops and the same results. The plan re-checks at every step,
in C++, that the optimizer still holds what it cached (param lists, which params have a gradient, state
dicts and state tensors) and that every tensor passes the ops' checks; when anything differs it changes
nothing and the Python step runs (raising today's errors, naming the parameter), then a new plan is made.
``add_param_group`` and ``load_state_dict`` drop the plan; a step that creates state (a param's first
gradient) takes the Python path, which makes a new one. The plan calls the ops the Python step would
(no gradient norms under a GradScaler unless LAMB clips: LARS's op then folds ||g|| into its norm pass),
counts steps and skipped steps itself, and holds no gradient between steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from fastlars import backends
from fastlars._extension import extension

if TYPE_CHECKING:
    from fastlars.optim._base import GroupWork, TrustRatioOptimizer

PLAIN_TYPES = (Tensor, nn.Parameter)
"""Param types whose ``.grad`` the plan may read in C++ (no subclass overrides it, no DTensor)."""

REPLACED = ("step", "_gather", "_init_state", "_keeps_master", "_needs_grad_norms", "_gradient_statistics",
            "_update_group", "_views", "_masters", "adapts", "_check_options")
"""What a plan step does instead of these methods: a subclass overriding any of them keeps the Python step."""


def _overrides_the_step(opt: TrustRatioOptimizer, algorithm: str) -> bool:
    from fastlars.optim.lamb import LAMB
    from fastlars.optim.lars import LARS

    base = {"lars": LARS, "lamb": LAMB}.get(algorithm)
    return base is None or not isinstance(opt, base) or any(
        getattr(type(opt), name) is not getattr(base, name) for name in REPLACED)


def build_plan(opt: TrustRatioOptimizer, work: list[GroupWork], algorithm: str) -> Any | None:
    """A HostPlan for ``opt`` after a Python step that did ``work``, or None when its steps cannot take the
    cached path: a group not on the native CPU backend or sharded, recorded trust ratios, a stats group,
    a param of a tensor subclass, a group with low-precision state or stochastic rounding, a subclass that
    overrides part of the step, a "native" backend that is not fastlars.backends.native (a test's
    stand-in: the plan would bypass it), or an extension built without the plan."""
    plan_class = getattr(extension(), "HostPlan", None)
    if (plan_class is None or not work or not opt.host_plan_enabled or opt.trust_ratios is not None
            or getattr(backends.load("native"), "__name__", None) != "fastlars.backends.native"
            or opt.stats_group is not None or opt._skipped.device.type != "cpu"
            or any(opt._is_low_precision(group) for group in opt.param_groups)
            or _overrides_the_step(opt, algorithm)):
        return None
    if any(item.backend != "native" or item.reduce is not None or item.device.type != "cpu" for item in work):
        return None
    groups = []
    for group in opt.param_groups:
        params = group["params"]
        if any(type(p) not in PLAIN_TYPES for p in params):
            return None
        takes_part = [p.grad is not None for p in params]
        groups.append((params, takes_part, [opt.state[p] for p, t in zip(params, takes_part) if t]))
    return plan_class(algorithm, opt.state, list(opt.buffer_names), groups)
