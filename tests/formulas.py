"""design.md §2 written out again, independently of fastlars: NumPy, float64, one tensor at a time.

These functions share no code with fastlars' backends; tests compare every backend's trajectory
with them. Arrays are flat float64; norms are plain sqrt(sum(x²)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def norm(x: np.ndarray) -> float:
    return math.sqrt(float(np.sum(x * x)))


@dataclass
class LarsState:
    v: np.ndarray
    ratio: float = math.nan  # the trust ratio of the last step


@dataclass
class LambState:
    m: np.ndarray
    v: np.ndarray
    t: int = 0
    ratio: float = math.nan  # the trust ratio of the last step


def lars_update(w: np.ndarray, g: np.ndarray, s: LarsState, lr: float, o: dict) -> np.ndarray:
    """One LARS step; returns the new w and updates s.v in place."""
    lam, mu = o.get("weight_decay", 0.0), o.get("momentum", 0.9)
    eta, eps = o.get("trust_coefficient", 0.001), o.get("eps", 0.0)
    if o.get("maximize"):
        g = -g
    adapt = o.get("adapt")
    adapt = lam != 0 if adapt is None else adapt
    d = g + lam * w
    wn, gn = norm(w), norm(g)
    ratio = 1.0
    if adapt and wn > 0 and gn > 0:
        ratio = eta * wn / (gn + lam * wn + eps)
        if o.get("trust_clip"):
            ratio = min(ratio / lr, 1.0)
        bounds = o.get("trust_ratio_bounds")
        if bounds:
            ratio = min(max(ratio, bounds[0]), bounds[1])
    s.ratio = ratio
    if o.get("momentum_style", "mlperf") == "mlperf":
        s.v = mu * s.v + lr * ratio * d
        step = mu * s.v + lr * ratio * d if o.get("nesterov") else s.v
    else:
        s.v = mu * s.v + ratio * d
        step = lr * (mu * s.v + ratio * d) if o.get("nesterov") else lr * s.v
    return w - step


def lamb_update(w: np.ndarray, g: np.ndarray, s: LambState, lr: float, clip: float, o: dict) -> np.ndarray:
    """One LAMB step with global clip multiplier ``clip``; returns the new w, updates s."""
    b1, b2 = o.get("betas", (0.9, 0.999))
    eps, lam = o.get("eps", 1e-6), o.get("weight_decay", 0.01)
    if o.get("maximize"):
        g = -g
    g = g * clip
    s.t += 1
    s.m = b1 * s.m + ((1 - b1) if o.get("grad_averaging", True) else 1.0) * g
    s.v = b2 * s.v + (1 - b2) * g * g
    if o.get("bias_correction", True):
        m_hat, v_hat = s.m / (1 - b1**s.t), s.v / (1 - b2**s.t)
    else:
        m_hat, v_hat = s.m, s.v
    u = m_hat / (np.sqrt(v_hat) + eps)
    if lam != 0:
        if o.get("decoupled_decay"):
            w = w - lr * lam * w
        else:
            u = u + lam * w
    adapt = o.get("adapt")
    adapt = lam != 0 if adapt is None else adapt
    wn, un = norm(w), norm(u)
    ratio = 1.0
    if adapt and wn > 0 and un > 0:
        ratio = wn / un
        if o.get("trust_clip"):
            ratio = min(ratio, 1.0)
        bounds = o.get("trust_ratio_bounds")
        if bounds:
            ratio = min(max(ratio, bounds[0]), bounds[1])
    s.ratio = ratio
    return w - lr * ratio * u


def lamb_clip(grads: list[np.ndarray], max_grad_norm: float | None, maximize: bool = False) -> float:
    """Global clip multiplier: max / ||G|| when ||G|| > max, else 1."""
    if not max_grad_norm:
        return 1.0
    total = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    return max_grad_norm / total if total > max_grad_norm else 1.0
