"""The generated summary: findings stated from the analysis numbers, then the papers' reference points.

`findings` returns the claims as data (each with its sentence), so tests can check every sentence
against the numbers it was derived from; `summary_markdown` renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from train.study import analysis
from train.study.analysis import Cell, Record

# Optimizers the paper's claim is about (layer-wise adaptive) and its baseline.
ADAPTIVE = ("lars", "lamb")
BASELINE = "sgd"

REFERENCE_POINTS = """\
Reference points (paper-notes.md; ImageNet/ResNet-50, not reproduced here):
- Goyal et al. 2017: momentum SGD with linear LR scaling and 5 warmup epochs holds 76.3% top-1 up to batch 8K.
- You et al. 2017 (LARS): 75.3% at 16K–32K; MLPerf LARS reaches 75.9% at 4K–32K in ~35–42 epochs.
- LAMB (You et al. 2019 logs): 76.34% at 32K (3,519 steps), 75.0–75.4% at 64K (1,760 steps).
- You et al. 2020 ("The Limit of the Batch Size") push ImageNet beyond 64K, where every optimizer loses
  accuracy at a fixed epoch budget, and report results contradicting Hoffer et al.'s ultra-slow diffusion.
- Nado et al. 2021: well-tuned Nesterov momentum and Adam match LARS/LAMB at large batch."""


@dataclass(frozen=True)
class Finding:
    """One claim of the summary: a name tests refer to, its truth value (None: not measurable) and its sentence."""

    name: str
    holds: bool | None
    sentence: str


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def findings(records: Sequence[Record], cells: Sequence[Cell], tolerance: float,
             diffusion_optimizer: str) -> list[Finding]:
    """Every claim of the summary, derived from `cells` (best-LR table) and `records` (all runs)."""
    out: list[Finding] = []
    hold = analysis.holding(cells, tolerance)
    largest = max(c.batch for c in cells)
    tol = f"{100 * tolerance:.0f} points"

    falling = [o for o, h in hold.items() if h.falls_at is not None]
    every_falls = len(falling) == len(hold)
    detail = "; ".join(
        f"{o}: peak {_pct(h.peak)} at B={h.peak_batch}, holds to B={h.holds_to}"
        + (f", falls at B={h.falls_at} (to {_pct(h.peak - h.drop)} at B={h.largest_batch})" if h.falls_at else "")
        for o, h in hold.items())
    if every_falls:
        lead = f"Accuracy falls beyond some batch for every optimizer (more than {tol} below its peak)"
    else:
        steady = [o for o in hold if o not in falling]
        lead = (f"Accuracy does NOT fall for every optimizer within the swept batches (up to {largest}): "
                f"{', '.join(steady)} stay within {tol} of their peak")
    out.append(Finding("every_optimizer_falls", every_falls, f"{lead}. {detail}."))

    if BASELINE in hold:
        for opt in ADAPTIVE:
            if opt not in hold:
                continue
            a, b = hold[opt], hold[BASELINE]
            further = a.holds_to > b.holds_to
            verdict = "holds accuracy to a larger batch than" if further else (
                "does NOT hold accuracy to a larger batch than")
            out.append(Finding(f"{opt}_beyond_{BASELINE}", further,
                               f"{opt.upper()} {verdict} momentum SGD (B={a.holds_to} vs B={b.holds_to}, "
                               f"tolerance {tol})."))
        at_largest = {c.optimizer: c.top1 for c in cells if c.batch == largest}
        if BASELINE in at_largest:
            best_opt = max(at_largest, key=lambda o: at_largest[o])
            out.append(Finding("largest_batch_winner", best_opt in ADAPTIVE,
                               f"At the largest batch (B={largest}) the best optimizer is {best_opt} with "
                               f"{_pct(at_largest[best_opt])}; momentum SGD reaches {_pct(at_largest[BASELINE])}."))

    edges = [c for c in cells if c.lr_at_edge]
    per_opt = []
    for opt in analysis.optimizers_of(edges):
        low = [str(c.batch) for c in edges if c.optimizer == opt and c.lr_edge == "low"]
        high = [str(c.batch) for c in edges if c.optimizer == opt and c.lr_edge == "high"]
        per_opt.append(f"{opt}: " + "; ".join(
            part for part in (f"lowest LR best at B={', '.join(low)}" if low else "",
                              f"highest LR best at B={', '.join(high)}" if high else "") if part))
    out.append(Finding("lr_search_interior", not edges,
                       "Every best LR lies inside the searched range." if not edges else
                       f"{len(edges)} of {len(cells)} best LRs lie at the edge of the searched range "
                       f"({' | '.join(per_opt)}): a wider search could change those cells."))

    for opt in analysis.optimizers_of(cells):
        points = analysis.target_scaling(cells, opt)
        reached = [p for p in points if p.steps is not None]
        if not reached:
            out.append(Finding(f"scaling_{opt}", None, f"{opt}: no batch reached the target accuracy."))
            continue
        limit = analysis.perfect_scaling_limit(points)
        missing = [p.batch for p in points if p.steps is None]
        if len(reached) == 1:
            trend = f"only B={reached[0].batch} reaches the target ({reached[0].steps} steps)"
        else:
            trend = (f"steps to target go from {reached[0].steps} at B={reached[0].batch} to "
                     f"{reached[-1].steps} at B={reached[-1].batch}; within 2× of perfect scaling up to B={limit}")
        out.append(Finding(
            f"scaling_{opt}", limit is not None and limit > reached[0].batch,
            f"{opt}: {trend}" + (f"; target not reached at B={', '.join(map(str, missing))}" if missing else "")
            + "."))

    fits = analysis.diffusion(records, diffusion_optimizer)
    out.extend(_diffusion_findings(fits, diffusion_optimizer))

    estimates = analysis.noise_scale(records)
    bcrit = analysis.predicted_critical_batch(estimates)
    reached = sum(e.reached_target for e in estimates)
    basis = (f"median over the {reached} runs that reached the target" if reached else
             f"median over all {len(estimates)} runs; none reached the target")
    if bcrit is None:
        out.append(Finding("noise_scale", None, "No run logged a finite B_simple, so no critical batch is predicted."))
    else:
        fall = min((h.falls_at for h in hold.values() if h.falls_at is not None), default=None)
        if fall is None:
            out.append(Finding("noise_scale", None,
                               f"B_simple ({basis}) is {bcrit:.0f}; no optimizer's "
                               f"accuracy fell, so there is no observed batch to compare it with."))
        else:
            ratio = bcrit / fall
            agree = 0.5 <= ratio <= 2.0
            out.append(Finding("noise_scale", agree,
                               f"B_simple ({basis}) predicts a critical batch of "
                               f"{bcrit:.0f}; accuracy first falls at B={fall} (ratio {ratio:.2f}, "
                               f"{'within' if agree else 'outside'} a factor of 2)."))
    return out


def _diffusion_findings(fits: Sequence[analysis.DiffusionFit], optimizer: str) -> list[Finding]:
    out = []
    for budget in ("epochs", "steps"):
        row = sorted((f for f in fits if f.budget == budget), key=lambda f: f.batch)
        if len(row) < 2:
            out.append(Finding(f"diffusion_{budget}", None,
                               f"Too few fixed-{budget[:-1]} runs logged ‖w_t − w_0‖ to compare batches."))
            continue
        small, big = row[0], row[-1]
        less = big.final < small.final
        r2 = min(f.r2_log for f in row)
        out.append(Finding(
            f"diffusion_{budget}", less,
            f"Fixed-{budget[:-1]} budget ({optimizer}, scaled LR): the largest batch "
            f"(B={big.batch}, {big.steps} steps) "
            f"ends {'closer to' if less else 'no closer to'} w_0 than the smallest (B={small.batch}, "
            f"{small.steps} steps): ‖w_T − w_0‖ = {big.final:.3g} vs {small.final:.3g}; growth exponents "
            f"p (d ∝ t^p after warmup, B={small.batch}…{big.batch}) {', '.join(f'{f.exponent:.2f}' for f in row)}; "
            f"a + b·ln t fits with R² ≥ {r2:.2f}."))
    epoch_row = {f.batch: f for f in fits if f.budget == "epochs"}
    step_row = {f.batch: f for f in fits if f.budget == "steps"}
    both = sorted(set(epoch_row) & set(step_row))
    if len(both) >= 2:
        big = both[-1]
        gap_epochs = epoch_row[both[0]].top1 - epoch_row[big].top1
        gap_steps = step_row[both[0]].top1 - step_row[big].top1
        closes = gap_steps < gap_epochs
        out.append(Finding(
            "regime_adaptation", closes,
            f"Hoffer et al.'s regime adaptation: the top-1 gap between B={both[0]} and B={big} is "
            f"{100 * gap_epochs:.1f} points at a fixed epoch budget and {100 * gap_steps:.1f} points at a fixed "
            f"step budget — training the large batch for as many steps "
            + ("does not close the gap." if not closes else
               "closes part of the gap." if gap_steps > 0 else "closes the gap (the larger batch is ahead).")))
    return out


def summary_markdown(found: Sequence[Finding]) -> str:
    """The summary section: shape verdict first, then every finding, then the reference points."""
    by_name = {f.name: f for f in found}
    shape = [by_name.get("every_optimizer_falls")] + [by_name.get(f"{o}_beyond_{BASELINE}") for o in ADAPTIVE]
    shape = [f for f in shape if f is not None]
    if shape and all(f.holds for f in shape):
        verdict = ("**The run shows the paper's shape**: accuracy falls beyond some batch for every optimizer, "
                   "and LARS and LAMB hold accuracy to larger batches than momentum SGD.")
    else:
        missing = [f.name for f in shape if not f.holds]
        verdict = ("**The run does not show the paper's full shape** (not true here: "
                   + ", ".join(missing) + "). The preset was not tuned to produce it; the numbers below say what "
                   "the data show.")
    lines = [verdict, ""]
    lines += [f"- {f.sentence}" for f in found]
    lines += ["", REFERENCE_POINTS]
    return "\n".join(lines) + "\n"
