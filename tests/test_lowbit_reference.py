"""The quantisation-aware reference (fastlars/backends/reference_lowbit.py): equal to the fp32 reference
with fp32 buffers; LAMB's ||u|| is the norm of the update applied, computed from the stored state;
LARS stores the quantised momentum and moves the weights by the fp32 one; skipped steps write nothing;
special shapes and zero gradients; stochastic rounding of bf16 weights is deterministic and follows the
spec's bits; 200-step trajectories stay within measured bounds of fp32 LAMB/LARS."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.lowbit_trajectory import LAMB_HYPER, LARS_HYPER, structured_trajectory, trajectory_error
from fastlars.backends import quantization as q
from fastlars.backends import reference
from fastlars.backends import reference_lowbit as rl

SHAPES = [(1,), (255,), (256,), (257,), (4095,), (4096,), (4097,), (123, 457), (0,)]


@pytest.fixture(autouse=True)
def one_thread():
    """Per-tensor reference steps on tensors of 10^4–10^5 elements: intra-op threads only add overhead
    (and stall badly on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(shapes, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * 0.5).to(dtype) for s in shapes]


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=gen) + 0.3 * p.float()).to(p.dtype) for p in params]


def _int8(params, maps=(q.SIGNED_MAP, q.UNSIGNED_MAP)) -> tuple[list, list]:
    return ([q.QuantizedBuffer.zeros_like(p, maps[0]) for p in params],
            [q.QuantizedBuffer.zeros_like(p, maps[1]) for p in params])


LAMB_VARIANTS = [{}, {"decoupled_decay": True}, {"grad_averaging": False, "bias_correction": False},
                 {"maximize": True, "trust_clip": True, "trust_ratio_bounds": (0.1, 5.0)}]
LARS_VARIANTS = [{}, {"nesterov": True}, {"momentum_style": "torch"}, {"momentum_style": "torch", "nesterov": True,
                                                                        "maximize": True, "trust_clip": True}]


@pytest.mark.parametrize("variant", LAMB_VARIANTS, ids=str)
def test_lamb_with_fp32_buffers_equals_the_reference(variant: dict) -> None:
    h = dataclasses.replace(LAMB_HYPER, **variant)
    pa, pb = _params(SHAPES), _params(SHAPES)
    ma, va = [torch.zeros_like(p) for p in pa], [torch.zeros_like(p) for p in pa]
    mb, vb = [torch.zeros_like(p) for p in pb], [torch.zeros_like(p) for p in pb]
    steps = [torch.zeros(()) for _ in pa]
    scale, clip = torch.tensor(4.0), torch.tensor(0.5)
    for t in range(1, 4):
        for s in steps:
            s.add_(1)
        g = [x * 4.0 for x in _grads(pa, t)]
        reference.lamb_step(pa, g, ma, va, None, steps, lr=0.01, h=h, clip_coef=clip, grad_scale=scale,
                            found_inf=None)
        rl.lamb_step(pb, g, mb, vb, None, steps, lr=0.01, h=h, clip_coef=clip, grad_scale=scale, found_inf=None)
    for a, b in zip(pa + ma + va, pb + mb + vb):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", LARS_VARIANTS, ids=str)
def test_lars_with_fp32_buffers_equals_the_reference(variant: dict) -> None:
    h = dataclasses.replace(LARS_HYPER, **variant)
    pa, pb = _params(SHAPES), _params(SHAPES)
    ba, bb = [torch.zeros_like(p) for p in pa], [torch.zeros_like(p) for p in pb]
    for t in range(1, 4):
        g = _grads(pa, t)
        norms = reference.grad_norms(g, None)
        reference.lars_step(pa, g, ba, None, norms, lr=0.5 + t, h=h, grad_scale=None, found_inf=None)
        rl.lars_step(pb, g, bb, None, norms, lr=0.5 + t, h=h, grad_scale=None, found_inf=None)
    for a, b in zip(pa + ba, pb + bb):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decoupled", [False, True])
def test_lamb_ratio_is_the_norm_of_the_applied_update(decoupled: bool) -> None:
    """After an int8 step, the direction rebuilt from the STORED codes gives exactly the new weights
    and the returned trust ratio: ||u|| is the norm of the update applied."""
    h = dataclasses.replace(LAMB_HYPER, decoupled_decay=decoupled)
    params = _params([(64, 300), (4097,)])
    m, v = _int8(params)
    steps = [torch.zeros(()) for _ in params]
    for t in range(1, 6):
        for s in steps:
            s.add_(1)
        before = [p.clone() for p in params]
        ratios = rl.lamb_step(params, _grads(params, t), m, v, None, steps, lr=0.02, h=h, clip_coef=None,
                              grad_scale=None, found_inf=None)
        for i, w in enumerate(before):
            m_hat = m[i].dequantize() / (1.0 - h.beta1 ** steps[i])
            v_hat = v[i].dequantize() / (1.0 - h.beta2 ** steps[i])
            u = m_hat / (torch.sqrt(v_hat) + h.eps)
            if decoupled:
                w = w - 0.02 * h.weight_decay * w
            else:
                u = u + h.weight_decay * w
            ratio = reference.l2_norm(w) / reference.l2_norm(u)
            assert torch.equal(ratio, ratios[i])
            assert torch.equal(params[i], w - 0.02 * ratio * u)


def test_lars_stores_quantised_momentum_and_moves_by_the_fp32_one() -> None:
    h = LARS_HYPER
    params = _params([(64, 300)])
    buffers = [q.QuantizedBuffer.zeros_like(params[0], q.SIGNED_MAP)]
    for t in range(1, 4):
        w, old = params[0].clone(), buffers[0].dequantize()
        g = _grads(params, t)
        ratios = rl.lars_step(params, g, buffers, None, reference.grad_norms(g, None), lr=2.0, h=h,
                              grad_scale=None, found_inf=None)
        v_new = h.momentum * old + 2.0 * ratios[0] * (g[0] + h.weight_decay * w)
        assert torch.equal(params[0], w - v_new)
        codes, absmax = q.quantize_blockwise(v_new, q.SIGNED_MAP)
        assert torch.equal(buffers[0].codes, codes) and torch.equal(buffers[0].absmax, absmax)


@pytest.mark.parametrize("state", ["int8", "bf16"])
def test_skipped_step_writes_nothing(state: str) -> None:
    params = _params([(64, 300), (4097,), (7,)], dtype=torch.bfloat16)
    if state == "int8":
        m, v = _int8(params)
        mom = [q.QuantizedBuffer.zeros_like(p, q.SIGNED_MAP) for p in params]
    else:
        m, v, mom = ([torch.zeros_like(p, dtype=torch.bfloat16) for p in params] for _ in range(3))
    steps = [torch.ones(()) for _ in params]
    rounding = rl.StochasticRounding(seed=1, tensor_indices=[0, 1, 2])
    rl.lamb_step(params, _grads(params, 1), m, v, None, steps, lr=0.01, h=LAMB_HYPER, clip_coef=None,
                 grad_scale=None, found_inf=None, rounding=rounding)
    rl.lars_step(params, _grads(params, 1), mom, None, reference.grad_norms(_grads(params, 1), None), steps,
                 lr=1.0, h=LARS_HYPER, grad_scale=None, found_inf=None, rounding=rounding)

    def snapshot() -> list[torch.Tensor]:
        out = [p.clone() for p in params]
        for b in m + v + mom:
            out += [b.codes.clone(), b.absmax.clone()] if isinstance(b, q.QuantizedBuffer) else [b.clone()]
        return out

    before = snapshot()
    bad = _grads(params, 2)
    bad[1][5] = float("nan")
    flag = torch.ones(())
    rl.lamb_step(params, bad, m, v, None, steps, lr=0.01, h=LAMB_HYPER, clip_coef=None, grad_scale=None,
                 found_inf=flag, rounding=rounding)
    rl.lars_step(params, bad, mom, None, reference.grad_norms(bad, None), steps, lr=1.0, h=LARS_HYPER,
                 grad_scale=None, found_inf=flag, rounding=rounding)
    for a, b in zip(before, snapshot()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 4095, 4096, 4097], ids=str)
def test_int8_steps_on_every_size(n: int) -> None:
    """One-row tensors of every ragged size (int8 forced below min_quantized_size), a large odd matrix
    and an empty one take 20 finite LAMB and LARS steps with trust ratios within 3% of fp32's."""
    shapes = [(1, n), (123, 457), (0, 5)]
    for algorithm in ("lamb", "lars"):
        ref = structured_trajectory(algorithm, "fp32", steps=20, shapes=shapes)
        run = structured_trajectory(algorithm, "int8", steps=20, shapes=shapes, min_quantized_size=0)
        assert all(torch.isfinite(p).all() for p in run.params)
        assert all(isinstance(b, q.QuantizedBuffer) for buffers in run.buffers for b in buffers)
        ratios, ref_ratios = torch.stack(run.ratios)[:, :2], torch.stack(ref.ratios)[:, :2]
        assert float(((ratios - ref_ratios).abs() / ref_ratios).max()) < 0.03, algorithm


def test_zero_gradients_keep_zero_state() -> None:
    """Zero gradients leave int8 moments at code 0 with scale 0; LAMB then moves w only by decay."""
    params = _params([(64, 300)])
    m, v = _int8(params)
    w = params[0].clone()
    rl.lamb_step(params, [torch.zeros_like(params[0])], m, v, None, [torch.ones(())], lr=0.1, h=LAMB_HYPER,
                 clip_coef=None, grad_scale=None, found_inf=None)
    assert (m[0].codes == 0).all() and (m[0].absmax == 0).all() and (v[0].absmax == 0).all()
    u = LAMB_HYPER.weight_decay * w
    assert torch.equal(params[0], w - 0.1 * (reference.l2_norm(w) / reference.l2_norm(u)) * u)


def test_stochastic_rounding_of_bf16_weights() -> None:
    """bf16 weights without masters: each update is the spec's stochastic rounding of the fp32 result
    (deterministic, keyed by seed, tensor index and step), not the nearest-even rounding."""
    params = _params([(64, 300), (4097,)], dtype=torch.bfloat16)
    exact = [p.float() for p in params]
    g = _grads(params, 1)
    steps = [torch.full((), 5.0) for _ in params]
    rounding = rl.StochasticRounding(seed=42, tensor_indices=[3, 9])
    for weights, sr in ((params, rounding), (exact, None)):
        m, v = [torch.zeros_like(p, dtype=torch.float32) for p in params], [torch.zeros(p.shape) for p in params]
        rl.lamb_step(weights, g, m, v, None, steps, lr=0.05, h=LAMB_HYPER, clip_coef=None, grad_scale=None,
                     found_inf=None, rounding=sr)
    for i, (p, w) in enumerate(zip(params, exact)):
        key = q.sr_key(q.sr_tensor_key(42, rounding.tensor_indices[i], q.STREAM_PARAM), steps[i])
        want = q.stochastic_round_bf16(w, q.sr_bits(key, q.element_indices(w)))
        assert torch.equal(p.view(torch.int16), want.view(torch.int16))
        assert 0.05 < float((p != w.to(torch.bfloat16)).float().mean()) < 0.95
    with pytest.raises(ValueError, match="steps"):
        rl.lars_step(params, g, [torch.zeros(p.shape) for p in params], None, reference.grad_norms(g, None),
                     lr=1.0, h=LARS_HYPER, grad_scale=None, found_inf=None, rounding=rounding)


# Measured on the structured 200-step problem (python -m benchmarks.codemaps --only accuracy prints the
# same numbers): LAMB int8 3.5e-2 / 5.8e-3, bf16 3.4e-3 / 2.0e-3; LARS int8 4.3e-3 / 6.8e-4, bf16
# 5.5e-4 / 1.5e-4 (largest ||Δp||/||p|| over tensors / largest trust-ratio error over steps). The
# bounds leave about 1.5× headroom; trust ratios stay within the 1%.
TRAJECTORY_BOUNDS = {
    ("lamb", "int8"): {"param_norm_rel": 0.05, "ratio_max_rel": 0.01},
    ("lamb", "bf16"): {"param_norm_rel": 0.005, "ratio_max_rel": 0.003},
    ("lars", "int8"): {"param_norm_rel": 0.0065, "ratio_max_rel": 0.001},
    ("lars", "bf16"): {"param_norm_rel": 0.0008, "ratio_max_rel": 0.00025},
}


@pytest.mark.parametrize(("algorithm", "state"), list(TRAJECTORY_BOUNDS), ids=str)
def test_trajectory_against_fp32(algorithm: str, state: str) -> None:
    ref = structured_trajectory(algorithm, "fp32")
    err = trajectory_error(structured_trajectory(algorithm, state), ref)
    for field, bound in TRAJECTORY_BOUNDS[(algorithm, state)].items():
        assert getattr(err, field) <= bound, (field, err)
