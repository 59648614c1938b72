"""The Triton low-precision kernels (fastlars/backends/triton/lowbit.py) on CPU tensors under the Triton
interpreter, against THE spec, the quantisation-aware reference (fastlars/backends/reference_lowbit.py).

Needs TRITON_INTERPRET=1 before triton is imported, so the main suite runs it in a subprocess
(tests/test_triton_lowbit.py::test_interpreted_lowbit_suite) and skips it, with that reason, elsewhere.

The comparison machinery is the native kernels' (tests/test_native_lowbit.py: Side, run_pair, the one-step
oracle check_one_step every 10th step, TRAJECTORY_TOLERANCES): codes equal but for rounding ties (≤ 1e-4
of the elements, one code), LAMB scales within 1 ulp, LARS scales and every trust ratio within 1e-5
relative, weights within 1e-6 of each tensor's largest per step. The interpreter pays ~10 ms per program,
so only the fp32-parameter trajectories take 200 steps (on the issue's small shapes, ~60 s of the file's
~100 s on a 2-core EPYC); bf16 parameters (masters, stochastic rounding) take 20, the large odd tensors 4.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in its own process with TRITON_INTERPRET=1 "
                "(test_triton_lowbit.py::test_interpreted_lowbit_suite)", allow_module_level=True)

import test_native_lowbit as nl

import fastlars
from fastlars import backends
from fastlars.backends import quantization as q
from fastlars.backends import reference
from fastlars.backends import reference_lowbit as rl
from fastlars.backends._common import LambHyper, LarsHyper
from fastlars.backends.triton import lowbit

SHAPES = [(1,), (255,), (256,), (257,), (4095,), (4096,), (4097,), (3, 300), (2, 3, 5, 37), (0,)]
"""The issue's shapes, multi-row 2-D and 4-D tensors (ragged blocks at every row end) and an empty one;
nl.MIXED keeps tensor 1 in fp32 and tensor 4 in bf16 state, so every call mixes formats."""
LARGE_ODD = [(131, 1031), (7, 3, 11, 13)]
"""131 rows of 1,031 (four full blocks and one of 7 per row: 655 blocks, 21 programs of 32 blocks under the
interpreter) and a 4-D odd one."""
STEPS = 200
ALGOS = {"lamb": (nl.LAMB_H, 0.02), "lars": (nl.LARS_H, 0.5)}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rounding(n: int, seed: int = 1234) -> rl.StochasticRounding:
    return rl.StochasticRounding(seed=seed, tensor_indices=list(range(3, 3 + n)))


def test_auto_picks_nothing_new_on_the_cpu_but_triton_is_usable() -> None:
    assert backends.low_precision_unavailable_reason("triton", torch.device("cpu")) is None
    assert backends.resolve_low_precision("triton", torch.device("cpu")) == "triton"
    assert backends.load_low_precision("triton") is lowbit


# ------------------------------------------------------------------------------ trajectories
@pytest.mark.parametrize("algo", list(ALGOS))
def test_fp32_params_follow_the_reference_for_200_steps(algo: str) -> None:
    h, lr = ALGOS[algo]
    _, _, worst = nl.run_pair(algo, SHAPES, torch.float32, False, STEPS, h, lr, module=lowbit)
    nl._assert_trajectory(algo, worst)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_bf16_params_with_fp32_masters_follow_the_reference(algo: str) -> None:
    h, lr = ALGOS[algo]
    _, tri, worst = nl.run_pair(algo, SHAPES, torch.bfloat16, True, 20, h, lr, module=lowbit)
    nl._assert_trajectory(algo, worst)
    for p, m in zip(tri.params, tri.masters):  # each param is its master rounded to nearest
        assert torch.equal(p, m.to(torch.bfloat16))


@pytest.mark.parametrize("algo", list(ALGOS))
def test_bf16_params_with_stochastic_rounding_follow_the_reference(algo: str) -> None:
    h, lr = ALGOS[algo]
    ref, tri, worst = nl.run_pair(algo, SHAPES, torch.bfloat16, False, 20, h, lr, rounding=_rounding(len(SHAPES)),
                                  module=lowbit)
    nl._assert_trajectory(algo, worst)
    assert nl._rel_error(ref, tri) <= 2e-2


@pytest.mark.parametrize("algo", list(ALGOS))
def test_stochastic_rounding_is_bit_identical_where_the_ratio_is_one(algo: str, monkeypatch) -> None:
    """Without adaptation no norm enters the update: every element's arithmetic is the reference's, so the
    stochastically rounded bf16 weights (element indices offset as shards are, across 2^32), the int8 codes
    and scales and the bf16 state are the same bits.

    The reference's LAMB takes √v̂ with torch.sqrt, whose vectorised fp32 CPU kernel is one ulp off on about
    a fifth of the values (quantization.sqrt_rn's docstring); the kernels' √ is IEEE. A one-ulp different
    w_new flips a stochastic rounding with probability 2^-16, so here the reference's √ is made IEEE."""
    real_sqrt = torch.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda x: real_sqrt(x.double()).float() if x.dtype == torch.float32
                        else real_sqrt(x))
    h, lr = ALGOS[algo]
    h = type(h)(**{**h.__dict__, "adapt": False})
    ref = nl.Side(rl, algo, SHAPES, torch.bfloat16, False, nl.MIXED)
    tri = nl.Side(lowbit, algo, SHAPES, torch.bfloat16, False, nl.MIXED)
    # shard offsets, some crossing 2^32 within the tensor: the bits' hi32(i) changes there
    offsets = [k * (2**32 - 300) for k in range(len(SHAPES))]
    rounding = rl.StochasticRounding(seed=99, tensor_indices=list(range(len(SHAPES))), index_offsets=offsets)
    for t in range(1, 31):
        step_lr = lr * (1.0 + 0.5 * math.sin(0.7 * t))
        ref.step(t, step_lr, h, rounding)
        tri.step(t, step_lr, h, rounding)
        for a, b in zip(ref.snapshot(), tri.snapshot()):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), t


@pytest.mark.parametrize("algo", list(ALGOS))
def test_large_odd_tensors(algo: str) -> None:
    h, lr = ALGOS[algo]
    _, _, worst = nl.run_pair(algo, LARGE_ODD, torch.float32, False, 4, h, lr, kinds={}, module=lowbit)
    nl._assert_trajectory(algo, worst)


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_one_state_format_throughout(kind: str) -> None:
    for algo, (h, lr) in ALGOS.items():
        kinds = dict.fromkeys(range(len(SHAPES)), kind)
        _, _, worst = nl.run_pair(algo, SHAPES, torch.float32, False, 10, h, lr, kinds=kinds, module=lowbit)
        nl._assert_trajectory(algo, worst)


def test_zero_gradients() -> None:
    _, tri, worst = nl.run_pair("lamb", SHAPES, torch.float32, False, 3, nl.LAMB_H, 0.02, zero=True, module=lowbit)
    for bufs in tri.buffers:
        for b in bufs:
            if isinstance(b, q.QuantizedBuffer):
                assert not b.codes.any() and not b.absmax.any()  # blocks of zeros: code 0, scale 0
    nl._assert_trajectory("lamb", worst)
    _, _, worst = nl.run_pair("lars", SHAPES, torch.float32, False, 3, nl.LARS_H, 0.5, zero=True, module=lowbit)
    nl._assert_trajectory("lars", worst)


# ------------------------------------------------------------------------------------ options
OPTION_SHAPES = [(1,), (257,), (4097,), (33, 300), (0,)]
LAMB_OPTIONS = [
    {"decoupled_decay": True, "bias_correction": False, "maximize": True},
    {"grad_averaging": False, "trust_clip": True, "trust_ratio_bounds": (0.5, 2.0)},
    {"adapt": False},
    {"weight_decay": 0.0, "eps": 0.0},
]
LARS_OPTIONS = [
    {"nesterov": True, "maximize": True},
    {"momentum_style": "torch", "nesterov": True, "trust_ratio_bounds": (0.01, 0.5)},
    {"momentum_style": "torch", "trust_clip": True},
    {"adapt": False},
]


@pytest.mark.parametrize("option", LAMB_OPTIONS, ids=str)
def test_lamb_options(option: dict) -> None:
    h = LambHyper(**{**nl.LAMB_H.__dict__, **option})
    _, _, worst = nl.run_pair("lamb", OPTION_SHAPES, torch.float32, False, 10, h, 0.02, module=lowbit)
    nl._assert_trajectory("lamb", worst)


@pytest.mark.parametrize("option", LARS_OPTIONS, ids=str)
def test_lars_options(option: dict) -> None:
    h = LarsHyper(**{**nl.LARS_H.__dict__, **option})
    _, _, worst = nl.run_pair("lars", OPTION_SHAPES, torch.float32, False, 10, h, 0.5, grad_scale=torch.tensor(8.0),
                              module=lowbit)
    nl._assert_trajectory("lars", worst)


def test_lamb_clip_grad_scale_and_tensor_lr() -> None:
    _, _, worst = nl.run_pair("lamb", OPTION_SHAPES, torch.float32, False, 10, nl.LAMB_H, 0.02,
                              clip_coef=torch.tensor(0.37), grad_scale=torch.tensor(1024.0), module=lowbit)
    nl._assert_trajectory("lamb", worst)
    h = LambHyper(**{**nl.LAMB_H.__dict__, "decoupled_decay": True})
    ref = nl.Side(rl, "lamb", OPTION_SHAPES, torch.float32, False, nl.MIXED)
    tri = nl.Side(lowbit, "lamb", OPTION_SHAPES, torch.float32, False, nl.MIXED)
    for t in range(1, 6):
        lr = torch.tensor(0.02 * t)
        r_ref, r_tri = ref.step(t, lr, h), tri.step(t, lr, h)
        torch.testing.assert_close(r_tri, r_ref, rtol=1e-5, atol=0)
    for a, b in zip(ref.weights, tri.weights):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * float(a.abs().max()) if a.numel() else 0)


def test_channels_last_params_block_along_memory_rows() -> None:
    shapes = [(16, 24, 3, 3), (40, 8, 5, 5)]
    for algo, (h, lr) in ALGOS.items():
        sides = [nl.Side(m, algo, shapes, torch.float32, False, {}) for m in (rl, lowbit)]
        for side in sides:
            side.params = [p.contiguous(memory_format=torch.channels_last) for p in side.params]
            side.buffers = [[q.QuantizedBuffer.zeros_like(p, b.code_map) for p, b in zip(side.params, bufs)]
                            for bufs in side.buffers]
        for t in range(1, 4):
            for side in sides:
                side.step(t, lr, h)
        worst = nl.compare_state(*sides)
        assert worst["code_fraction"] <= 1e-4 and worst["code_max"] <= 1 and worst["scale_rel"] <= 1e-5, worst
        nl.check_one_step(sides[1], 4, lr, h, None)


def test_deterministic() -> None:
    runs = []
    for _ in range(2):
        side = nl.Side(lowbit, "lamb", OPTION_SHAPES, torch.float32, False, nl.MIXED)
        ratios = [side.step(t, 0.02, nl.LAMB_H) for t in range(1, 4)]
        runs.append((side.snapshot(), ratios))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------- skipped steps
@pytest.mark.parametrize("algo", list(ALGOS))
def test_found_inf_writes_nothing(algo: str) -> None:
    """A GradScaler overflow (found_inf = 1, a NaN in the gradients) writes no code, scale, state, weight
    or ratio."""
    h, lr = ALGOS[algo]
    rounding = rl.StochasticRounding(seed=7, tensor_indices=list(range(len(OPTION_SHAPES))))
    tri = nl.Side(lowbit, algo, OPTION_SHAPES, torch.bfloat16, False, {0: "fp32", 2: "bf16"})
    for t in range(1, 3):
        tri.step(t, lr, h, rounding)
    before = tri.snapshot()
    ratios = torch.full((len(OPTION_SHAPES),), -1.0)
    grads = nl._grads(tri.weights, 3)
    grads[3][0, 0] = float("nan")
    grads[2][5] = float("inf")
    kw = dict(lr=lr, h=h, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0), rounding=rounding,
              trust_ratios=ratios)
    if algo == "lamb":
        lowbit.lamb_step(tri.params, grads, *tri.buffers, None, tri.steps, clip_coef=None, **kw)
    else:
        lowbit.lars_step(tri.params, grads, tri.buffers[0], None, reference.grad_norms(grads, None), tri.steps, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, tri.snapshot()))
    assert (ratios == -1.0).all()


def test_empty_lists_and_empty_tensors() -> None:
    assert lowbit.lamb_step([], [], [], [], None, [], lr=0.1, h=nl.LAMB_H, clip_coef=None, grad_scale=None,
                            found_inf=None).numel() == 0
    assert lowbit.lars_step([], [], [], None, torch.zeros(0), lr=0.1, h=nl.LARS_H, grad_scale=None,
                            found_inf=None).numel() == 0
    for algo, (h, lr) in ALGOS.items():
        side = nl.Side(lowbit, algo, [(0,), (0, 5), (5, 0)], torch.float32, False, {})
        ratios = side.step(1, lr, h)
        assert torch.equal(ratios, torch.ones(3))


# ------------------------------------------------------------------------------------ errors
def test_bad_input_raises_before_writing() -> None:
    side = nl.Side(lowbit, "lamb", [(300,), (4097,)], torch.float32, False, {})
    side.step(1, 0.02, nl.LAMB_H)
    before = side.snapshot()
    grads = nl._grads(side.weights, 2)
    m, v = side.buffers
    wrong_map = [q.QuantizedBuffer(m[0].codes, m[0].absmax, q.UNSIGNED_MAP), m[1]]
    wrong_scale = [m[0], q.QuantizedBuffer(m[1].codes, m[1].absmax, q.SIGNED_MAP)]
    wrong_scale[1].absmax = torch.zeros(1, 3)
    cases = [
        (dict(exp_avgs=wrong_map), r"exp_avgs\[0\].*mitchell4_signed"),
        (dict(exp_avgs=wrong_scale), r"exp_avgs\[1\]: absmax"),
        (dict(grads=grads[:1]), r"grads: holds 1"),
        (dict(steps=side.steps[:1]), r"steps: holds 1"),
        (dict(grads=[grads[0], grads[1].double()]), r"grads\[1\]"),
    ]
    for change, message in cases:
        args = dict(params=side.params, grads=grads, exp_avgs=m, exp_avg_sqs=v, master_params=None, steps=side.steps)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            lowbit.lamb_step(**args, lr=0.02, h=nl.LAMB_H, clip_coef=None, grad_scale=None, found_inf=None)
    transposed = torch.randn(300, 20).t()  # dense, but not in storage order: int8 blocks refuse it
    codes = q.QuantizedBuffer.zeros_like(transposed, q.SIGNED_MAP)
    with pytest.raises(ValueError, match=r"params\[0\]: strides"):
        lowbit.lars_step([transposed], [torch.zeros_like(transposed)], [codes], None, torch.ones(1), lr=0.5,
                         h=nl.LARS_H, grad_scale=None, found_inf=None)
    with pytest.raises(ValueError, match="grad_norms"):
        lowbit.lars_step(side.params, grads, m, None, torch.zeros(1), lr=0.5, h=nl.LARS_H, grad_scale=None,
                         found_inf=None)
    assert all(torch.equal(a, b) for a, b in zip(before, side.snapshot()))


# ------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("cls,kw", [(fastlars.LAMB, {"lr": 0.02, "weight_decay": 0.01}),
                                    (fastlars.LARS, {"lr": 0.5, "weight_decay": 1e-3, "momentum": 0.9})],
                         ids=["lamb", "lars"])
def test_optimizer_classes_step_triton_int8_like_the_reference(cls, kw) -> None:
    shapes = [(5000,), (300, 20), (7,)]
    runs = {}
    for backend in ("triton", "reference"):
        params = [p.requires_grad_(True) for p in nl._params(shapes, torch.float32)]
        opt = cls(params, state_dtype="int8", backend=backend, **kw)
        assert opt._backend_for(0, params[0].device) == backend
        for t in range(1, 5):
            for p, g in zip(params, nl._grads([p.detach() for p in params], t, follow=True)):
                p.grad = g
            opt.step()
        runs[backend] = [p.detach().clone() for p in params]
    for a, b in zip(runs["reference"], runs["triton"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * float(a.abs().max()))


def test_any_dense_layout_with_full_precision_state() -> None:
    """Tensors without int8 buffers or stochastic rounding are stepped in memory order whatever their layout."""
    for algo, (h, lr) in ALGOS.items():
        sides = [nl.Side(m, algo, [(300, 20)], torch.float32, False, {0: "bf16"}) for m in (rl, lowbit)]
        for side in sides:
            side.params = [p.t() for p in side.params]
            side.buffers = [[b.t() for b in bufs] for bufs in side.buffers]
        for t in range(1, 3):
            r_ref, r_tri = (side.step(t, lr, h) for side in sides)
            torch.testing.assert_close(r_tri, r_ref, rtol=1e-5, atol=0)
        worst = nl.compare_state(*sides)
        assert worst["full_rel"] <= 1e-2, worst  # bf16 state: one bf16 ulp at most
        torch.testing.assert_close(sides[1].params[0], sides[0].params[0], rtol=0, atol=1e-6)


def test_tiny_gradients_flush_subnormal_blocks_like_the_reference() -> None:
    """Gradients from 1e-18 down to 1e-30: v = (1−β2)·g² reaches subnormal block maxima (stored as scale 0,
    codes 0) and blocks mix normal with subnormal elements; both sides store the same codes and scales."""
    shapes = [(4097,), (3, 300), (600,), (257,)]
    sides = [nl.Side(m, "lamb", shapes, torch.float32, False, {}) for m in (rl, lowbit)]
    for t in range(1, 4):
        grads = nl._grads(sides[0].weights, t)
        grads = [g * 10.0 ** (-18 - 4 * k) for k, g in enumerate(grads)]
        grads[3][::7] *= 1e-9  # m: subnormal elements (1e-40) in blocks with a normal maximum (1e-31)
        ratios = []
        for side in sides:
            for s in side.steps:
                s += 1
            ratios.append(side.module.lamb_step(side.params, [g.clone() for g in grads], *side.buffers, None,
                                                side.steps, lr=0.02, h=nl.LAMB_H, clip_coef=None, grad_scale=None,
                                                found_inf=None))
        torch.testing.assert_close(ratios[1], ratios[0], rtol=1e-5, atol=0)
    worst = nl.compare_state(*sides)
    assert worst["code_fraction"] <= 1e-4 and worst["code_max"] <= 1 and worst["scale_ulps"] <= 1, worst
    v_scales = torch.cat([b.absmax.flatten() for b in sides[1].buffers[1]])
    assert (v_scales == 0).any() and (v_scales > 0).any()  # flushed blocks and normal ones
