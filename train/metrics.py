"""Training metrics of the study: weight diffusion, the gradient noise scale, step-time shares, logs.

Weight diffusion (Hoffer et al. 2017): d_t = ‖w_t − w_0‖ over all parameters, fp32.

Gradient noise scale (McCandlish et al. 2018), the two-batch estimator: with |G_B|² the squared norm
of the mean gradient over a batch of B samples, for B_small < B_big
    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)
each smoothed by a bias-corrected exponential moving average, and B_simple = tr(Σ)/|G|².

Trust ratios (LARS, LAMB): the per-layer ratio r each update applied, as the optimizer's backend
computed it for the update (fastlars' record_trust_ratios; no second pass over the weights).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def squared_norm(tensors: Iterable[Tensor | None]) -> float:
    """Σ‖x‖² over the tensors (None skipped), accumulated in fp32; DTensor shards are summed globally."""
    total = None
    for x in tensors:
        if x is None:
            continue
        part = x.detach().float().pow(2).sum()
        if hasattr(part, "full_tensor"):
            part = part.full_tensor()
        total = part if total is None else total + part
    return 0.0 if total is None else float(total)


class WeightDiffusion:
    """d_t = ‖w_t − w_0‖ from fp32 copies of the parameters taken at construction."""

    def __init__(self, model: nn.Module) -> None:
        self.initial = [p.detach().float().clone() for p in model.parameters()]

    def distance(self, model: nn.Module) -> float:
        return math.sqrt(squared_norm(p.detach().float() - p0 for p, p0 in zip(model.parameters(), self.initial)))


class NoiseScale:
    """B_simple from (|G_small|², B_small, |G_big|², B_big) pairs, EMA with time constant `horizon`
    measurements (β = 1 − 1/horizon) and bias correction 1 − β^n."""

    def __init__(self, horizon: float = 100.0) -> None:
        self.beta = 1.0 - 1.0 / horizon
        self.ema_g2 = 0.0
        self.ema_trace = 0.0
        self.count = 0

    def update(self, g2_small: float, b_small: int, g2_big: float, b_big: int) -> None:
        if not b_big > b_small > 0:
            raise ValueError(f"need 0 < B_small < B_big, got {b_small}, {b_big}")
        g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
        trace = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
        self.ema_g2 = self.beta * self.ema_g2 + (1 - self.beta) * g2
        self.ema_trace = self.beta * self.ema_trace + (1 - self.beta) * trace
        self.count += 1

    @property
    def value(self) -> float | None:
        """B_simple, or None before the first measurement or while the |G|² estimate is not positive."""
        if self.count == 0 or self.ema_g2 <= 0:
            return None
        return self.ema_trace / self.ema_g2  # the bias corrections cancel

    def state_dict(self) -> dict[str, Any]:
        return {"ema_g2": self.ema_g2, "ema_trace": self.ema_trace, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_g2, self.ema_trace, self.count = state["ema_g2"], state["ema_trace"], state["count"]


class TrustRatios:
    """The last update's trust ratio of every adapting parameter of a fastlars LARS/LAMB optimizer, by
    parameter name (for rank 0's partition under ZeRO, whose local optimizer holds only it).
    `enabled` is False for other optimizers, which have no trust ratio."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        from fastlars.optim._base import TrustRatioOptimizer

        local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer wraps the rank's optimizer
        self.optimizer = local if isinstance(local, TrustRatioOptimizer) else None
        self.names: list[list[str] | None] = []
        if self.optimizer is None:
            return
        self.optimizer.record_trust_ratios()
        names = {id(p): name for name, p in model.named_parameters()}
        self.names = [[names.get(id(p), f"group{g}.{k}") for k, p in enumerate(group["params"])]
                      if self.optimizer.adapts(group) else None
                      for g, group in enumerate(self.optimizer.param_groups)]

    @property
    def enabled(self) -> bool:
        return self.optimizer is not None

    def values(self) -> dict[str, float]:
        """{parameter name: ratio} of the adapting parameters updated so far (reads the device)."""
        out: dict[str, float] = {}
        if self.optimizer is None:
            return out
        for names, ratios in zip(self.names, self.optimizer.trust_ratios or []):
            if names is None or ratios is None:
                continue
            for name, value in zip(names, ratios.tolist()):
                if math.isfinite(value):
                    out[name] = value
        return out


class Stopwatch:
    """Accumulated time between start() and stop(): host clock on CPU, CUDA events on a GPU (resolved
    lazily in `seconds`, so timing never adds a host synchronisation to the step)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.total = 0.0
        self._pending: list[tuple[Any, Any]] = []
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self.total += time.perf_counter() - self._start

    @property
    def seconds(self) -> float:
        if self._pending:
            self._pending[-1][1].synchronize()
            self.total += sum(a.elapsed_time(b) for a, b in self._pending) / 1000.0
            self._pending.clear()
        return self.total


class JsonlLog:
    """Append-only JSON-lines metrics log (rank 0 writes); `rewrite` restores it to a list of records
    (on resume, so the log holds exactly the records of the trajectory being continued)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
