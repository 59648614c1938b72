"""The cached host path of native CPU steps (fastlars.optim._host, csrc/cpu/host_step.cpp).

Every test runs the same steps twice, with the plan (the default) and with ``host_plan_enabled=False``
(the Python step of every earlier release), and asserts bit-identical params, state and skip counts;
each also checks which steps really took the cached path, so a plan that silently never runs fails.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable

import pytest
import torch

import fastlars
from fastlars import compat
from harness import make_params, synthetic_grads

pytestmark = pytest.mark.skipif(fastlars.backends.unavailable_reason("native", torch.device("cpu")) is not None,
                                reason="the native CPU backend is not built")

SHAPES = [(0,), (1,), (7,), (3, 5), (17, 33), (40000,)]
CONFIGS = [
    pytest.param(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2}, torch.float32, id="lars"),
    pytest.param(fastlars.LARS, {"lr": 0.5, "weight_decay": 1e-2, "nesterov": True, "momentum_style": "torch",
                                 "trust_clip": True, "trust_ratio_bounds": (0.01, 10.0), "maximize": True},
                 torch.float32, id="lars-options"),
    pytest.param(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2, "master_weights": True}, torch.bfloat16,
                 id="lars-bf16-master"),
    pytest.param(fastlars.LAMB, {"lr": 0.01}, torch.float32, id="lamb"),
    pytest.param(fastlars.LAMB, {"lr": 0.01, "max_grad_norm": 1.0, "decoupled_decay": True, "trust_clip": True,
                                 "grad_averaging": False, "eps": 1e-8}, torch.float32, id="lamb-clip-options"),
    pytest.param(fastlars.LAMB, {"lr": 0.01, "master_weights": True, "bias_correction": False}, torch.float16,
                 id="lamb-fp16-master"),
    # Low-precision state (lowbit ops): int8 beside fp32 below min_quantized_size, bf16 state, bf16 weights
    # by stochastic rounding, bf16 with masters.
    pytest.param(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2, "state_dtype": "int8", "min_quantized_size": 16},
                 torch.float32, id="lars-int8"),
    pytest.param(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2, "state_dtype": "bf16", "min_quantized_size": 0,
                                 "stochastic_rounding": True, "nesterov": True}, torch.bfloat16, id="lars-bf16-sr"),
    pytest.param(fastlars.LAMB, {"lr": 0.01, "state_dtype": "int8", "min_quantized_size": 16, "max_grad_norm": 1.0},
                 torch.float32, id="lamb-int8-clip"),
    pytest.param(fastlars.LAMB, {"lr": 0.01, "state_dtype": "int8", "min_quantized_size": 0,
                                 "stochastic_rounding": True, "rounding_seed": 7}, torch.bfloat16, id="lamb-int8-sr"),
    pytest.param(fastlars.LAMB, {"lr": 0.01, "state_dtype": "bf16", "master_weights": True}, torch.bfloat16,
                 id="lamb-bf16-state-master"),
]


class Twin:
    """The same optimizer twice over copies of the same params: cached (host plan) and uncached."""

    def __init__(self, cls, kw, dtype, shapes=SHAPES, groups: Callable | None = None) -> None:
        self.params = [make_params(shapes, dtype) for _ in range(2)]
        self.opts = []
        for params, cached in zip(self.params, (True, False)):
            opt = cls(groups(params) if groups else params, backend="native", **kw)
            opt.host_plan_enabled = cached
            self.opts.append(opt)
        self.python_steps = 0
        gather = self.opts[0]._gather

        def counted():
            self.python_steps += 1
            return gather()

        self.opts[0]._gather = counted

    def both(self, action: Callable[[list[torch.Tensor], torch.optim.Optimizer], object]) -> None:
        for params, opt in zip(self.params, self.opts):
            action(params, opt)

    def step(self, t: int, scale: float = 1.0, bad: float | None = None, none: tuple[int, ...] = ()) -> None:
        for params, opt in zip(self.params, self.opts):
            for i, (p, g) in enumerate(zip(params, synthetic_grads(params, t, scale=scale))):
                p.grad = None if i in none else g
            if bad is not None:
                params[3].grad[1, 2] = bad
            opt.step()
        self.check()

    def check(self) -> None:
        (a, b), (oa, ob) = self.params, self.opts
        for pa, pb in zip(a, b):
            assert torch.equal(pa.detach(), pb.detach())
        sa, sb = oa.state_dict(), ob.state_dict()
        assert sa["skipped_steps"] == sb["skipped_steps"]
        assert sa["state"].keys() == sb["state"].keys()
        for pid, entry in sa["state"].items():
            assert entry.keys() == sb["state"][pid].keys()
            for key, value in entry.items():
                if isinstance(value, dict):  # a low-precision entry's state_format record
                    assert value == sb["state"][pid][key], f"state[{pid}][{key!r}]"
                    continue
                assert torch.equal(value, sb["state"][pid][key]), f"state[{pid}][{key!r}]"

    def cached_steps(self, steps: int, first: int) -> None:
        """`steps` steps from step number `first` on, all of which must take the cached path."""
        before = self.python_steps
        for t in range(first, first + steps):
            self.step(t)
        assert self.python_steps == before, "the cached path did not run"


@pytest.mark.parametrize("cls,kw,dtype", CONFIGS)
def test_cached_steps_are_bit_identical_across_group_and_state_changes(cls, kw, dtype) -> None:
    twin = Twin(cls, kw, dtype, groups=lambda ps: [{"params": ps[:3]}, {"params": ps[3:5], "weight_decay": 0.0}])
    twin.step(1)  # creates the state: the Python path
    assert twin.python_steps == 1
    twin.cached_steps(6, 2)
    twin.both(lambda ps, o: o.param_groups[0].__setitem__("lr", o.param_groups[0]["lr"] * 0.5))  # a schedule
    twin.cached_steps(3, 8)
    twin.both(lambda ps, o: o.add_param_group({"params": ps[5:]}))
    twin.step(11)
    assert twin.python_steps == 2, "add_param_group must drop the plan"
    twin.cached_steps(5, 12)
    saved = copy.deepcopy(twin.opts[1].state_dict())
    for t in range(17, 20):
        twin.step(t)
    twin.both(lambda ps, o: o.load_state_dict(saved))
    twin.step(20)
    assert twin.python_steps == 3, "load_state_dict must drop the plan"
    twin.cached_steps(20, 21)


@pytest.mark.parametrize("cls,kw,dtype", CONFIGS)
def test_non_finite_gradient_and_gradscaler_skips_match(cls, kw, dtype) -> None:
    twin = Twin(cls, kw, dtype)
    twin.step(1)
    twin.step(2, bad=float("nan"))
    twin.step(3, bad=float("inf"))
    assert twin.python_steps == 1 and twin.opts[0].skipped_steps == 2
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]
    for s in scalers:
        s.scale(torch.ones(()))
    for t in range(4, 9):
        for params, opt, scaler in zip(twin.params, twin.opts, scalers):
            for p, g in zip(params, synthetic_grads(params, t, scale=scaler.get_scale())):
                p.grad = g
            if t == 6:
                params[3].grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        twin.check()
    assert twin.python_steps == 1 and twin.opts[0].skipped_steps == 3
    assert scalers[0].get_scale() == scalers[1].get_scale()


def _swap_data(ps, o):
    ps[4].data = ps[4].detach().clone()


def _replace_buffer(ps, o):
    state = o.state[ps[4]]
    name = o.buffer_names[0]
    value = state[name]
    state[name] = value.clone() + 1e-3 if value.is_floating_point() else value.clone()  # int8 codes: a copy


def _add_master(ps, o):
    o.state[ps[3]]["master_param"] = ps[3].detach().float() + 1e-3


def _new_state_dict(ps, o):
    o.state[ps[2]] = {k: dict(v) if isinstance(v, dict) else v.clone() for k, v in o.state[ps[2]].items()}


def _clear_state(ps, o):
    o.state.clear()


def _append_param(ps, o):
    o.param_groups[0]["params"].append(torch.zeros(3, requires_grad=True))


def _swap_params(ps, o):
    group = o.param_groups[0]["params"]
    group[1], group[2] = group[2], group[1]


def _change_option(ps, o):
    o.param_groups[0]["weight_decay"] = 0.0


def _tensor_lr(ps, o):
    o.param_groups[0]["lr"] = torch.tensor(0.25)


INVALIDATIONS = [
    # (what the user does between steps, whether the next step must take the Python path)
    pytest.param(_swap_data, False, id="param.data-swapped"),  # same shape: the cached tensor sees the new data
    pytest.param(_replace_buffer, True, id="state-tensor-replaced"),
    pytest.param(_add_master, True, id="master-added"),
    pytest.param(_new_state_dict, True, id="state-dict-replaced"),
    pytest.param(_clear_state, True, id="state-cleared"),
    pytest.param(_append_param, True, id="param-appended-to-group"),
    pytest.param(_swap_params, True, id="params-reordered"),
    pytest.param(_change_option, False, id="option-changed"),
    pytest.param(_tensor_lr, False, id="tensor-lr"),
]


def _replace_scales(ps, o):
    state = o.state[ps[5]]  # 40000 elements: int8 in both configs
    name = o.buffer_names[0] + "_absmax"
    state[name] = state[name].clone()


def _replace_format_record(ps, o):
    o.state[ps[5]]["state_format"] = dict(o.state[ps[5]]["state_format"])


def _new_rounding_seed(ps, o):
    o.param_groups[0]["rounding_seed"] = 123


LOW_PRECISION_INVALIDATIONS = [
    pytest.param(_replace_scales, True, id="block-scales-replaced"),
    pytest.param(_replace_format_record, True, id="format-record-replaced"),
    pytest.param(_new_rounding_seed, True, id="rounding-seed-changed"),
]


@pytest.mark.parametrize("cls,kw,dtype", [CONFIGS[0], CONFIGS[3], CONFIGS[9]])
@pytest.mark.parametrize("change,python_path", INVALIDATIONS)
def test_what_a_user_changes_between_steps_is_seen(cls, kw, dtype, change, python_path) -> None:
    twin = Twin(cls, kw, dtype)
    twin.step(1)
    twin.cached_steps(2, 2)
    twin.both(change)
    before = twin.python_steps
    twin.step(4)
    assert twin.python_steps == before + python_path
    twin.cached_steps(3, 5)


@pytest.mark.parametrize("cls,kw,dtype", [CONFIGS[6], CONFIGS[9]])
@pytest.mark.parametrize("change,python_path", LOW_PRECISION_INVALIDATIONS)
def test_what_a_user_changes_in_low_precision_state_is_seen(cls, kw, dtype, change, python_path) -> None:
    """Block scales and format records are re-checked like the other state tensors, and the group options
    that choose the low-precision op's inputs (rounding_seed) drop the plan."""
    test_what_a_user_changes_between_steps_is_seen(cls, kw, dtype, change, python_path)


@pytest.mark.parametrize("cls,kw,dtype", [CONFIGS[0], CONFIGS[3]])
def test_gradients_that_appear_and_disappear(cls, kw, dtype) -> None:
    twin = Twin(cls, kw, dtype)
    twin.step(1, none=(2, 4))  # params 2 and 4 have no gradient: no state for them
    for t in (2, 3):
        twin.step(t, none=(2, 4))
    assert twin.python_steps == 1
    twin.step(4)  # they get gradients: state is created, the Python path runs
    assert twin.python_steps == 2
    twin.cached_steps(2, 5)
    twin.step(7, none=(4,))  # one loses it again
    assert twin.python_steps == 3
    twin.step(8, none=(4,))
    assert twin.python_steps == 3


@pytest.mark.parametrize("cls,kw,dtype", [CONFIGS[0], CONFIGS[3]])
def test_bad_gradient_after_the_first_step_raises_naming_it_and_changes_nothing(cls, kw, dtype) -> None:
    twin = Twin(cls, kw, dtype, groups=lambda ps: [{"params": ps[:3]}, {"params": ps[3:]}])
    twin.step(1)
    twin.cached_steps(2, 2)
    params, opt = twin.params[0], twin.opts[0]
    snapshot = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    for p, g in zip(params, synthetic_grads(params, 4)):
        p.grad = g
    name = r"param_groups\[1\]\['params'\]\[1\] \(shape \(17, 33\), torch.float32\): "
    cases = [  # torch refuses the first two through `p.grad = ...`, not through `p.grad.data = ...`
        (lambda g: setattr(g, "data", torch.zeros(17, 34)), name + r"gradient shape \(17, 34\) differs"),
        (lambda g: setattr(g, "data", g.double()), name + "gradient dtype torch.float64 differs"),
        (lambda g: setattr(params[4], "grad", g.to_sparse()), name + "sparse gradients are not supported"),
    ]
    for corrupt, match in cases:
        params[4].grad = synthetic_grads(params, 4)[4]
        corrupt(params[4].grad)
        with pytest.raises(RuntimeError, match=match):
            opt.step()
        for p, b in zip(params, snapshot[0]):
            assert torch.equal(p.detach(), b)
        after = opt.state_dict()
        assert after["skipped_steps"] == snapshot[1]["skipped_steps"]
        for pid, entry in snapshot[1]["state"].items():
            for key, value in entry.items():
                assert torch.equal(after["state"][pid][key], value), f"state[{pid}][{key!r}] changed"


def test_data_swapped_to_another_shape_fails_as_before() -> None:
    twin = Twin(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2}, torch.float32)
    twin.step(1)
    twin.step(2)
    errors = []
    for params, opt in zip(twin.params, twin.opts):
        params[4].data = torch.zeros(5)
        params[4].grad = torch.zeros(5)
        with pytest.raises(RuntimeError) as info:
            opt.step()
        errors.append(str(info.value).splitlines()[0])
    assert errors[0] == errors[1]


def test_plan_is_not_used_for_recorded_ratios_or_other_backends() -> None:
    params = make_params(SHAPES, torch.float32)
    opt = fastlars.LAMB(params, backend="foreach")
    for p, g in zip(params, synthetic_grads(params, 1)):
        p.grad = g
    opt.step()
    assert opt._host_plan is None
    opt = fastlars.LAMB(params, backend="native")
    opt.step()
    assert opt._host_plan is not None
    opt.record_trust_ratios()
    opt.step()
    assert opt._host_plan is None and opt.trust_ratios[0] is not None


def _fastlars_ops(step: Callable[[], object]) -> list[str]:
    """The fastlars ops (and their order) that `step` calls, as the profiler records them."""
    with torch.autograd.profiler.profile() as prof:
        step()
    return [e.name for e in prof.function_events if e.name.startswith("fastlars::")]


OP_CASES = [
    # (optimizer, options, the second group's options, params without a gradient, norms computed unscaled/scaled)
    pytest.param(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2}, {}, (), (2, 0), id="lars"),
    pytest.param(fastlars.LAMB, {"lr": 0.01}, {}, (), (2, 0), id="lamb"),
    pytest.param(fastlars.LAMB, {"lr": 0.01}, {"max_grad_norm": 1.0}, (), (2, 2), id="lamb-clip"),
    # the clipping group has no gradient: neither step may compute norms for it under a GradScaler
    pytest.param(fastlars.LAMB, {"lr": 0.01}, {"max_grad_norm": 1.0}, (3, 4, 5), (1, 0),
                 id="lamb-clip-group-without-grads"),
]


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "gradscaler"])
@pytest.mark.parametrize("cls,kw,second,none,norm_calls", OP_CASES)
def test_cached_step_calls_the_ops_the_python_step_calls(cls, kw, second, none, norm_calls, scaled) -> None:
    """Under a GradScaler LARS's op folds ||g|| in and LAMB without clipping needs no norms: the cached
    step must not add a pass over the gradients that the Python step leaves out."""
    twin = Twin(cls, kw, torch.float32, groups=lambda ps: [{"params": ps[:3]}, {"params": ps[3:], **second}])
    scalers = [torch.amp.GradScaler("cpu", init_scale=64.0, enabled=scaled) for _ in range(2)]
    for s in scalers:
        s.scale(torch.ones(()))
    ops = []
    for t in range(1, 5):
        for params, opt, scaler in zip(twin.params, twin.opts, scalers):
            for i, (p, g) in enumerate(zip(params, synthetic_grads(params, t, scale=scaler.get_scale()))):
                p.grad = None if i in none else g
            if t == 4:
                ops.append(_fastlars_ops(functools.partial(scaler.step, opt)))
            else:
                scaler.step(opt)
            scaler.update()
        twin.check()
    assert twin.python_steps == 1, "steps 2-4 must take the cached path"
    cached, python = ops
    assert cached == python
    assert python.count("fastlars::grad_norms") == norm_calls[scaled]
    assert len(python) - python.count("fastlars::grad_norms") == 2 - (len(none) == 3)


def test_the_plan_keeps_no_gradient_alive() -> None:
    """zero_grad(set_to_none=True) after a cached step frees the gradients: the plan holds none of them."""
    twin = Twin(fastlars.LAMB, {"lr": 0.01}, torch.float32)
    twin.step(1)
    twin.cached_steps(1, 2)
    params, opt = twin.params[0], twin.opts[0]
    refs = [weakref.ref(p.grad) for p in params]
    opt.zero_grad(set_to_none=True)
    assert all(r() is None for r in refs)


def test_a_stand_in_native_backend_sees_every_step(monkeypatch) -> None:
    """A "native" backend replaced in fastlars.backends (as the CUDA emulation tests do) is never bypassed
    by a plan: every step calls it."""
    real = fastlars.backends.load("native")
    calls = []

    class StandIn:
        __name__ = "tests.stand_in_native"

        def __getattr__(self, name):
            attr = getattr(real, name)
            if name in ("lars_step", "lamb_step"):
                return lambda *a, **k: calls.append(name) or attr(*a, **k)
            return attr

    monkeypatch.setitem(fastlars.backends._LOADED, "native", StandIn())
    params = make_params(SHAPES, torch.float32)
    opt = fastlars.LAMB(params, lr=0.01, backend="native")
    for t in range(1, 4):
        for p, g in zip(params, synthetic_grads(params, t)):
            p.grad = g
        opt.step()
    assert opt._host_plan is None and calls == ["lamb_step"] * 3


def test_a_subclass_that_changes_the_step_keeps_the_python_step() -> None:
    """The plan calls the ops itself: a subclass overriding a method it stands in for is never planned,
    one that only adds options (fastlars.compat) is."""

    class HalfLR(fastlars.LARS):
        def _update_group(self, item, views, steps, grad_scale, found_inf, global_grad_norm, trust_ratios=None):
            item.group = {**item.group, "lr": item.group["lr"] * 0.5}
            super()._update_group(item, views, steps, grad_scale, found_inf, global_grad_norm, trust_ratios)

    for cls, planned in ((HalfLR, False), (compat.Lars, True), (compat.FusedLAMB, True)):
        params = make_params(SHAPES, torch.float32)
        opt = cls(params, lr=0.1, **({"backend": "native"} if cls is HalfLR else {}))  # compat: auto = native
        for p, g in zip(params, synthetic_grads(params, 1)):
            p.grad = g
        opt.step()
        assert (opt._host_plan is not None) == planned, cls.__name__


def _scale_in_place(ps, o) -> None:
    with torch.no_grad():
        ps[5].mul_(1.5)


def _scale_through_data(ps, o) -> None:
    ps[5].data.mul_(1.5)


def _scale_through_data_and_forget(ps, o) -> None:
    ps[5].data.mul_(1.5)
    o.forget_weight_norms()


LOW_PRECISION_STATES = [{}, {"state_dtype": "int8", "min_quantized_size": 16}, {"state_dtype": "bf16"}]


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}), (torch.bfloat16, {"master_weights": True}),
                                      (torch.float32, LOW_PRECISION_STATES[1]),
                                      (torch.bfloat16, {"master_weights": True, **LOW_PRECISION_STATES[2]})],
                         ids=["fp32", "bf16-master", "int8-state", "bf16-state-bf16-master"])
def test_lars_carries_weight_norms_between_cached_steps(dtype, kw) -> None:
    """The plan's LARS steps take ||w|| from the previous update (LARS.reuse_weight_norms): bit-identical
    to the Python step, which reads w for it every step, over many steps and a schedule change."""
    twin = Twin(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2, **kw}, dtype)
    assert twin.opts[0].reuse_weight_norms
    twin.step(1)
    twin.cached_steps(12, 2)
    twin.both(lambda ps, o: o.param_groups[0].__setitem__("lr", 0.25))
    twin.cached_steps(8, 14)


@pytest.mark.parametrize("state", LOW_PRECISION_STATES, ids=["fp32-state", "int8-state", "bf16-state"])
@pytest.mark.parametrize("change,seen", [(_scale_in_place, True), (_scale_through_data_and_forget, True),
                                         (_scale_through_data, False)],
                         ids=["in-place-op", "data-write-then-forget", "data-write-unseen"])
def test_carried_weight_norms_follow_what_the_version_counter_sees(change, seen, state) -> None:
    """An in-place op on a param bumps its version counter, so the next cached step reads w for ||w|| again
    and stays bit-identical to the Python step; a write through ``.data`` is invisible to it (the documented
    limit: the carried norm is then stale, which proves it is carried) unless forget_weight_norms() follows.
    With fp32, int8 or bf16 momentum alike."""
    twin = Twin(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2, **state}, torch.float32)
    twin.step(1)
    twin.cached_steps(2, 2)
    twin.both(change)
    if not seen:
        with pytest.raises(AssertionError):
            twin.step(4)
        return
    for t in range(4, 7):  # forget_weight_norms drops the plan: the first of these takes the Python path
        twin.step(t)


def test_reuse_weight_norms_off_sees_data_writes_and_is_checked() -> None:
    twin = Twin(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2}, torch.float32)
    twin.both(lambda ps, o: setattr(o, "reuse_weight_norms", False))
    twin.step(1)
    twin.cached_steps(2, 2)
    twin.both(_scale_through_data)
    twin.cached_steps(3, 4)
    with pytest.raises(TypeError, match="reuse_weight_norms: expected True or False"):
        twin.opts[0].reuse_weight_norms = "yes"
