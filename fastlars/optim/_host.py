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
counts steps and skipped steps itself, and holds no gradient between steps. Groups with low-precision state
or stochastically rounded weights take the same path through the native low-precision ops (their int8
codes, block scales and format records are cached and re-checked like the other state entries); a change
of a group's ``state_dtype``, ``stochastic_rounding`` or ``rounding_seed`` drops back to the Python step.
LARS's plan carries each tensor's ||w|| from one update to the next step while the weights keep their
storage and version counter (``LARS.reuse_weight_norms``, csrc/cpu/lars_step.h).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from fastlars import backends
from fastlars._extension import extension
from fastlars.backends import quantization as q

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


_NATIVE_MODULES = {"native": "fastlars.backends.native", "native:low_precision": "fastlars.backends.native_lowbit"}
"""The modules the plan's ops are (a test's stand-in registered under these names must see every step)."""


def _rounding_keys(opt: TrustRatioOptimizer, group: dict[str, Any], params: list[Tensor],
                   states: list[dict[str, Any]]) -> list[int]:
    """The group's sr_tensor_key per taking-part param, as native_lowbit passes them (none with masters)."""
    if not group["stochastic_rounding"] or not params:
        return []
    if any("master_param" in state for state in states):
        return []
    if opt._param_positions is None:
        opt._param_positions = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    seed = group["rounding_seed"]
    return [q.sr_tensor_key(seed, opt._param_positions[id(p)], q.STREAM_PARAM) for p in params]


def build_plan(opt: TrustRatioOptimizer, work: list[GroupWork], algorithm: str) -> Any | None:
    """A HostPlan for ``opt`` after a Python step that did ``work``, or None when its steps cannot take the
    cached path: a group not on the native CPU backend or sharded, recorded trust ratios, a stats group,
    a param of a tensor subclass, a subclass that overrides part of the step, a "native" backend that is
    not fastlars.backends.native / native_lowbit (a test's stand-in: the plan would bypass it), or an
    extension built without the plan."""
    plan_class = getattr(extension(), "HostPlan", None)
    if (plan_class is None or not work or not opt.host_plan_enabled or opt.trust_ratios is not None
            or opt.stats_group is not None or opt._skipped.device.type != "cpu"
            or _overrides_the_step(opt, algorithm)):
        return None
    low_precision = [opt._is_low_precision(group) for group in opt.param_groups]
    for name in {"native:low_precision" if low else "native" for low in low_precision}:
        if getattr(backends.load(name), "__name__", None) != _NATIVE_MODULES[name]:
            return None
    if any(item.backend != "native" or item.reduce is not None or item.device.type != "cpu" for item in work):
        return None
    groups = []
    for group, low in zip(opt.param_groups, low_precision):
        params = group["params"]
        if any(type(p) not in PLAIN_TYPES for p in params):
            return None
        takes_part = [p.grad is not None for p in params]
        stepped = [p for p, t in zip(params, takes_part) if t]
        states = [opt.state[p] for p in stepped]
        keys = _rounding_keys(opt, group, stepped, states) if low else []
        storage = (group["state_dtype"], group["stochastic_rounding"], group["rounding_seed"])
        groups.append((params, takes_part, states, low, keys, storage))
    return plan_class(algorithm, opt.state, list(opt.buffer_names), groups,
                      reuse_weight_norms=bool(getattr(opt, "reuse_weight_norms", False)))
