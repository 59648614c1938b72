"""The LR search of one (optimizer, batch) cell: which factor is best, and which to try next.

The factors tried form a log grid: the preset's initial `lr_factors`, neighbours `step` apart. The
best factor is the one with the highest mean top-1 over its seeds (ties: higher mean top-5, then the
smaller factor). While the best lies at the low or high edge of what was tried and fewer than
`max_extensions` factors outside the initial grid have been tried, the next factor is the edge's
neighbour beyond it (edge / step or edge · step); otherwise the search of that cell is over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LOW, HIGH, INSIDE = "low", "high", ""


@dataclass(frozen=True)
class FactorScore:
    """One tried factor's mean top-1 and top-5 over its seeds."""

    factor: float
    top1: float
    top5: float


def best(scores: Sequence[FactorScore]) -> FactorScore:
    """The best factor: highest mean top-1, then higher mean top-5, then the smaller factor."""
    if not scores:
        raise ValueError("no factor was tried")
    return max(scores, key=lambda s: (s.top1, s.top5, -s.factor))


def edge(scores: Sequence[FactorScore]) -> str:
    """Where the best factor lies among those tried: LOW, HIGH, or INSIDE (one factor: INSIDE is
    impossible, so a single factor counts as both edges and reports LOW)."""
    chosen = best(scores).factor
    factors = sorted(s.factor for s in scores)
    if chosen == factors[0]:
        return LOW
    if chosen == factors[-1]:
        return HIGH
    return INSIDE


def extensions_used(factors: Sequence[float], initial: Sequence[float]) -> int:
    """How many tried factors lie outside the initial grid (compared within 1e-9 relative)."""
    return sum(1 for f in factors if not any(abs(f - g) <= 1e-9 * abs(g) for g in initial))


def next_factor(scores: Sequence[FactorScore], initial: Sequence[float], step: float,
                max_extensions: int) -> float | None:
    """The factor to try next, or None when the best is inside the range or the extensions are spent."""
    side = edge(scores)
    factors = sorted(s.factor for s in scores)
    if side == INSIDE or extensions_used(factors, initial) >= max_extensions:
        return None
    return factors[0] / step if side == LOW else factors[-1] * step
