"""What a sweep shows, computed from its run records (the dicts `sweep.execute` returns).

Runs of the same (optimizer, batch, LR factor) with different search seeds form a trial; every number
below is a mean over seeds with a t interval (train.study.stats, `confidence` two-sided). Every
statement of the generated summary comes from one of these functions:
- `best_cells`: per (optimizer, batch) under the fixed-epoch budget, the trial with the best mean
  final top-1 over the LR search (train.study.search; Nado et al. 2021), reported from its held-out
  runs (fresh seeds at the chosen LR only) where the preset has them, so neither the choice of the
  LR nor that of a peak batch inflates the numbers reported and tested (no winner's curse);
- `holding`: how far each optimizer holds its accuracy. Its peak batch B* has the highest mean top-1;
  at each larger batch B the interval of d(B) = top-1(B) − top-1(B*) decides: "holds" when it lies
  wholly above −tolerance, "falls" when wholly below, "unclear" otherwise. It holds for certain up to
  `holds_to` (every batch in (B*, holds_to] holds) and at most up to `could_hold_to` (the batch before
  the first that falls), so its true limit lies in [holds_to, could_hold_to];
- `compare_holding`: "X holds to a larger batch than Y" is "yes" when X.holds_to > Y.could_hold_to,
  "no" when X.could_hold_to ≤ Y.holds_to, and "cannot tell" when the two ranges overlap otherwise;
- `target_scaling`: steps to the target accuracy S(B) (mean over seeds, when every seed reached it)
  against perfect scaling S(B₀)·B₀/B from the smallest batch B₀ that reached it (Shallue et al. 2018);
- `diffusion`: ‖w_t − w_0‖ per run for both budgets with least-squares fits after the warmup of
  d = a + b·ln t (Hoffer et al.'s logarithmic "ultra-slow diffusion") and ln d = c + p·ln t, and
  `diffusion_by_batch` their intervals over seeds;
- `noise_scale`: the EMA-smoothed B_simple = tr(Σ)/|G|² each run logged, late in training
  (McCandlish et al. 2018), and `predicted_critical_batch` its median and quartiles over runs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from train.study import search, stats
from train.study.stats import Interval

Record = dict[str, Any]
HOLDS, FALLS, UNCLEAR = "holds", "falls", "unclear"
YES, NO, CANNOT_TELL = "yes", "no", "cannot tell"


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def epoch_records(records: Iterable[Record]) -> list[Record]:
    """The fixed-epoch runs."""
    return [r for r in records if r["budget"] == "epochs"]


def seed_of(record: Record) -> int:
    """The run's seed."""
    return int(record["seed"])


def phase_of(record: Record) -> str:
    """"search" (an LR-search run; records written before held-out seeds existed are that) or "heldout"."""
    return str(record.get("phase", "search"))


@dataclass(frozen=True)
class Trial:
    """The runs of one (optimizer, batch, LR factor) under the fixed-epoch budget, one per seed, in seed order."""

    optimizer: str
    batch: int
    lr_factor: float
    lr: float
    runs: tuple[Record, ...]

    def values(self, metric: str) -> list[float]:
        """`metric` of the run results, one value per seed."""
        return [float(r["result"][metric]) for r in self.runs]


def trials(records: Iterable[Record], phase: str = "search") -> list[Trial]:
    """Fixed-epoch runs of `phase` grouped by (optimizer, batch, lr factor), in order of first appearance."""
    groups: dict[tuple[str, int, float], list[Record]] = {}
    for r in epoch_records(records):
        if phase_of(r) != phase:
            continue
        groups.setdefault((r["optimizer"], r["batch"], float(r["lr_factor"])), []).append(r)
    return [Trial(opt, batch, factor, float(runs[0]["lr"]), tuple(sorted(runs, key=seed_of)))
            for (opt, batch, factor), runs in groups.items()]


def factor_scores(cell_trials: Sequence[Trial]) -> list[search.FactorScore]:
    """The search's view of one cell's trials: mean top-1 and top-5 per factor."""
    return [search.FactorScore(t.lr_factor, statistics.fmean(t.values("top1")), statistics.fmean(t.values("top5")))
            for t in sorted(cell_trials, key=lambda t: t.lr_factor)]


@dataclass(frozen=True)
class Cell:
    """The best-LR trial of one optimizer at one global batch (fixed-epoch budget).

    top1/top5: mean over seeds with its interval; top1_runs: the per-seed values. lr_edge: "low",
    "high" or "" (inside the searched range); edge_unresolved: the best is still at an edge after the
    search stopped (its extension limit was spent). steps_to_target: mean over seeds when every seed
    reached the target (None otherwise), reached: how many seeds did. Every per-seed number comes from
    the held-out runs at the chosen LR when `heldout` (else from the search runs); search_top1 is the
    chosen LR's mean over the search seeds, the number the choice was made on.
    """

    optimizer: str
    batch: int
    lr: float
    lr_factor: float
    factors: tuple[float, ...]
    extensions: int
    lr_edge: str
    edge_unresolved: bool
    top1: Interval
    top5: Interval
    top1_runs: tuple[float, ...]
    steps: int
    steps_to_target: float | None
    reached: int
    seeds: int
    wall_time_s: float
    images_per_s: float
    optimizer_share: float
    keys: tuple[str, ...]
    heldout: bool = False
    search_top1: float = math.nan

    @property
    def lr_at_edge(self) -> bool:
        """Whether the best LR is the smallest or largest factor tried."""
        return self.lr_edge != search.INSIDE


def best_cells(records: Iterable[Record], initial_factors: Sequence[float], max_extensions: int,
               confidence: float = 0.95) -> list[Cell]:
    """One Cell per (optimizer, batch) of the fixed-epoch runs: the trial the LR search calls best,
    sorted by optimizer order of appearance, then batch. `initial_factors` and `max_extensions` are the
    preset's, to count the extensions and tell a spent search from one that may go on."""
    records = list(records)
    by_cell: dict[tuple[str, int], list[Trial]] = {}
    for t in trials(records):
        by_cell.setdefault((t.optimizer, t.batch), []).append(t)
    heldout = {(t.optimizer, t.batch, t.lr_factor): t for t in trials(records, "heldout")}
    cells = []
    for (opt, batch), cell_trials in by_cell.items():
        scores = factor_scores(cell_trials)
        chosen = search.best(scores)
        searched = next(t for t in cell_trials if t.lr_factor == chosen.factor)
        trial = heldout.get((opt, batch, chosen.factor), searched)
        factors = tuple(s.factor for s in scores)
        extensions = search.extensions_used(factors, initial_factors)
        side = search.edge(scores) if len(factors) > 1 else search.INSIDE
        reached = [r["result"].get("steps_to_target") for r in trial.runs]
        done = [s for s in reached if s is not None]
        cells.append(Cell(
            optimizer=opt, batch=batch, lr=trial.lr, lr_factor=trial.lr_factor, factors=factors,
            extensions=extensions, lr_edge=side,
            edge_unresolved=side != search.INSIDE and extensions >= max_extensions,
            top1=stats.mean_interval(trial.values("top1"), confidence),
            top5=stats.mean_interval(trial.values("top5"), confidence),
            top1_runs=tuple(trial.values("top1")), steps=int(trial.runs[0]["result"]["steps"]),
            steps_to_target=statistics.fmean(done) if len(done) == len(reached) else None, reached=len(done),
            seeds=len(trial.runs), wall_time_s=statistics.fmean(trial.values("wall_time_s")),
            images_per_s=statistics.fmean(trial.values("images_per_s")),
            optimizer_share=statistics.fmean(trial.values("optimizer_share")),
            keys=tuple(r["key"] for r in trial.runs), heldout=trial is not searched,
            search_top1=statistics.fmean(searched.values("top1"))))
    order = {opt: i for i, opt in enumerate(dict.fromkeys(r["optimizer"] for r in epoch_records(records)))}
    return sorted(cells, key=lambda c: (order[c.optimizer], c.batch))


def optimizers_of(cells: Sequence[Cell]) -> list[str]:
    """Optimizer labels in table order."""
    return list(dict.fromkeys(c.optimizer for c in cells))


def batches_of(cells: Sequence[Cell]) -> list[int]:
    """Batch sizes in increasing order."""
    return sorted({c.batch for c in cells})


@dataclass(frozen=True)
class BatchVerdict:
    """One batch beyond the peak: the interval of its top-1 minus the peak's, and the verdict on it."""

    batch: int
    difference: Interval
    verdict: str


@dataclass(frozen=True)
class Holding:
    """How far one optimizer holds its accuracy as the batch grows at a fixed epoch budget (module
    docstring): the peak, the verdict at every larger batch, the certain and the possible limit, the
    first batch that certainly falls (None: none does) and the drop from the peak to the largest batch."""

    optimizer: str
    peak: Interval
    peak_batch: int
    verdicts: tuple[BatchVerdict, ...]
    holds_to: int
    could_hold_to: int
    falls_at: int | None
    largest_batch: int
    drop: Interval

    @property
    def settled(self) -> bool:
        """Whether the limit is known exactly (holds_to == could_hold_to)."""
        return self.holds_to == self.could_hold_to


def holding(cells: Sequence[Cell], tolerance: float, confidence: float = 0.95) -> dict[str, Holding]:
    """Holding per optimizer, with `tolerance` in top-1 fraction (0.02 = two percentage points)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    out = {}
    for opt in optimizers_of(cells):
        row = sorted((c for c in cells if c.optimizer == opt), key=lambda c: c.batch)
        peak = max(row, key=lambda c: (c.top1.estimate, -c.batch))
        verdicts = []
        for c in row:
            if c.batch <= peak.batch:
                continue
            d = stats.difference_interval(c.top1_runs, peak.top1_runs, confidence)
            side = stats.versus_margin(d, -tolerance)
            verdicts.append(BatchVerdict(c.batch, d, {stats.ABOVE: HOLDS, stats.BELOW: FALLS}.get(side, UNCLEAR)))
        holds_to = peak.batch
        for v in verdicts:
            if v.verdict != HOLDS:
                break
            holds_to = v.batch
        falls_at = next((v.batch for v in verdicts if v.verdict == FALLS), None)
        could = peak.batch
        for v in verdicts:
            if v.verdict == FALLS:
                break
            could = v.batch
        out[opt] = Holding(opt, peak.top1, peak.batch, tuple(verdicts), holds_to, could, falls_at, row[-1].batch,
                           stats.difference_interval(peak.top1_runs, row[-1].top1_runs, confidence))
    return out


def compare_holding(a: Holding, b: Holding) -> str:
    """Whether `a` holds its accuracy to a larger batch than `b`: YES, NO or CANNOT_TELL (module docstring)."""
    if a.holds_to > b.could_hold_to:
        return YES
    if a.could_hold_to <= b.holds_to:
        return NO
    return CANNOT_TELL


def versus(cells: Sequence[Cell], a: str, b: str, confidence: float = 0.95) -> list[tuple[int, Interval]]:
    """Per batch both optimizers ran: Welch's interval of top-1(a) − top-1(b) at their best LRs."""
    by = {(c.optimizer, c.batch): c for c in cells}
    return [(batch, stats.difference_interval(by[(a, batch)].top1_runs, by[(b, batch)].top1_runs, confidence))
            for batch in batches_of(cells) if (a, batch) in by and (b, batch) in by]


@dataclass(frozen=True)
class ScalingPoint:
    """Steps to target at one batch, the perfect-scaling prediction and their ratio."""

    batch: int
    steps: float | None
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


def band(records: Sequence[Record], metric: str) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) of `metric` over runs at the steps every run logged (the runs of one
    configuration over seeds log the same steps)."""
    curves = [dict(curve(r, metric)) for r in records]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(t, statistics.fmean(c[t] for c in curves), min(c[t] for c in curves), max(c[t] for c in curves))
            for t in steps]


@dataclass(frozen=True)
class DiffusionFit:
    """‖w_t − w_0‖ of one run: final distance, and least-squares fits after the LR warmup (t > W, all
    points when fewer than 3 lie there) of d = a + b·ln t (slope b, r2_log) and ln d = c + p·ln t (exponent p)."""

    batch: int
    budget: str
    seed: int
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
    """The runs whose ‖w_t − w_0‖ curves are compared: `optimizer`'s search runs at lr factor 1, by budget, by
    batch and seed."""
    out: dict[str, list[Record]] = {"epochs": [], "steps": []}
    for r in records:
        if r["optimizer"] == optimizer and r["lr_factor"] == 1.0 and phase_of(r) == "search" and curve(r, "w_dist"):
            out[r["budget"]].append(r)
    for runs in out.values():
        runs.sort(key=lambda r: (r["batch"], seed_of(r)))
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
            fits.append(DiffusionFit(r["batch"], budget, seed_of(r), int(res["steps"]), float(res["top1"]), final,
                                     b, r2, p))
    return fits


@dataclass(frozen=True)
class DiffusionSummary:
    """The fits of one (budget, batch) over seeds: intervals of the final distance, the exponent p,
    the log slope b and top-1; the smallest R² of the logarithmic fits; the per-seed fits."""

    budget: str
    batch: int
    steps: int
    final: Interval
    exponent: Interval
    log_slope: Interval
    top1: Interval
    min_r2_log: float
    fits: tuple[DiffusionFit, ...]


def diffusion_by_batch(fits: Sequence[DiffusionFit], confidence: float = 0.95) -> list[DiffusionSummary]:
    """One DiffusionSummary per (budget, batch), sorted by budget then batch."""
    groups: dict[tuple[str, int], list[DiffusionFit]] = {}
    for f in fits:
        groups.setdefault((f.budget, f.batch), []).append(f)
    out = []
    for (budget, batch), group in sorted(groups.items()):
        def interval(values: list[float]) -> Interval:
            return stats.mean_interval(values, confidence)
        out.append(DiffusionSummary(budget, batch, group[0].steps, interval([f.final for f in group]),
                                    interval([f.exponent for f in group]), interval([f.log_slope for f in group]),
                                    interval([f.top1 for f in group]), min(f.r2_log for f in group), tuple(group)))
    return out


@dataclass(frozen=True)
class NoiseScale:
    """B_simple of one run: the median of its EMA-smoothed estimates over the last half of training."""

    batch: int
    optimizer: str
    seed: int
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
        out.append(NoiseScale(r["batch"], r["optimizer"], seed_of(r), statistics.median(late), len(late),
                              r["result"].get("steps_to_target") is not None))
    return out


@dataclass(frozen=True)
class CriticalBatch:
    """The predicted critical batch: median B_simple over `runs` runs with its quartiles; `basis` says
    which runs ("reached": those that reached the target; "all": none did)."""

    median: float
    q1: float
    q3: float
    runs: int
    basis: str


def predicted_critical_batch(estimates: Sequence[NoiseScale]) -> CriticalBatch | None:
    """The median and quartiles of B_simple over the runs that reached the target accuracy (a diverged
    run's gradients say nothing about the trajectory the others follow); over all runs when none did."""
    reached = [e.b_simple for e in estimates if e.reached_target]
    values, basis = (reached, "reached") if reached else ([e.b_simple for e in estimates], "all")
    if not values:
        return None
    q1, median, q3 = stats.quartiles(values)
    return CriticalBatch(median, q1, q3, len(values), basis)
