"""The large-batch learning-rate schedule, counted in optimizer updates (never micro-steps).

With peak LR η, T updates in all, W warmup updates (t = 1..T):
    η_t = η·t/W                                     for t ≤ W          (linear warmup, Goyal et al. 2017)
    η_t = η·(1 − (t − W − 1)/(T − W))^p             for t > W, "poly"   (You et al.; MLPerf LARS uses p = 2)
    η_t = η·½·(1 + cos(π·(t − W − 1)/(T − W)))     for t > W, "cosine"
    η_t = η·0.1^k                                    for t > W, "step": k = number of decay
                                                        milestones (in updates) already passed
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """η_t for t = 1..total; `milestones` are the step-decay points in updates."""

    peak_lr: float
    total: int
    warmup: int
    decay: str = "poly"
    poly_power: float = 2.0
    milestones: Sequence[int] = ()

    def __call__(self, t: int) -> float:
        if t <= self.warmup:
            return self.peak_lr * t / self.warmup
        progress = (t - self.warmup - 1) / max(1, self.total - self.warmup)
        if self.decay == "poly":
            return self.peak_lr * max(0.0, 1.0 - progress) ** self.poly_power
        if self.decay == "cosine":
            return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if self.decay == "step":
            return self.peak_lr * 0.1 ** sum(t > m for m in self.milestones)
        raise ValueError(f"--decay must be poly, cosine or step, got {self.decay!r}")


def total_updates(epochs: float, updates_per_epoch: int, max_steps: int | None) -> int:
    """T = ⌈epochs · updates_per_epoch⌉, capped by max_steps."""
    total = math.ceil(epochs * updates_per_epoch)
    return total if max_steps is None else min(total, max_steps)
