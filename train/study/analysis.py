"""What a sweep shows, computed from its run records (the dicts `sweep.execute` returns).

Every statement of the generated summary comes from one of these functions:
- `best_cells`: per (optimizer, batch) under the fixed-epoch budget, the run with the best final
  top-1 over the LR search (Nado et al. 2021);
- `holding`: how far each optimizer holds its accuracy — the largest batch B such that every batch
  from the optimizer's peak batch up to B reaches top-1 ≥ peak − tolerance;
- `target_scaling`: steps to the target accuracy S(B) against perfect scaling S(B₀)·B₀/B from the
  smallest batch B₀ that reached the target (Shallue et al. 2018), with efficiency S_perfect/S;
- `diffusion`: ‖w_t − w_0‖ curves per batch for both budgets with least-squares fits after the
  warmup of d = a + b·ln t (Hoffer et al.'s logarithmic "ultra-slow diffusion") and ln d = c + p·ln t;
- `noise_scale`: the EMA-smoothed B_simple = tr(Σ)/|G|² each run logged, late in training
  (McCandlish et al. 2018), as the predicted critical batch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Cell:
    """The best-LR run of one optimizer at one global batch (fixed-epoch budget)."""

    optimizer: str
    batch: int
    lr: float
    lr_factor: float
    lr_at_edge: bool
    lr_edge: str
    runs: int
    top1: float
    top5: float
    steps: int
    steps_to_target: int | None
    wall_time_s: float
    images_per_s: float
    optimizer_share: float
    key: str


def epoch_records(records: Iterable[Record]) -> list[Record]:
    """The fixed-epoch runs."""
    return [r for r in records if r["budget"] == "epochs"]


def best_cells(records: Iterable[Record]) -> list[Cell]:
    """One Cell per (optimizer, batch) of the fixed-epoch runs: the run with the highest final top-1
    (ties: higher top-5, then the smaller LR), sorted by optimizer order of appearance, then batch.
    `lr_at_edge` is true when that LR is the smallest or largest factor tried (a wider search might do better);
    `lr_edge` says which ("low", "high", or "" inside the range)."""
    groups: dict[tuple[str, int], list[Record]] = {}
    for r in epoch_records(records):
        groups.setdefault((r["optimizer"], r["batch"]), []).append(r)
    cells = []
    for (opt, batch), runs in groups.items():
        best = max(runs, key=lambda r: (r["result"]["top1"], r["result"]["top5"], -r["lr"]))
        factors = sorted(r["lr_factor"] for r in runs)
        res = best["result"]
        cells.append(Cell(
            optimizer=opt, batch=batch, lr=best["lr"], lr_factor=best["lr_factor"],
            lr_at_edge=len(factors) > 1 and best["lr_factor"] in (factors[0], factors[-1]),
            lr_edge="" if len(factors) < 2 else "low" if best["lr_factor"] == factors[0] else
            "high" if best["lr_factor"] == factors[-1] else "", runs=len(runs),
            top1=float(res["top1"]), top5=float(res["top5"]), steps=int(res["steps"]),
            steps_to_target=res.get("steps_to_target"), wall_time_s=float(res["wall_time_s"]),
            images_per_s=float(res["images_per_s"]), optimizer_share=float(res["optimizer_share"]), key=best["key"],
        ))
    order = {opt: i for i, opt in enumerate(dict.fromkeys(r["optimizer"] for r in epoch_records(records)))}
    return sorted(cells, key=lambda c: (order[c.optimizer], c.batch))


def optimizers_of(cells: Sequence[Cell]) -> list[str]:
    """Optimizer labels in table order."""
    return list(dict.fromkeys(c.optimizer for c in cells))


def batches_of(cells: Sequence[Cell]) -> list[int]:
    """Batch sizes in increasing order."""
    return sorted({c.batch for c in cells})


@dataclass(frozen=True)
class Holding:
    """How far one optimizer holds its accuracy as the batch grows at a fixed epoch budget.

    peak: best top-1 over batches (at peak_batch); holds_to: the largest batch B with
    top-1(b) ≥ peak − tolerance for every b in [peak_batch, B]; falls_at: the next batch after
    holds_to (None when it holds to the largest batch); drop: peak − top-1 at the largest batch.
    """

    optimizer: str
    peak: float
    peak_batch: int
    holds_to: int
    falls_at: int | None
    largest_batch: int
    drop: float


def holding(cells: Sequence[Cell], tolerance: float) -> dict[str, Holding]:
    """Holding per optimizer, with `tolerance` in top-1 fraction (0.02 = two percentage points)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    out = {}
    for opt in optimizers_of(cells):
        row = sorted((c for c in cells if c.optimizer == opt), key=lambda c: c.batch)
        peak_cell = max(row, key=lambda c: (c.top1, -c.batch))
        holds_to, falls_at = peak_cell.batch, None
        for c in row:
            if c.batch <= peak_cell.batch:
                continue
            if c.top1 >= peak_cell.top1 - tolerance:
                holds_to = c.batch
            else:
                falls_at = c.batch
                break
        out[opt] = Holding(opt, peak_cell.top1, peak_cell.batch, holds_to, falls_at, row[-1].batch,
                           peak_cell.top1 - row[-1].top1)
    return out


@dataclass(frozen=True)
class ScalingPoint:
    """Steps to target at one batch, the perfect-scaling prediction and their ratio."""

    batch: int
    steps: int | None
    perfect: float | None
    efficiency: float | None


def target_scaling(cells: Sequence[Cell], optimizer: str) -> list[ScalingPoint]:
    """S(B) for `optimizer` with perfect scaling S(B₀)·B₀/B from the smallest batch B₀ that reached
    the target; efficiency = perfect / S (1 = perfect scaling, → 0 = no benefit from a larger batch)."""
    row = sorted((c for c in cells if c.optimizer == optimizer), key=lambda c: c.batch)
    reached = [c for c in row if c.steps_to_target is not None]
    if not reached:
        return [ScalingPoint(c.batch, None, None, None) for c in row]
    b0, s0 = reached[0].batch, reached[0].steps_to_target
    points = []
    for c in row:
        perfect = s0 * b0 / c.batch if c.batch >= b0 else None
        eff = perfect / c.steps_to_target if perfect is not None and c.steps_to_target else None
        points.append(ScalingPoint(c.batch, c.steps_to_target, perfect, eff))
    return points


def perfect_scaling_limit(points: Sequence[ScalingPoint], min_efficiency: float = 0.5) -> int | None:
    """The largest batch up to which every batch that reached the target did so with efficiency
    ≥ min_efficiency (McCandlish et al.: at the critical batch, steps are 2× the perfect-scaling minimum)."""
    limit = None
    for p in points:
        if p.efficiency is None:
            if limit is not None:
                break
            continue
        if p.efficiency < min_efficiency:
            break
        limit = p.batch
    return limit


def curve(record: Record, metric: str) -> list[tuple[int, float]]:
    """(step, value) pairs of `metric` from a run's history, finite values at steps ≥ 1 only."""
    points = []
    for h in record["result"].get("history") or []:
        v = _finite(h.get(metric))
        if v is not None and h.get("step", 0) >= 1:
            points.append((int(h["step"]), v))
    return points


@dataclass(frozen=True)
class DiffusionFit:
    """‖w_t − w_0‖ of one run: final distance, and least-squares fits after the LR warmup (t > W, all
    points when fewer than 3 lie there) of d = a + b·ln t (slope b, r2_log) and ln d = c + p·ln t (exponent p)."""

    batch: int
    budget: str
    steps: int
    top1: float
    final: float
    log_slope: float
    r2_log: float
    exponent: float


def _least_squares(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    syy = sum((b - my) ** 2 for b in y)
    slope = sxy / sxx if sxx > 0 else 0.0
    r2 = (sxy * sxy / (sxx * syy)) if sxx > 0 and syy > 0 else 0.0
    return my - slope * mx, slope, r2


def diffusion_runs(records: Iterable[Record], optimizer: str) -> dict[str, list[Record]]:
    """The runs whose ‖w_t − w_0‖ curves are compared: `optimizer` at lr factor 1, by budget, by batch."""
    out: dict[str, list[Record]] = {"epochs": [], "steps": []}
    for r in records:
        if r["optimizer"] == optimizer and r["lr_factor"] == 1.0 and curve(r, "w_dist"):
            out[r["budget"]].append(r)
    for runs in out.values():
        runs.sort(key=lambda r: r["batch"])
    return out


def diffusion(records: Iterable[Record], optimizer: str) -> list[DiffusionFit]:
    """DiffusionFit for each of `optimizer`'s lr-factor-1 runs that logged at least 3 distances."""
    fits = []
    for budget, runs in diffusion_runs(records, optimizer).items():
        for r in runs:
            pts = [(t, d) for t, d in curve(r, "w_dist") if d > 0]
            if len(pts) < 3:
                continue
            res, cfg = r["result"], r["config"]
            warmup = float(cfg.get("warmup_epochs") or 0) * res["steps"] / res["epochs"] if res["epochs"] else 0.0
            after = [(t, d) for t, d in pts if t > warmup]
            final = pts[-1][1]
            pts = after if len(after) >= 3 else pts
            lt = [math.log(t) for t, _ in pts]
            _, b, r2 = _least_squares(lt, [d for _, d in pts])
            _, p, _ = _least_squares(lt, [math.log(d) for _, d in pts])
            fits.append(DiffusionFit(r["batch"], budget, int(res["steps"]), float(res["top1"]), final, b, r2, p))
    return fits


@dataclass(frozen=True)
class NoiseScale:
    """B_simple of one run: the median of its EMA-smoothed estimates over the last half of training."""

    batch: int
    optimizer: str
    b_simple: float
    samples: int
    reached_target: bool


def noise_scale(records: Iterable[Record]) -> list[NoiseScale]:
    """NoiseScale of every fixed-epoch run at lr factor 1 that logged finite positive B_simple values."""
    out = []
    for r in epoch_records(records):
        if r["lr_factor"] != 1.0:
            continue
        pts = [(t, v) for t, v in curve(r, "b_simple") if v > 0]
        if not pts:
            continue
        half = pts[-1][0] / 2
        late = [v for t, v in pts if t >= half] or [pts[-1][1]]
        out.append(NoiseScale(r["batch"], r["optimizer"], statistics.median(late), len(late),
                              r["result"].get("steps_to_target") is not None))
    return out


def predicted_critical_batch(estimates: Sequence[NoiseScale]) -> float | None:
    """The median B_simple over the runs that reached the target accuracy (a diverged run's gradients say
    nothing about the trajectory the others follow); over all runs when none reached it."""
    values = [e.b_simple for e in estimates if e.reached_target] or [e.b_simple for e in estimates]
    return statistics.median(values) if values else None
