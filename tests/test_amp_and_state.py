"""AMP and state: GradScaler skipping, non-finite gradients, master weights, portable state_dicts."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fastlars
from harness import assert_same_trajectory, make_params, run_trajectory, synthetic_grads

BACKENDS = [b for b in fastlars.available_backends("cpu") if b != "triton"]
ALGOS = [(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2}), (fastlars.LAMB, {"lr": 0.01, "max_grad_norm": 1.0})]
SHAPES = [(0,), (1,), (7,), (3, 5), (17, 33), (1031,)]


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_unchanged(params, opt, snapshot):
    before_params, before_state = snapshot
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    state = opt.state_dict()["state"]
    for pid, entry in before_state.items():
        for key, value in entry.items():
            assert torch.equal(state[pid][key], value), f"state[{pid}][{key!r}] changed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", ALGOS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_gradscaler_overflow_step_changes_nothing(backend, cls, kw, bad) -> None:
    params = make_params(SHAPES, torch.float32)
    opt = cls(params, backend=backend, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))
    for t in (1, 2):  # build some state first
        for p, g in zip(params, synthetic_grads(params, t)):
            p.grad = g * 1024.0
        scaler.step(opt)
        scaler.update()
    snapshot = _snapshot(params, opt)
    for p, g in zip(params, synthetic_grads(params, 3)):
        p.grad = g * scaler.get_scale()
    params[3].grad[1, 2] = bad
    scaler.step(opt)
    _assert_unchanged(params, opt, snapshot)
    assert opt.skipped_steps == 1
    scale = scaler.get_scale()
    scaler.update()
    assert scaler.get_scale() < scale, "GradScaler saw the overflow"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", ALGOS)
def test_gradscaler_unscales_inside_the_step(backend, cls, kw) -> None:
    """With scaled gradients and GradScaler, the trajectory equals the unscaled one."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(torch.ones(()))

    def scaled(step, grads):
        for g in grads:
            g.mul_(scaler.get_scale())

    plain = run_trajectory(lambda ps: cls(ps, backend=backend, **kw), SHAPES, base_lr=kw["lr"])
    params = make_params(SHAPES, torch.float32)
    opt = cls(params, backend=backend, **kw)
    from harness import lr_at

    for t in range(1, 31):
        for group in opt.param_groups:
            group["lr"] = lr_at(t, kw["lr"])
        grads = synthetic_grads(params, t)
        scaled(t, grads)
        for p, g in zip(params, grads):
            p.grad = g
        scaler.step(opt)
        scaler.update()
    assert_same_trajectory(plain, (params, opt), torch.float32)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", ALGOS)
def test_non_finite_gradient_without_scaler_skips_the_whole_step(backend, cls, kw) -> None:
    """A NaN/inf anywhere: nothing is written (weights, buffers, step count), and the skip is counted.
    The run then continues exactly as if that step had never happened."""
    poisoned_steps = {5, 6}

    def poison(step, grads):
        if step in poisoned_steps:
            grads[4][0, 0] = float("nan") if step == 5 else float("-inf")

    def make(ps):
        return cls(ps, backend=backend, **kw)

    params = make_params(SHAPES, torch.float32)
    opt = make(params)
    clean_params = make_params(SHAPES, torch.float32)
    clean = make(clean_params)
    for t in range(1, 16):
        grads = synthetic_grads(params, t)
        poison(t, grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if t not in poisoned_steps:
            for p, g in zip(clean_params, synthetic_grads(clean_params, t)):
                p.grad = g
            clean.step()
    assert opt.skipped_steps == 2
    assert_same_trajectory((params, opt), (clean_params, clean), torch.float32)
    assert all(float(opt.state[p]["step"]) == 13 for p in params)
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", ALGOS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_keep_fp32_copies(backend, cls, kw, dtype) -> None:
    params, opt = run_trajectory(lambda ps: cls(ps, backend=backend, master_weights=True, **kw), SHAPES, dtype,
                                 base_lr=kw["lr"])
    for p in params:
        state = opt.state[p]
        assert state["master_param"].dtype == torch.float32
        assert all(state[k].dtype == torch.float32 for k in opt.buffer_names)
        assert torch.equal(p.detach(), state["master_param"].to(dtype))
    # the fp32 master run tracks an fp32 run far better than the rounding of a bf16/fp16 parameter would
    ref_params, _ = run_trajectory(lambda ps: cls(ps, backend="reference", **kw), SHAPES, torch.float32,
                                   base_lr=kw["lr"])
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(opt.state[p]["master_param"], r.detach(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("cls,kw", ALGOS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_state_dict_is_portable_across_backends_mid_run(cls, kw, dtype, master) -> None:
    """Save after 15 steps with one backend, load into a fresh optimizer with another, run 15 more:
    identical to 30 uninterrupted steps. Master weights survive the trip in fp32."""
    assert len(BACKENDS) >= 2, "reference and foreach run everywhere"
    first, second = BACKENDS[-1], BACKENDS[0]
    whole = run_trajectory(lambda ps: cls(ps, backend=first, master_weights=master, **kw), SHAPES, dtype, steps=30)
    half_params, half_opt = run_trajectory(lambda ps: cls(ps, backend=first, master_weights=master, **kw), SHAPES,
                                           dtype, steps=15)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in half_params], "opt": half_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params = [p.clone().requires_grad_(True) for p in saved["params"]]
    opt = cls(params, backend=second, master_weights=master, **kw)
    opt.load_state_dict(saved["opt"])
    assert opt.param_groups[0]["backend"] == second
    if master:
        for p, q in zip(params, half_params):
            assert opt.state[p]["master_param"].dtype == torch.float32
            assert torch.equal(opt.state[p]["master_param"], half_opt.state[q]["master_param"])
    for t in range(16, 31):
        for p, g in zip(params, synthetic_grads(params, t)):
            p.grad = g
        opt.step()
    assert_same_trajectory(whole, (params, opt), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", ALGOS)
def test_tensor_lr_equals_float_lr(backend, cls, kw) -> None:
    as_float = run_trajectory(lambda ps: cls(ps, backend=backend, **kw), SHAPES, base_lr=kw["lr"])
    as_tensor = run_trajectory(
        lambda ps: cls(ps, backend=backend, **{**kw, "lr": torch.tensor(kw["lr"])}, capturable=True),
        SHAPES, base_lr=kw["lr"],
    )
    assert_same_trajectory(as_float, as_tensor, torch.float32)


def test_per_group_overrides_apply() -> None:
    """A second group with its own options follows its own formulas (here: no decay, no adaptation)."""
    params = make_params([(5, 4), (4,)], torch.float32)
    opt = fastlars.LARS([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0, "momentum": 0.5,
                                                  "momentum_style": "torch"}], lr=0.5, weight_decay=1e-2)
    g = synthetic_grads(params, 1)
    for p, gi in zip(params, g):
        p.grad = gi
    before = params[1].detach().clone()
    opt.step()
    torch.testing.assert_close(params[1].detach(), before - 0.5 * g[1])  # ratio 1, v = g, w -= lr·v
    assert opt.state[params[1]]["momentum_buffer"].equal(g[1])


def test_steps_are_counted_per_parameter_and_params_without_grad_are_left_alone() -> None:
    params = make_params([(3,), (4,)], torch.float32)
    opt = fastlars.LAMB(params)
    params[0].grad = torch.ones(3)
    opt.step()
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 2 and params[1] not in opt.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls,kw", [*ALGOS, (fastlars.LAMB, {"lr": 0.01, "state_dtype": "int8",
                                                             "min_quantized_size": 16})],
                         ids=["lars", "lamb", "lamb-int8"])
def test_a_copied_optimizer_steps_as_the_original(backend, how, cls, kw) -> None:
    """copy.deepcopy / pickle of a stepped optimizer (as torch.optim supports): the copy owns copies of the
    params and state and, fed the same gradients, follows the original bit for bit without touching it;
    skipped-step count, per-parameter state formats, recorded ratios and host-path switches come along,
    defaults are unchanged, hooks and the ZeRO stats group do not (torch's rule; a process group cannot be
    copied)."""
    import pickle

    if backend == "foreach" and "state_dtype" in kw:
        pytest.skip("the foreach backend steps fp32 state only")
    params = make_params(SHAPES, torch.float32)
    opt = cls(params, backend=backend, **kw)
    opt.set_state_dtype(params[4], "fp32")
    opt.record_trust_ratios()
    opt.host_plan_enabled = False
    opt.register_step_pre_hook(lambda *_: None)
    for t in range(1, 4):
        for p, g in zip(params, synthetic_grads(params, t, scale=float("inf") if t == 2 else 1.0)):
            p.grad = g
        opt.step()
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twins = copied.param_groups[0]["params"]
    assert not any(a is b for a, b in zip(params, twins))
    assert copied.defaults == opt.defaults and copied.skipped_steps == opt.skipped_steps == 1
    assert copied.state_dtype_of(twins[4]) == "fp32" and copied.host_plan_enabled is False
    assert copied.trust_ratios is not None and not copied._optimizer_step_pre_hooks
    for t in range(4, 9):
        for p, q, g in zip(params, twins, synthetic_grads(params, t)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        copied.step()
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(params, twins))
    for a, b in zip(opt.state_dict()["state"].values(), copied.state_dict()["state"].values()):
        for key in a:
            assert a[key] == b[key] if isinstance(a[key], dict) else torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ skip_nonfinite=False
UNCLIPPED = [(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2}), (fastlars.LAMB, {"lr": 0.01, "weight_decay": 1e-2})]


def _unchecked(opt):
    opt.skip_nonfinite = False
    return opt


@pytest.mark.parametrize("backend,state_dtype", [(b, s) for b in BACKENDS for s in ("fp32", "int8")
                                                  if s == "fp32" or fastlars.backends.supports_low_precision_state(b)])
@pytest.mark.parametrize("cls,kw", UNCLIPPED)
def test_skip_nonfinite_off_steps_finite_gradients_to_the_same_bits(backend, state_dtype, cls, kw) -> None:
    """Without the gradient pass (LARS folding ||g|| into its ||w|| pass) the trajectory is the default one,
    bit for bit, over many steps and on the cached host path (int8 state on the backends that step it)."""

    def make(ps, unchecked):
        opt = cls(ps, backend=backend, state_dtype=state_dtype, min_quantized_size=256, **kw)
        return _unchecked(opt) if unchecked else opt

    checked = run_trajectory(lambda ps: make(ps, False), SHAPES, base_lr=kw["lr"], steps=12)
    unchecked = run_trajectory(lambda ps: make(ps, True), SHAPES, base_lr=kw["lr"], steps=12)
    for a, b in zip(checked[0], unchecked[0]):
        assert torch.equal(a, b)
    assert unchecked[1].skipped_steps == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", UNCLIPPED)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_skip_nonfinite_off_lets_a_non_finite_gradient_into_its_tensor_only(backend, cls, kw, bad) -> None:
    """The defined behaviour without the check: the step is not skipped; the tensor whose gradient holds the
    non-finite value gets non-finite weights (its norm, hence its trust ratio, is not finite), every other
    tensor takes exactly the step it takes beside a finite gradient there."""
    params, twins = make_params(SHAPES, torch.float32), make_params(SHAPES, torch.float32)
    opt = _unchecked(cls(params, backend=backend, **kw))
    twin = _unchecked(cls(twins, backend=backend, **kw))
    for t in (1, 2, 3):
        for ps in (params, twins):
            for p, g in zip(ps, synthetic_grads(ps, t)):
                p.grad = g
        if t == 3:
            params[4].grad[0, 0] = bad
        opt.step()
        twin.step()
    assert opt.skipped_steps == 0
    assert not torch.isfinite(params[4]).all()
    for i, (p, q) in enumerate(zip(params, twins)):
        if i != 4:
            assert torch.equal(p, q), f"params[{i}]"
    assert float(opt.state[params[4]]["step"]) == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", ALGOS)
def test_skip_nonfinite_off_still_skips_on_a_gradscaler_flag_and_where_norms_are_taken(backend, cls, kw) -> None:
    """A GradScaler's overflow skips the step as before; LAMB with max_grad_norm (ALGOS' LAMB) computes every
    ||g|| for its clip anyway and still skips on a non-finite one without a scaler."""
    params = make_params(SHAPES, torch.float32)
    opt = _unchecked(cls(params, backend=backend, **kw))
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))
    for p, g in zip(params, synthetic_grads(params, 1)):
        p.grad = g
    opt.step()
    snapshot = _snapshot(params, opt)
    for p, g in zip(params, synthetic_grads(params, 2)):
        p.grad = g
    params[3].grad[1, 2] = float("inf")
    scaler.step(opt)
    _assert_unchanged(params, opt, snapshot)
    assert opt.skipped_steps == 1
    opt.step()
    if "max_grad_norm" in kw:
        _assert_unchanged(params, opt, snapshot)
        assert opt.skipped_steps == 2
    else:
        assert opt.skipped_steps == 1 and not torch.isfinite(params[3]).all()


def test_skip_nonfinite_is_checked_and_kept_by_copies() -> None:
    opt = fastlars.LARS(make_params(SHAPES, torch.float32), lr=1.0)
    assert opt.skip_nonfinite is True
    with pytest.raises(TypeError, match="skip_nonfinite: expected True or False"):
        opt.skip_nonfinite = 0
    opt.skip_nonfinite = False
    assert copy.deepcopy(opt).skip_nonfinite is False
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).skip_nonfinite is False
