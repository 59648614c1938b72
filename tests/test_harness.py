"""The test harness's own checks can fail: the tight state comparison catches a 1e-5 relative bias."""

from __future__ import annotations

import pytest
import torch

import fastlars
from harness import STATE_RTOL, assert_state_tight, run_trajectory


def _lamb_run():
    return run_trajectory(lambda ps: fastlars.LAMB(ps, lr=0.01, backend="reference"), steps=3, base_lr=0.01)


def test_state_tight_accepts_rounding_noise_and_fails_a_beta2_bias() -> None:
    a, b = _lamb_run(), _lamb_run()
    assert_state_tight(a, b)
    params, opt = b
    for p in params:  # one fp32 ulp (6e-8 relative) of noise on every element: still accepted
        v = opt.state[p]["exp_avg_sq"]
        v.copy_(torch.nextafter(v, torch.full_like(v, float("inf"))))
    assert_state_tight(a, b)
    big = max(params, key=lambda p: p.numel())
    v = opt.state[big]["exp_avg_sq"]
    v.mul_(1.0 - 1.3e-5)  # (1 − 0.999f) instead of 0.001: exp_avg_sq 1.3e-5 relative low
    with pytest.raises(AssertionError, match=r"state\['exp_avg_sq'\]: relative error"):
        assert_state_tight(a, b)
    assert STATE_RTOL <= 1e-5 / 5


def test_state_tight_tolerates_cancellation_but_not_an_offset() -> None:
    a, b = _lamb_run(), _lamb_run()
    params, opt = b
    k = max(range(len(params)), key=lambda i: params[i].numel())
    m = opt.state[params[k]]["exp_avg"]
    rms = m.square().mean().sqrt()
    m[0] = 0.0
    a[1].state[a[0][k]]["exp_avg"][0] = 1e-7 * rms  # near zero: within rtol·rms
    assert_state_tight(a, b)
    m[1] += 1e-4 * rms
    with pytest.raises(AssertionError, match="exp_avg"):
        assert_state_tight(a, b)
