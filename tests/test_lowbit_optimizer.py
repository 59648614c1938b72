"""fastlars.LAMB / LARS with low-precision state (state_dtype, min_quantized_size, set_state_dtype) and
stochastically rounded bf16 weights: each step on backend="reference" equals the quantisation-aware
reference called by hand (fastlars/backends/reference_lowbit.py) bit for bit (the native kernels against
it: tests/test_native_lowbit.py); which tensors get which format; backends that step
fp32 state only refuse it by name; the state_dict is self-describing, loads with weights_only=True,
resumes exactly and converts fp32 ↔ bf16 ↔ int8 both ways; a corrupt record is refused before any
change; skipped steps write nothing; the host plan never runs such groups."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fastlars
from fastlars.backends import quantization as q
from fastlars.backends import reference
from fastlars.backends import reference_lowbit as rl
from fastlars.backends._common import LambHyper, LarsHyper
from fastlars.optim._state_format import BUFFER_MAPS

SHAPES = [(1,), (255,), (256,), (257,), (4095,), (4096,), (4097,), (37, 301), (0,)]
STEPS = 6


@pytest.fixture(autouse=True)
def one_thread():
    """Per-tensor reference steps on small tensors: intra-op threads only add overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(dtype: torch.dtype = torch.float32, shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 0.5).to(dtype).requires_grad_(True) for s in shapes]


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=gen) + 0.3 * p.detach().float()).to(p.dtype) for p in params]


def _step(opt, params, step: int) -> None:
    for p, g in zip(params, _grads(params, step)):
        p.grad = g
    opt.step()


LAMB_KW = {"lr": 0.02, "weight_decay": 0.01}
LARS_KW = {"lr": 0.5, "weight_decay": 1e-3, "momentum": 0.9}


def _by_hand_lamb(params, dtype_of, steps: int, master: bool = False, rounding=None):
    """LAMB with reference_lowbit called directly on hand-made buffers (the spec's own trajectory)."""
    h = LambHyper(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True, grad_averaging=True,
                  decoupled_decay=False, trust_clip=False, adapt=True, trust_ratio_bounds=None, maximize=False)
    ms, vs = [], []
    for p in params:
        kind = dtype_of(p)
        full = torch.float32 if master else p.dtype
        if kind == "int8":
            ms.append(q.QuantizedBuffer.zeros_like(p, q.SIGNED_MAP))
            vs.append(q.QuantizedBuffer.zeros_like(p, q.UNSIGNED_MAP))
        else:
            want = torch.bfloat16 if kind == "bf16" else full
            ms.append(torch.zeros_like(p, dtype=want))
            vs.append(torch.zeros_like(p, dtype=want))
    masters = [p.detach().float().clone() for p in params] if master else None
    counts = [torch.zeros(()) for _ in params]
    for t in range(1, steps + 1):
        for c in counts:
            c += 1
        with torch.no_grad():
            rl.lamb_step([p.detach() for p in params], _grads(params, t), ms, vs, masters, counts, lr=0.02, h=h,
                         clip_coef=None, grad_scale=None, found_inf=torch.zeros(()), rounding=rounding)
    return ms, vs


def _assert_buffer_equal(state: dict, name: str, expected) -> None:
    if isinstance(expected, q.QuantizedBuffer):
        assert torch.equal(state[name], expected.codes), name
        assert torch.equal(state[name + q.ABSMAX_SUFFIX], expected.absmax), name
    else:
        assert state[name].dtype == expected.dtype and torch.equal(state[name], expected), name


@pytest.mark.parametrize("state_dtype", ["int8", "bf16"])
def test_lamb_steps_equal_the_reference_called_by_hand(state_dtype: str) -> None:
    params, twins = _params(), _params()
    opt = fastlars.LAMB(params, state_dtype=state_dtype, backend="reference", **LAMB_KW)
    for t in range(1, STEPS + 1):
        _step(opt, params, t)
    ms, vs = _by_hand_lamb(twins, lambda p: state_dtype if p.numel() >= q.MIN_QUANTIZED_SIZE else "fp32", STEPS)
    for p, twin, m, v in zip(params, twins, ms, vs):
        assert torch.equal(p.detach(), twin.detach())
        _assert_buffer_equal(opt.state[p], "exp_avg", m)
        _assert_buffer_equal(opt.state[p], "exp_avg_sq", v)
    assert any(isinstance(m, q.QuantizedBuffer) for m in ms) == (state_dtype == "int8")


def test_lars_int8_momentum_steps_equal_the_reference_called_by_hand() -> None:
    params, twins = _params(), _params()
    opt = fastlars.LARS(params, state_dtype="int8", min_quantized_size=256, backend="reference", **LARS_KW)
    for t in range(1, STEPS + 1):
        _step(opt, params, t)
    h = LarsHyper(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.001, eps=0.0, nesterov=False,
                  trust_clip=False, momentum_style="mlperf", adapt=True, trust_ratio_bounds=None, maximize=False)
    bufs = [q.QuantizedBuffer.zeros_like(p, q.SIGNED_MAP) if p.numel() >= 256 else torch.zeros_like(p)
            for p in twins]
    for t in range(1, STEPS + 1):
        grads = _grads(twins, t)
        with torch.no_grad():
            rl.lars_step([p.detach() for p in twins], grads, bufs, None, reference.grad_norms(grads, None),
                         lr=0.5, h=h, grad_scale=None, found_inf=torch.zeros(()))
    for p, twin, b in zip(params, twins, bufs):
        assert torch.equal(p.detach(), twin.detach())
        _assert_buffer_equal(opt.state[p], "momentum_buffer", b)
    assert opt.state_dtype_of(params[1]) == "fp32" and opt.state_dtype_of(params[2]) == "int8"


def test_which_tensors_get_which_format() -> None:
    big, small, bias = torch.zeros(64, 128), torch.zeros(100), torch.zeros(5000)
    opt = fastlars.LAMB([{"params": [big, small]}, {"params": [bias], "weight_decay": 0.0, "adapt": False}],
                        state_dtype="int8")
    assert [opt.state_dtype_of(p) for p in (big, small, bias)] == ["int8", "fp32", "fp32"]
    opt.set_state_dtype(small, "bf16")
    opt.set_state_dtype(bias, "int8")
    assert [opt.state_dtype_of(p) for p in (big, small, bias)] == ["int8", "bf16", "int8"]
    opt.set_state_dtype(small, None)
    assert opt.state_dtype_of(small) == "fp32"
    assert fastlars.LAMB([big], state_dtype="int8", min_quantized_size=10**6).state_dtype_of(big) == "fp32"
    with pytest.raises(ValueError, match="dtype: invalid value 'int4'"):
        opt.set_state_dtype(big, "int4")
    with pytest.raises(ValueError, match="param: not a parameter of this optimizer"):
        opt.set_state_dtype(torch.zeros(3), "int8")


def test_set_state_dtype_converts_existing_state() -> None:
    params = _params(shapes=[(300, 20)])
    opt = fastlars.LAMB(params, **LAMB_KW)
    for t in range(1, 4):
        _step(opt, params, t)
    fp32 = {k: opt.state[params[0]][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    opt.set_state_dtype(params[0], "int8")
    state = opt.state[params[0]]
    codes, absmax = q.quantize_blockwise(fp32["exp_avg"], q.SIGNED_MAP)
    assert torch.equal(state["exp_avg"], codes) and torch.equal(state["exp_avg_absmax"], absmax)
    assert state["state_format"]["dtype"] == "int8"
    opt.set_state_dtype(params[0], "fp32")
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(opt.state[params[0]]["exp_avg"], q.dequantize_blockwise(codes, absmax, q.SIGNED_MAP))
    _step(opt, params, 4)  # and it still steps


def test_backends_without_low_precision_state_refuse_it_by_name(monkeypatch) -> None:
    p = torch.zeros(5000, requires_grad=True)
    with pytest.raises(ValueError, match="backend='foreach' steps fp32 state only"):
        fastlars.LAMB([p], state_dtype="int8", backend="foreach")
    opt = fastlars.LARS([p], lr=0.1, backend="foreach")
    with pytest.raises(ValueError, match="backend='foreach' steps fp32 state only"):
        opt.set_state_dtype(p, "int8")
    assert opt.state_dtype_of(p) == "fp32"  # the refused override left nothing behind
    monkeypatch.setenv("FASTLARS_BACKEND", "foreach")
    opt = fastlars.LAMB([p], state_dtype="int8")
    # auto takes the first backend of the CPU's order that steps such state: native when built, else the reference
    native = fastlars.backends.low_precision_unavailable_reason("native", p.device) is None
    assert opt._backend_for(0, p.device) == ("native" if native else "reference")
    monkeypatch.delenv("FASTLARS_BACKEND")
    assert fastlars.backends.resolve_low_precision("auto", torch.device("cpu")) == ("native" if native else "reference")
    assert fastlars.backends.low_precision_unavailable_reason("native", torch.device("meta")) is not None


def test_state_dict_is_self_describing_loads_weights_only_and_resumes_exactly() -> None:
    params = _params()
    opt = fastlars.LAMB(params, state_dtype="int8", **LAMB_KW)
    for t in range(1, 4):
        _step(opt, params, t)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    record = saved["state"][5]["state_format"]
    assert record == {"version": 1, "dtype": "int8", "block_size": 256, "layout": "rows", "scale": "absmax_fp32",
                      "maps": {"exp_avg": "mitchell4_signed", "exp_avg_sq": "mitchell8_unsigned"}}
    assert "state_format" not in saved["state"][0]  # a 1-element tensor keeps fp32 state

    resumed_params = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = fastlars.LAMB(resumed_params, state_dtype="int8", **LAMB_KW)
    resumed.load_state_dict(saved)
    for t in range(4, 7):
        _step(opt, params, t)
        _step(resumed, resumed_params, t)
    for p, r in zip(params, resumed_params):
        assert torch.equal(p.detach(), r.detach())
        for key, value in opt.state[p].items():
            other = resumed.state[r][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


@pytest.mark.parametrize("saved_dtype,loaded_dtype", [("fp32", "int8"), ("int8", "fp32"), ("bf16", "int8"),
                                                      ("int8", "bf16"), ("fp32", "bf16")])
def test_checkpoints_convert_between_state_dtypes(saved_dtype: str, loaded_dtype: str) -> None:
    params = _params(shapes=[(40, 300)])
    opt = fastlars.LAMB(params, state_dtype=saved_dtype, **LAMB_KW)
    for t in range(1, 4):
        _step(opt, params, t)
    values = q.unpack_state(opt.state[params[0]], ("exp_avg", "exp_avg_sq"), q.CODE_MAPS)
    target = fastlars.LAMB([params[0].detach().clone()], state_dtype=loaded_dtype, **LAMB_KW)
    target.load_state_dict(opt.state_dict())
    state = target.state[target.param_groups[0]["params"][0]]
    assert target.param_groups[0]["state_dtype"] == loaded_dtype  # storage options stay the loader's
    expected = {"exp_avg": q.SIGNED_MAP, "exp_avg_sq": q.UNSIGNED_MAP}
    for name, code_map in expected.items():
        if loaded_dtype == "int8":
            codes, absmax = q.quantize_blockwise(values[name], code_map)
            assert torch.equal(state[name], codes) and torch.equal(state[name + "_absmax"], absmax)
        elif loaded_dtype == "bf16":
            assert torch.equal(state[name], values[name].to(torch.bfloat16))
        else:
            assert state[name].dtype == torch.float32 and torch.equal(state[name], values[name])  # decoding is exact
    assert torch.equal(state["step"], torch.tensor(3.0))


POWER_MAPS = {"exp_avg": q.POW4_SIGNED_MAP, "exp_avg_sq": q.POW8_UNSIGNED_MAP, "momentum_buffer": q.POW4_SIGNED_MAP}


@pytest.mark.parametrize("cls,kw,names", [(fastlars.LAMB, LAMB_KW, ("exp_avg", "exp_avg_sq")),
                                          (fastlars.LARS, LARS_KW, ("momentum_buffer",))])
def test_checkpoint_with_the_first_releases_power_maps_loads_converted(cls, kw, names) -> None:
    """int8 state saved by the first release (maps pow4_signed / pow8_unsigned) is decoded exactly with
    those maps and re-encoded once with the current ones on load; the run then goes on."""
    params = _params(shapes=[(40, 300), (5000,)])
    opt = cls(params, state_dtype="int8", **kw)
    for t in range(1, 4):
        _step(opt, params, t)
    sd = copy.deepcopy(opt.state_dict())
    saved_values = {}
    for index, entry in sd["state"].items():
        values = q.unpack_state(entry, names, q.CODE_MAPS)
        entry.update(q.pack_state(values, "int8", {n: POWER_MAPS[n] for n in names}))
        assert entry["state_format"]["maps"][names[0]] == POWER_MAPS[names[0]].name
        saved_values[index] = q.unpack_state(entry, names, q.CODE_MAPS)  # what the old format holds
    resumed_params = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = cls(resumed_params, state_dtype="int8", **kw)
    resumed.load_state_dict(sd)
    for index, p in enumerate(resumed_params):
        state = resumed.state[p]
        assert state["state_format"]["maps"] == {n: BUFFER_MAPS[n].name for n in names}
        for name in names:
            codes, absmax = q.quantize_blockwise(saved_values[index][name], BUFFER_MAPS[name])
            assert torch.equal(state[name], codes) and torch.equal(state[name + "_absmax"], absmax), name
    before = [p.detach().clone() for p in params]
    for t in range(4, 6):
        _step(resumed, resumed_params, t)
        _step(opt, params, t)
    for p, r, b in zip(params, resumed_params, before):  # one extra rounding of the state: close, not equal
        assert torch.isfinite(r).all()
        assert float((r - p).norm()) <= 0.05 * float((p - b).norm())


def test_checkpoint_from_before_the_options_loads() -> None:
    params = _params(shapes=[(5000,)])
    opt = fastlars.LARS(params, **LARS_KW)
    _step(opt, params, 1)
    sd = copy.deepcopy(opt.state_dict())
    for key in ("state_dtype", "min_quantized_size", "stochastic_rounding", "rounding_seed"):
        del sd["param_groups"][0][key]
    target = fastlars.LARS([params[0].detach().clone()], state_dtype="int8", rounding_seed=7, **LARS_KW)
    target.load_state_dict(sd)
    group = target.param_groups[0]
    assert (group["state_dtype"], group["rounding_seed"], group["stochastic_rounding"]) == ("int8", 7, False)
    assert target.state[group["params"][0]]["momentum_buffer"].dtype == torch.uint8


def _corrupt_int8(sd: dict, change) -> None:
    change(sd["state"][0])


@pytest.mark.parametrize("change,match", [
    (lambda e: e["state_format"].update(version=2), "unsupported record"),
    (lambda e: e["state_format"].update(dtype="int4"), "unknown dtype 'int4'"),
    (lambda e: e["state_format"]["maps"].update(exp_avg="dynamic_tree"), "code map 'dynamic_tree'"),
    (lambda e: e["state_format"].update(block_size=0), "block_size must be a positive int"),
    (lambda e: e.update(exp_avg=e["exp_avg"].float()), r"state\['exp_avg'\] .* must be uint8"),
    (lambda e: e.update(exp_avg_absmax=torch.zeros(1, 3)), r"state\['exp_avg_absmax'\] .* must be fp32 of shape"),
    (lambda e: e.pop("exp_avg_sq_absmax"), "has keys"),
    (lambda e: e.pop("state_format"), "has keys"),
])
def test_corrupt_low_precision_state_is_refused_and_nothing_changes(change, match) -> None:
    params = _params(shapes=[(5000,)])
    opt = fastlars.LAMB(params, state_dtype="int8", **LAMB_KW)
    _step(opt, params, 1)
    sd = copy.deepcopy(opt.state_dict())
    _corrupt_int8(sd, change)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for key, value in before["state"][0].items():
        assert torch.equal(after["state"][0][key], value) if torch.is_tensor(value) else after["state"][0][key] == value


@pytest.mark.parametrize("cls,kw", [(fastlars.LAMB, LAMB_KW), (fastlars.LARS, LARS_KW)], ids=["lamb", "lars"])
def test_non_finite_gradient_and_gradscaler_skip_write_nothing(cls, kw) -> None:
    params = _params(shapes=[(5000,), (300, 20)])
    opt = cls(params, state_dtype="int8", **kw)
    _step(opt, params, 1)
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(params, 2)):
        p.grad = g
    params[1].grad[3, 4] = float("nan")
    opt.step()
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)  # what GradScaler sets
    _step(opt, params, 3)
    del opt.grad_scale, opt.found_inf
    assert opt.skipped_steps == 2
    after = opt.state_dict()
    for pid, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][pid][key], value) if torch.is_tensor(value) else True
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, weights))
    _step(opt, params, 4)
    assert not torch.equal(params[0].detach(), weights[0])


@pytest.mark.parametrize("cls,kw", [(fastlars.LAMB, LAMB_KW), (fastlars.LARS, LARS_KW)], ids=["lamb", "lars"])
def test_trust_ratios_are_recorded_with_low_precision_state(cls, kw) -> None:
    params, twins = _params(shapes=[(5000,), (7,)]), _params(shapes=[(5000,), (7,)])
    opt = cls(params, state_dtype="int8", backend="reference", **kw)
    opt.record_trust_ratios()
    fp32 = cls(twins, backend="reference", **kw)
    fp32.record_trust_ratios()
    for t in range(1, 4):
        _step(opt, params, t)
        _step(fp32, twins, t)
    ratios = opt.trust_ratios[0]
    assert torch.isfinite(ratios).all() and ratios.shape == (2,)
    assert torch.allclose(ratios, fp32.trust_ratios[0], rtol=1e-2)  # int8 state moves the ratio by < 1%
    assert ratios[1] == fp32.trust_ratios[0][1]  # the small tensor keeps fp32 state: the same ratio


def test_stochastic_rounding_follows_the_spec_and_the_seed() -> None:
    shapes = [(4096,), (33, 129), (1,)]
    params, twins = _params(torch.bfloat16, shapes), _params(torch.bfloat16, shapes)
    opt = fastlars.LAMB(params, stochastic_rounding=True, rounding_seed=1234, backend="reference", **LAMB_KW)
    for t in range(1, 4):
        _step(opt, params, t)
    _by_hand_lamb(twins, lambda p: "fp32", 3, rounding=rl.StochasticRounding(1234, [0, 1, 2]))
    assert all(torch.equal(p.detach(), t.detach()) for p, t in zip(params, twins))
    nearest = _params(torch.bfloat16, shapes)
    plain = fastlars.LAMB(nearest, **LAMB_KW)
    for t in range(1, 4):
        _step(plain, nearest, t)
    assert not torch.equal(params[0].detach(), nearest[0].detach())
    assert opt.state_dict()["param_groups"][0]["rounding_seed"] == 1234


def test_stochastic_rounding_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"stochastic_rounding: .* master_weights=True"):
        fastlars.LAMB([torch.zeros(3, dtype=torch.bfloat16)], stochastic_rounding=True, master_weights=True)
    with pytest.raises(ValueError, match=r"params'\]\[0\].*stochastic_rounding rounds bfloat16"):
        fastlars.LARS([torch.zeros(3, dtype=torch.float16)], lr=0.1, stochastic_rounding=True)
    with pytest.raises(ValueError, match="rounding_seed"):
        fastlars.LAMB([torch.zeros(3)], rounding_seed=-1)
    with pytest.raises(ValueError, match="min_quantized_size"):
        fastlars.LAMB([torch.zeros(3)], min_quantized_size=-5)
    with pytest.raises(ValueError, match="state_dtype: invalid value 'fp8'"):
        fastlars.LAMB([torch.zeros(3)], state_dtype="fp8")


def test_bf16_params_with_fp32_masters_and_int8_state() -> None:
    params, twins = _params(torch.bfloat16), _params(torch.bfloat16)
    opt = fastlars.LAMB(params, state_dtype="int8", master_weights=True, backend="reference", **LAMB_KW)
    for t in range(1, 4):
        _step(opt, params, t)
    _by_hand_lamb(twins, lambda p: "int8" if p.numel() >= q.MIN_QUANTIZED_SIZE else "fp32", 3, master=True)
    assert all(torch.equal(p.detach(), t.detach()) for p, t in zip(params, twins))
    assert opt.state[params[5]]["master_param"].dtype == torch.float32


def test_set_state_dtype_drops_the_host_plan_and_the_next_plan_steps_the_new_format() -> None:
    if fastlars.backends.unavailable_reason("native", torch.device("cpu")) is not None:
        pytest.skip("the native CPU backend is not built")
    params = _params(shapes=[(5000,)])
    opt = fastlars.LAMB(params, **LAMB_KW)
    _step(opt, params, 1)
    assert opt._host_plan is not None
    opt.set_state_dtype(params[0], "int8")
    assert opt._host_plan is None
    _step(opt, params, 2)  # the Python step converts the state to int8
    # the group now steps on native's low-precision kernels, through a new plan (the reference, without a plan,
    # when those kernels are not built)
    native = fastlars.backends.low_precision_unavailable_reason("native", params[0].device) is None
    assert opt._backend_for(0, params[0].device) == ("native" if native else "reference")
    assert (opt._host_plan is not None) == native
    assert opt.state[params[0]]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("cls,kw", [(fastlars.LAMB, LAMB_KW), (fastlars.LARS, LARS_KW)], ids=["lamb", "lars"])
def test_empty_multi_dim_params_with_int8_state_step_on_every_backend(cls, kw) -> None:
    """A param without rows ((0, 5): rows of 5, no blocks stored) or without columns ((3, 0)) gets int8 state
    when min_quantized_size is 0; every backend that steps it (the native kernels and the cached host path
    included) agrees with the reference and keeps the block layout's scale shapes."""
    shapes = [(0, 5), (3, 0), (0, 2, 3, 3), (7, 301)]
    runs = {}
    for backend in ("reference", "native"):
        if backend == "native" and fastlars.backends.low_precision_unavailable_reason("native", torch.device("cpu")):
            continue
        params = _params(shapes=shapes)
        opt = cls(params, backend=backend, state_dtype="int8", min_quantized_size=0, **kw)
        for t in range(1, 4):
            _step(opt, params, t)
        name = opt.buffer_names[0]
        for p in params:
            assert opt.state[p][name].dtype == torch.uint8
            assert tuple(opt.state[p][name + "_absmax"].shape) == q.block_layout(p.shape).scale_shape
        runs[backend] = [p.detach().clone() for p in params]
    for a, b in zip(runs["reference"], runs.get("native", runs["reference"])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
