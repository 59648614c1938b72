"""The generated summary: findings stated from the analysis numbers, then the papers' reference points.

`findings` returns the claims as data (each with its sentence and a truth value: True, False, or None
for "cannot tell" where the intervals over seeds cannot separate the alternatives), so tests can check
every sentence against the numbers it was derived from; `summary_markdown` renders them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from train.study import analysis, stats
from train.study.analysis import CANNOT_TELL, Cell, Record
from train.study.stats import Interval

# Optimizers the paper's claim is about (layer-wise adaptive) and its baseline.
ADAPTIVE = ("lars", "lamb")
BASELINE = "sgd"
TRUTH = {analysis.YES: True, analysis.NO: False, analysis.CANNOT_TELL: None}

REFERENCE_POINTS = """\
Reference points (ImageNet/ResNet-50, not reproduced here; this study is a qualitative analogue on CPU):
- Goyal et al. 2017 (arXiv:1706.02677): momentum SGD with linear LR scaling and 5 warmup epochs holds 76.3%
  top-1 up to batch 8K.
- You et al. 2017 (LARS, arXiv:1708.03888): 75.3% at 16K–32K; MLPerf LARS reaches 75.9% at 4K–32K in ~35–42
  epochs.
- You et al. 2019 (LAMB, arXiv:1904.00962): 76.34% at 32K (3,519 steps), 75.0–75.4% at 64K (1,760 steps).
- You et al. 2020 ("The Limit of the Batch Size", arXiv:2006.08517) push ImageNet beyond 64K, where every
  optimizer loses accuracy at a fixed epoch budget, and report results contradicting Hoffer et al.'s
  (arXiv:1705.08741) ultra-slow diffusion.
- Nado et al. 2021 (arXiv:2102.06356) dispute the shape: well-tuned Nesterov momentum and Adam match LARS/LAMB
  at large batch.
- McCandlish et al. 2018 (arXiv:1812.06162): the gradient noise scale B_simple predicts the critical batch."""


@dataclass(frozen=True)
class Finding:
    """One claim of the summary: a name tests refer to, its truth value (None: cannot tell, or not
    measurable) and its sentence."""

    name: str
    holds: bool | None
    sentence: str


def pct_interval(i: Interval) -> str:
    """"96.1% ± 0.4" for a top-1 interval (± the half-width in points; "± ?" when unbounded)."""
    half = "?" if math.isinf(i.half_width) else f"{100 * i.half_width:.1f}"
    return f"{100 * i.estimate:.1f}% ± {half}"


def points_interval(i: Interval) -> str:
    """"3.2 [1.1, 5.3] points" for an interval of a top-1 difference."""
    return f"{100 * i.estimate:.1f} [{100 * i.low:.1f}, {100 * i.high:.1f}] points"


def number_interval(i: Interval, digits: int = 3, half_digits: int | None = None) -> str:
    """"125 ± 113": the estimate to `digits` significant digits, ± the half-width to `half_digits`
    (default: `digits`; "?" when unbounded)."""
    half = "?" if math.isinf(i.half_width) else f"{i.half_width:.{half_digits or digits}g}"
    return f"{i.estimate:.{digits}g} ± {half}"


def _limit(h: analysis.Holding) -> str:
    return f"B={h.holds_to}" if h.settled else f"B={h.holds_to}…{h.could_hold_to}"


def findings(records: Sequence[Record], cells: Sequence[Cell], tolerance: float, diffusion_optimizer: str,
             confidence: float = 0.95, adaptive: Sequence[str] = ADAPTIVE,
             compare: tuple[str, str] | None = None) -> list[Finding]:
    """Every claim of the summary, derived from `cells` (best-LR table) and `records` (all runs);
    `adaptive` are the labels compared with momentum SGD, `compare` a pair compared batch by batch."""
    out: list[Finding] = []
    hold = analysis.holding(cells, tolerance, confidence)
    largest = max(c.batch for c in cells)
    tol = f"{100 * tolerance:g} points"
    conf = f"{100 * confidence:g}%"

    falls = {o: h.falls_at is not None for o, h in hold.items()}
    steady = [o for o, h in hold.items() if h.holds_to == h.largest_batch]
    detail = "; ".join(
        f"{o}: peak {pct_interval(h.peak)} at B={h.peak_batch}, holds to {_limit(h)}"
        + (f", falls at B={h.falls_at}" if h.falls_at else ", falls at no batch for certain")
        + f" (drop to B={h.largest_batch}: {points_interval(h.drop)})" for o, h in hold.items())
    if all(falls.values()):
        every: bool | None = True
        lead = f"Accuracy falls beyond some batch for every optimizer (surely more than {tol} below its peak)"
    elif steady:
        every = False
        lead = (f"Accuracy does NOT fall for every optimizer within the swept batches (up to {largest}): "
                f"{', '.join(steady)} stay surely within {tol} of their peak")
    else:
        every = None
        unclear = [o for o, f in falls.items() if not f]
        lead = (f"Cannot tell whether accuracy falls beyond some batch for every optimizer: for "
                f"{', '.join(unclear)} no batch is surely more than {tol} below the peak, nor every batch "
                f"surely within")
    out.append(Finding("every_optimizer_falls", every, f"{lead}. {detail}."))

    if BASELINE in hold:
        b = hold[BASELINE]
        for opt in adaptive:
            if opt not in hold:
                continue
            a = hold[opt]
            answer = analysis.compare_holding(a, b)
            verdict = {analysis.YES: "holds accuracy to a larger batch than",
                       analysis.NO: "does NOT hold accuracy to a larger batch than",
                       CANNOT_TELL: "cannot be told apart from"}[answer]
            out.append(Finding(f"{opt}_beyond_{BASELINE}", TRUTH[answer],
                               f"{opt.upper()} {verdict} momentum SGD (holds to {_limit(a)} vs {_limit(b)}; "
                               f"tolerance {tol}, {conf} intervals over seeds)."))
        at_largest = {c.optimizer: c for c in cells if c.batch == largest}
        if BASELINE in at_largest and len(at_largest) > 1:
            ranked = sorted(at_largest.values(), key=lambda c: -c.top1.estimate)
            winner, second = ranked[0], ranked[1]
            lead_gap = stats.difference_interval(winner.top1_runs, second.top1_runs, confidence)
            separated = lead_gap.low > 0
            sentence = (f"At the largest batch (B={largest}) the best mean is {winner.optimizer}'s "
                        f"{pct_interval(winner.top1)}, ahead of {second.optimizer} ({pct_interval(second.top1)}) by "
                        f"{points_interval(lead_gap)}: " + ("a clear lead" if separated else "not separable"))
            if winner.optimizer != BASELINE:
                gap = stats.difference_interval(winner.top1_runs, at_largest[BASELINE].top1_runs, confidence)
                sentence += (f"; momentum SGD reaches {pct_interval(at_largest[BASELINE].top1)} "
                             f"({points_interval(gap)} behind)")
            out.append(Finding("largest_batch_winner", (winner.optimizer in adaptive) if separated else None,
                               sentence + "."))

    if compare is not None:
        out.append(comparison(cells, *compare, confidence))
    out.append(_lr_search_finding(cells))

    for opt in analysis.optimizers_of(cells):
        points = analysis.target_scaling(cells, opt)
        reached = [p for p in points if p.steps is not None]
        if not reached:
            out.append(Finding(f"scaling_{opt}", None, f"{opt}: at no batch did every seed reach the target accuracy."))
            continue
        limit = analysis.perfect_scaling_limit(points)
        missing = [p.batch for p in points if p.steps is None]
        if len(reached) == 1:
            trend = f"only at B={reached[0].batch} does every seed reach the target ({reached[0].steps:.0f} steps)"
        else:
            trend = (f"mean steps to target go from {reached[0].steps:.0f} at B={reached[0].batch} to "
                     f"{reached[-1].steps:.0f} at B={reached[-1].batch}; within 2× of perfect scaling up to B={limit}")
        out.append(Finding(
            f"scaling_{opt}", limit is not None and limit > reached[0].batch,
            f"{opt}: {trend}" + (f"; not every seed reached it at B={', '.join(map(str, missing))}" if missing else "")
            + "."))

    summaries = analysis.diffusion_by_batch(analysis.diffusion(records, diffusion_optimizer), confidence)
    out.extend(_diffusion_findings(summaries, diffusion_optimizer, confidence))

    estimates = analysis.noise_scale(records)
    critical = analysis.predicted_critical_batch(estimates)
    if critical is None:
        out.append(Finding("noise_scale", None, "No run logged a finite B_simple, so no critical batch is predicted."))
    else:
        basis = (f"median over the {critical.runs} runs that reached the target" if critical.basis == "reached" else
                 f"median over all {critical.runs} runs; none reached the target")
        spread = f"quartiles {critical.q1:.0f}–{critical.q3:.0f}"
        fall = min((h.falls_at for h in hold.values() if h.falls_at is not None), default=None)
        if fall is None:
            out.append(Finding("noise_scale", None,
                               f"B_simple ({basis}) is {critical.median:.0f} ({spread}); no optimizer's accuracy "
                               f"surely fell, so there is no observed batch to compare it with."))
        else:
            ratio = critical.median / fall
            agree = 0.5 <= ratio <= 2.0
            out.append(Finding("noise_scale", agree,
                               f"B_simple ({basis}) predicts a critical batch of {critical.median:.0f} ({spread}); "
                               f"accuracy first surely falls at B={fall} (ratio {ratio:.2f}, "
                               f"{'within' if agree else 'outside'} a factor of 2)."))
    return out


def comparison(cells: Sequence[Cell], a: str, b: str, confidence: float = 0.95) -> Finding:
    """`a` against `b` batch by batch: where its best-LR top-1 is surely higher, surely lower, or not
    separable. holds: True when a is better somewhere and worse nowhere, False when the reverse, None otherwise."""
    rows = analysis.versus(cells, a, b, confidence)
    better = [(batch, d) for batch, d in rows if d.low > 0]
    worse = [(batch, d) for batch, d in rows if d.high < 0]
    even = [batch for batch, d in rows if d.low <= 0 <= d.high]

    def listed(items: list[tuple[int, Interval]]) -> str:
        return ", ".join(f"B={batch} ({points_interval(d)})" for batch, d in items)
    parts = ([f"better at {listed(better)}"] if better else []) + ([f"worse at {listed(worse)}"] if worse else [])
    parts += [f"not separable at B={', '.join(map(str, even))}"] if even else []
    holds = True if better and not worse else False if worse and not better else None
    return Finding(f"{a}_versus_{b}", holds, f"{a} against {b} at the best LR of each: {'; '.join(parts)}.")


def _lr_search_finding(cells: Sequence[Cell]) -> Finding:
    extended = [c for c in cells if c.extensions]
    most = max((c.extensions for c in cells), default=0)
    searched = (f"{len(extended)} of {len(cells)} cells extended their LR grid "
                f"({sum(c.extensions for c in cells)} extra LRs in all, at most {most} per cell)")
    stuck = [c for c in cells if c.edge_unresolved]
    if not stuck:
        return Finding("lr_search_interior", True, f"Every best LR lies inside its searched range; {searched}.")
    names = "; ".join(f"{c.optimizer} B={c.batch} ({'lowest' if c.lr_edge == 'low' else 'highest'} LR "
                      f"{c.lr:.3g} after {c.extensions} extensions)" for c in stuck)
    return Finding("lr_search_interior", False,
                   f"{len(stuck)} of {len(cells)} best LRs are still at the edge of their range when the search "
                   f"stopped at its extension limit: {names}; a wider search could change those cells; {searched}.")


def _diffusion_findings(rows: Sequence[analysis.DiffusionSummary], optimizer: str,
                        confidence: float) -> list[Finding]:
    out = []
    for budget in ("epochs", "steps"):
        row = [s for s in rows if s.budget == budget]
        if len(row) < 2:
            out.append(Finding(f"diffusion_{budget}", None,
                               f"Too few fixed-{budget[:-1]} runs logged ‖w_t − w_0‖ to compare batches."))
            continue
        small, big = row[0], row[-1]
        gap = stats.difference_interval([f.final for f in big.fits], [f.final for f in small.fits], confidence)
        side = stats.versus_margin(gap, 0.0)
        closer = {stats.BELOW: True, stats.ABOVE: False}.get(side)
        words = {True: "ends closer to w_0 than", False: "ends farther from w_0 than",
                 None: "ends at a distance from w_0 the seeds cannot separate from that of"}[closer]
        r2 = min(s.min_r2_log for s in row)
        out.append(Finding(
            f"diffusion_{budget}", closer,
            f"Fixed-{budget[:-1]} budget ({optimizer}, scaled LR): the largest batch "
            f"(B={big.batch}, {big.steps} steps) {words} the smallest (B={small.batch}, "
            f"{small.steps} steps), ‖w_T − w_0‖ "
            f"{number_interval(big.final)} vs {number_interval(small.final)} (difference "
            f"{gap.estimate:.3g} [{gap.low:.3g}, {gap.high:.3g}]); growth exponents p (d ∝ t^p after warmup, "
            f"B={small.batch}…{big.batch}) {', '.join(number_interval(s.exponent, 2) for s in row)}; "
            f"a + b·ln t fits with R² ≥ {r2:.2f}."))
    by_budget = {b: {s.batch: s for s in rows if s.budget == b} for b in ("epochs", "steps")}
    both = sorted(set(by_budget["epochs"]) & set(by_budget["steps"]))
    if len(both) >= 2:
        lo, hi = both[0], both[-1]
        groups = [[f.top1 for f in by_budget[b][batch].fits] for b, batch in
                  (("epochs", lo), ("epochs", hi), ("steps", lo), ("steps", hi))]
        gap_epochs = stats.difference_interval(groups[0], groups[1], confidence)
        gap_steps = stats.difference_interval(groups[2], groups[3], confidence)
        narrowing = stats.contrast_interval(groups, [1.0, -1.0, -1.0, 1.0], confidence)
        side = stats.versus_margin(narrowing, 0.0)
        closes = {stats.ABOVE: True, stats.BELOW: False}.get(side)
        tail = {True: "closes part of the gap." if gap_steps.estimate > 0 else
                "closes the gap (the larger batch is ahead).",
                False: "widens the gap.", None: "changes the gap by an amount the seeds cannot separate from zero."}
        out.append(Finding(
            "regime_adaptation", closes,
            f"Hoffer et al.'s regime adaptation: the top-1 gap between B={lo} and B={hi} is "
            f"{points_interval(gap_epochs)} at a fixed epoch budget and {points_interval(gap_steps)} at a fixed "
            f"step budget (narrowing {points_interval(narrowing)}) — training the large batch for as many steps "
            + tail[closes]))
    return out


def summary_markdown(found: Sequence[Finding], adaptive: Sequence[str] = ADAPTIVE) -> str:
    """The summary section: shape verdict first, then every finding, then the reference points."""
    by_name = {f.name: f for f in found}
    if "verdict" in by_name:
        return "\n".join([by_name["verdict"].sentence, "", *[f"- {f.sentence}" for f in found if f.name != "verdict"],
                          "", REFERENCE_POINTS]) + "\n"
    shape = [by_name.get("every_optimizer_falls")] + [by_name.get(f"{o}_beyond_{BASELINE}") for o in adaptive]
    shape = [f for f in shape if f is not None]
    false = [f.name for f in shape if f.holds is False]
    unknown = [f.name for f in shape if f.holds is None]
    if shape and all(f.holds for f in shape):
        verdict = ("**The run shows the paper's shape**: accuracy falls beyond some batch for every optimizer, "
                   "and LARS and LAMB hold accuracy to larger batches than momentum SGD, each by the intervals "
                   "over seeds.")
    elif false:
        verdict = ("**The run does not show the paper's full shape** (not true here: " + ", ".join(false)
                   + ("; cannot tell: " + ", ".join(unknown) if unknown else "")
                   + "). The preset was not tuned to produce it; the numbers below say what the data show.")
    else:
        verdict = ("**Cannot tell whether the run shows the paper's shape**: the intervals over seeds cannot "
                   "decide " + ", ".join(unknown) + "; nothing of it is contradicted. More seeds would narrow them.")
    lines = [verdict, ""]
    lines += [f"- {f.sentence}" for f in found]
    lines += ["", REFERENCE_POINTS]
    return "\n".join(lines) + "\n"
