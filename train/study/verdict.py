"""The pre-registered verdict: direct contrasts of the best-LR cells with a Holm correction.

Stated before any run, the same for every preset (its batches, optimizers and `verdict_batches` fill
it in), with B0 the smallest batch, B_max the largest, m the margin (the study's --tolerance), and
top1_X(B) the mean top-1 of optimizer X at its chosen LR over the held-out seeds:

- drop_X = top1_X(B0) − top1_X(B_max), for every optimizer X: "falls" when drop_X > m is decided
  (H0: drop_X = m rejected by Welch's t test, Holm-adjusted, and the estimate above m), "within the
  margin" when drop_X < m is decided, "unclear" otherwise;
- DiD_X(B) = [top1_X(B0) − top1_X(B)] − [top1_SGD(B0) − top1_SGD(B)] for every other optimizer X at
  every verdict batch B: X "drops less than SGD" when DiD_X(B) < 0 is decided (H0: DiD = 0 rejected,
  Holm-adjusted, estimate below 0), "drops more" when DiD_X(B) > 0 is decided, "cannot tell" otherwise.

Holm's correction runs over the whole family (every drop and every DiD), at level 1 − confidence.
The paper's shape (You et al. 2017, arXiv:1708.03888; You et al. 2019, arXiv:1904.00962) **shows**
when every optimizer falls and LARS and LAMB each drop less than SGD at every verdict batch; it is
**contradicted** when some optimizer stays within the margin or LARS or LAMB drops more than SGD at a
verdict batch; otherwise the data **cannot tell**. Nado et al. 2021 (arXiv:2102.06356) dispute the
shape: the DiD of Nesterov and AdamW say whether a non-layer-wise optimizer does as well.

Each contrast is a linear combination of independent groups' means (the seeds of different cells are
independent runs), so its interval and test are those of train.study.stats.contrast_interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from train.study import analysis, stats
from train.study.analysis import Cell
from train.study.stats import Interval

BASELINE = "sgd"
ADAPTIVE = ("lars", "lamb")
FALLS, WITHIN, UNCLEAR = "falls", "within the margin", "unclear"
LESS, MORE, CANNOT_TELL = "drops less than SGD", "drops more than SGD", "cannot tell"
SHOWS, CONTRADICTED, OPEN = "shows", "contradicted", "cannot tell"


@dataclass(frozen=True)
class Contrast:
    """One tested contrast: kind "drop" (optimizer, batch = B_max) or "did" (optimizer vs SGD at
    batch); its interval (top-1 fraction), the null value tested, the raw and Holm-adjusted two-sided
    p-values, the decision, and the seeds per cell a half-width of `target` would need (None: not
    computable)."""

    kind: str
    optimizer: str
    batch: int
    interval: Interval
    null: float
    p: float
    p_holm: float
    decision: str
    seeds: tuple[int, ...]
    seeds_for_target: int | None

    @property
    def name(self) -> str:
        """"drop_lars" or "did_lars_512"."""
        return f"drop_{self.optimizer}" if self.kind == "drop" else f"did_{self.optimizer}_{self.batch}"


@dataclass(frozen=True)
class Verdict:
    """The family of contrasts, the shape's outcome (SHOWS, CONTRADICTED, OPEN) and the rule's margin."""

    contrasts: tuple[Contrast, ...]
    shape: str
    margin: float
    b0: int
    largest: int
    batches: tuple[int, ...]

    def get(self, name: str) -> Contrast:
        """The contrast called `name` (Contrast.name)."""
        return next(c for c in self.contrasts if c.name == name)


def rule_text(batches: Sequence[int], verdict_batches: Sequence[int], optimizers: Sequence[str],
              margin: float, confidence: float) -> str:
    """The pre-registered rule in words, for the study's start and its report."""
    b0, big = min(batches), max(batches)
    others = [o for o in optimizers if o != BASELINE]
    at = ", ".join(map(str, verdict_batches or (big,)))
    return (f"Pre-registered verdict (stated before any run): drop_X = top1_X({b0}) − top1_X({big}) for "
            f"{', '.join(optimizers)}; DiD_X(B) = drop_X(B) − drop_SGD(B) for {', '.join(others)} at B = {at}; "
            f"Welch t tests, Holm-corrected over all {len(optimizers) + len(others) * len(verdict_batches or (big,))} "
            f"contrasts at {100 * (1 - confidence):g}%. The paper's shape shows when every optimizer falls by more "
            f"than {100 * margin:g} points and LARS and LAMB each drop less than SGD (DiD < 0) at every B tested; "
            f"it is contradicted when an optimizer stays within {100 * margin:g} points or LARS or LAMB drops more.")


def _groups(by: dict[tuple[str, int], Cell], opt: str, b0: int, b: int) -> list[list[float]]:
    return [list(by[(opt, b0)].top1_runs), list(by[(opt, b)].top1_runs)]


def decide(cells: Sequence[Cell], verdict_batches: Sequence[int], margin: float, confidence: float = 0.95,
           target_half_width: float = 0.02) -> Verdict:
    """Apply the module's rule to the best-LR cells (their top1_runs: held-out seeds where the preset
    has them). Raises ValueError when a cell the rule needs is missing."""
    by = {(c.optimizer, c.batch): c for c in cells}
    opts, batches = analysis.optimizers_of(cells), analysis.batches_of(cells)
    b0, big = batches[0], batches[-1]
    tested = tuple(verdict_batches) or (big,)
    missing = [(o, b) for o in opts for b in (b0, big, *tested) if (o, b) not in by]
    if missing:
        raise ValueError(f"the verdict needs every optimizer at batches {b0}, {big} and {tested}; missing {missing}")
    raw: list[tuple[str, str, int, list[list[float]], list[float], float]] = []
    for opt in opts:
        raw.append(("drop", opt, big, _groups(by, opt, b0, big), [1.0, -1.0], margin))
    if BASELINE in opts:
        for b in tested:
            for opt in opts:
                if opt != BASELINE:
                    raw.append(("did", opt, b, _groups(by, opt, b0, b) + _groups(by, BASELINE, b0, b),
                                [1.0, -1.0, -1.0, 1.0], 0.0))
    p_values = [stats.contrast_p_value(g, w, null) for _, _, _, g, w, null in raw]
    adjusted = stats.holm(p_values)
    alpha = 1 - confidence
    out = []
    for (kind, opt, b, groups, weights, null), p, q in zip(raw, p_values, adjusted):
        interval = stats.contrast_interval(groups, weights, confidence)
        above, decided = interval.estimate > null, q < alpha
        if kind == "drop":
            decision = (FALLS if above else WITHIN) if decided else UNCLEAR
        else:
            decision = (MORE if above else LESS) if decided else CANNOT_TELL
        seeds = tuple(len(g) for g in groups)
        out.append(Contrast(kind, opt, b, interval, null, p, q, decision, seeds,
                            stats.seeds_needed(groups, weights, target_half_width, confidence)))
    return Verdict(tuple(out), _shape(out, tested), margin, b0, big, tested)


def _shape(contrasts: Sequence[Contrast], tested: Sequence[int]) -> str:
    drops = [c for c in contrasts if c.kind == "drop"]
    adaptive = [c for c in contrasts if c.kind == "did" and c.optimizer in ADAPTIVE]
    if any(c.decision == WITHIN for c in drops) or any(c.decision == MORE for c in adaptive):
        return CONTRADICTED
    if adaptive and all(c.decision == FALLS for c in drops) and all(c.decision == LESS for c in adaptive):
        return SHOWS
    return OPEN


def points(i: Interval) -> str:
    """"−3.2 [−5.1, −1.3]" in percentage points."""
    return f"{100 * i.estimate:.1f} [{100 * i.low:.1f}, {100 * i.high:.1f}]"


def headline(v: Verdict) -> str:
    """The verdict in one paragraph: the shape's outcome, then every contrast's decision."""
    lead = {SHOWS: "**The run shows the paper's shape** by the pre-registered contrasts",
            CONTRADICTED: "**The run contradicts the paper's shape** by the pre-registered contrasts",
            OPEN: "**The pre-registered contrasts cannot tell whether the run shows the paper's shape**"}[v.shape]
    drops = "; ".join(f"{c.optimizer} {points(c.interval)} ({c.decision})" for c in v.contrasts if c.kind == "drop")
    dids = "; ".join(f"{c.optimizer} at {c.batch}: {points(c.interval)} ({c.decision})"
                     for c in v.contrasts if c.kind == "did")
    return (f"{lead}. Drop from B={v.b0} to B={v.largest} (points; falls when surely above "
            f"{100 * v.margin:g}): {drops}. Difference in drops against SGD, DiD (negative: drops less than SGD): "
            f"{dids}. Intervals are uncorrected t intervals; the decisions use Holm-adjusted p-values.")


def table(v: Verdict, target_half_width: float = 0.02) -> str:
    """Markdown table of every contrast: estimate and interval, p, Holm p, decision, seeds per cell,
    half-width reached and the seeds per cell a half-width of `target_half_width` would need."""
    lines = ["| contrast | batch | estimate [interval], points | half-width | p | Holm p | decision | seeds per cell | "
             f"seeds for ±{100 * target_half_width:g} |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for c in v.contrasts:
        label = f"drop {c.optimizer} ({v.b0}→{c.batch})" if c.kind == "drop" else f"DiD {c.optimizer} − sgd"
        need = "—" if c.seeds_for_target is None else str(c.seeds_for_target)
        lines.append(f"| {label} | {c.batch} | {points(c.interval)} | {100 * c.interval.half_width:.1f} | "
                     f"{c.p:.2g} | {c.p_holm:.2g} | {c.decision} | {'/'.join(map(str, c.seeds))} | {need} |")
    return "\n".join(lines)
