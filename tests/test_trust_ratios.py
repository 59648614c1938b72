"""record_trust_ratios(): every backend hands back the per-tensor trust ratios its update applied.

The values themselves are checked against the float64 formulas for every option in test_formulas.py;
here: recording changes nothing else (bit for bit), skipped steps leave the record alone, params
without a gradient keep their place, bad outputs are refused by name, and the CUDA backends agree
with the reference (GPU only).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlars
from fastlars import functional
from harness import SHAPES, lr_at, make_params, run_trajectory, synthetic_grads

CPU_BACKENDS = [b for b in fastlars.available_backends("cpu") if b != "triton"]
ALGOS = [(fastlars.LARS, 2.0, {"weight_decay": 1e-2}), (fastlars.LAMB, 0.01, {"weight_decay": 1e-2})]
ALGO_IDS = ["lars", "lamb"]


def _groups(params):
    """Adapting weights and a group that does not adapt (ratio 1), as fastlars.param_groups makes."""
    return [{"params": params[2:]}, {"params": params[:2], "weight_decay": 0.0}]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls,base_lr,options", ALGOS, ids=ALGO_IDS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16+m"])
def test_recording_changes_nothing_else(backend, cls, base_lr, options, dtype, master) -> None:
    def make(record):
        def build(params):
            opt = cls(_groups(params), lr=base_lr, backend=backend, master_weights=master, **options)
            if record:
                opt.record_trust_ratios()
            return opt
        return build

    plain = run_trajectory(make(False), dtype=dtype, steps=4, base_lr=base_lr)
    recorded = run_trajectory(make(True), dtype=dtype, steps=4, base_lr=base_lr)
    for a, b in zip(plain[0], recorded[0]):
        assert torch.equal(a, b)
        for key, value in plain[1].state[a].items():
            assert torch.equal(value, recorded[1].state[b][key]), key
    assert plain[1].trust_ratios is None
    adapting, fixed = recorded[1].trust_ratios
    assert adapting.shape == (len(SHAPES) - 2,) and adapting.dtype == torch.float32
    assert torch.isfinite(adapting).all() and not torch.equal(adapting, torch.ones_like(adapting))
    assert torch.equal(fixed, torch.ones(2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls,base_lr,options", ALGOS, ids=ALGO_IDS)
def test_skipped_steps_leave_the_record(backend, cls, base_lr, options) -> None:
    """A NaN gradient and a GradScaler overflow skip the step, and the ratios stay those of the last
    step that was taken."""
    def poison(t, grads):
        if t == 3:
            grads[4].view(-1)[0] = math.nan

    _, skipped = run_trajectory(lambda p: _recording(cls(p, lr=base_lr, backend=backend, **options)), steps=3,
                                base_lr=base_lr, grad_hook=poison)
    assert skipped.skipped_steps == 1
    _, two = run_trajectory(lambda p: _recording(cls(p, lr=base_lr, backend=backend, **options)), steps=2,
                            base_lr=base_lr)
    assert torch.equal(skipped.trust_ratios[0], two.trust_ratios[0])

    params = make_params(SHAPES, torch.float32)
    opt = _recording(cls(params, lr=base_lr, backend=backend, **options))
    for p, g in zip(params, synthetic_grads(params, 1)):
        p.grad = g
    opt.step()
    before = opt.trust_ratios[0].clone()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # what GradScaler.step sets
    opt.step()
    assert torch.equal(opt.trust_ratios[0], before)


def _recording(opt):
    opt.record_trust_ratios()
    return opt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_params_without_a_gradient_keep_their_place(backend) -> None:
    params = make_params(SHAPES[:5], torch.float32)
    opt = _recording(fastlars.LARS(params, lr=1.0, weight_decay=1e-2, backend=backend))
    reference = _recording(fastlars.LARS([p.detach().clone().requires_grad_() for p in params], lr=1.0,
                                         weight_decay=1e-2, backend="reference"))
    grads = synthetic_grads(params, 1)
    for i in (1, 3, 4):
        params[i].grad = grads[i]
        reference.param_groups[0]["params"][i].grad = grads[i].clone()
    opt.step()
    reference.step()
    ratios = opt.trust_ratios[0]
    assert torch.isnan(ratios[[0, 2]]).all()  # never stepped
    torch.testing.assert_close(ratios[[1, 3, 4]], reference.trust_ratios[0][[1, 3, 4]], rtol=1e-6, atol=0)
    before = ratios.clone()
    params[1].grad = torch.full_like(grads[1], math.nan)  # skipped: every ratio stays, NaN or not
    opt.step()
    assert opt.skipped_steps == 1
    torch.testing.assert_close(opt.trust_ratios[0], before, equal_nan=True, rtol=0, atol=0)
    opt.record_trust_ratios(False)
    assert opt.trust_ratios is None


def test_bad_trust_ratio_outputs_are_refused_by_name() -> None:
    params = make_params(SHAPES[:3], torch.float32)
    grads = synthetic_grads(params, 1)
    buffers = [torch.zeros_like(p) for p in params]
    before = [p.detach().clone() for p in params]
    for bad in (torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.zeros(3, 2)[:, 0], [1.0, 1.0, 1.0]):
        with pytest.raises(ValueError, match=r"trust_ratios: expected a contiguous 1-D float32 tensor of 3 elements"):
            functional.lars_step(params, grads, buffers, lr=1.0, weight_decay=1e-2, trust_ratios=bad)
        with pytest.raises(ValueError, match=r"trust_ratios: expected"):
            functional.lamb_step(params, grads, buffers, [b.clone() for b in buffers], [torch.ones(())] * 3,
                                 trust_ratios=bad)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton", "foreach"])
@pytest.mark.parametrize("cls,base_lr,options", ALGOS, ids=ALGO_IDS)
def test_cuda_backends_record_the_reference_ratios(backend, cls, base_lr, options) -> None:
    if backend not in fastlars.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not built for CUDA here")

    def run(name, device):
        params = make_params(SHAPES, torch.float32, device=device)
        opt = _recording(cls(_groups(params), lr=base_lr, backend=name, **options))
        for t in range(1, 6):
            for group in opt.param_groups:
                group["lr"] = lr_at(t, base_lr)
            for p, g in zip(params, synthetic_grads(params, t)):
                p.grad = g
            opt.step()
        return [r.cpu() for r in opt.trust_ratios]

    expected, actual = run("reference", "cpu"), run(backend, "cuda")
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=0)
