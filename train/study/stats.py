"""Intervals and decisions on per-seed results.

Every interval here is a two-sided Student t interval of a linear contrast of independent groups'
means, with the Welch–Satterthwaite degrees of freedom. For groups i with n_i values, mean x̄_i and
sample variance s_i², and weights c_i:

    estimate = Σ c_i·x̄_i,    se² = Σ c_i²·s_i²/n_i,    ν = se⁴ / Σ (c_i²·s_i²/n_i)² / (n_i − 1)
    interval = estimate ± t_{(1+confidence)/2, ν} · se

One group with weight 1 is the t interval of a mean (ν = n − 1); two with weights (1, −1) is Welch's
interval of a difference. A group of a single value has no variance estimate, so the interval is
unbounded; when every value of every group is equal (se = 0) it is the point itself.

`versus_margin` turns an interval into a three-way decision against a margin m: "above" when the
whole interval lies above m, "below" when it lies below, "unclear" when it contains m.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

ABOVE, BELOW, UNCLEAR = "above", "below", "unclear"


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval [low, high] from n values in all."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """(high − low) / 2 (∞ for an unbounded interval)."""
        return (self.high - self.low) / 2

    def scaled(self, factor: float) -> Interval:
        """The interval of factor·x for a positive factor (e.g. 100 for percentages)."""
        return Interval(self.estimate * factor, self.low * factor, self.high * factor, self.n)


def contrast_interval(groups: Sequence[Sequence[float]], weights: Sequence[float],
                      confidence: float = 0.95) -> Interval:
    """The t interval of Σ weights[i]·mean(groups[i]) (module docstring); groups must be non-empty."""
    if len(groups) != len(weights) or not groups:
        raise ValueError(f"need one weight per group, got {len(groups)} groups and {len(weights)} weights")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if any(len(g) == 0 for g in groups):
        raise ValueError("every group needs at least one value")
    estimate = sum(c * statistics.fmean(g) for g, c in zip(groups, weights))
    n = sum(len(g) for g in groups)
    if any(len(g) < 2 for g, c in zip(groups, weights) if c != 0):
        return Interval(estimate, -math.inf, math.inf, n)
    terms = [(c * c * statistics.variance(g) / len(g), len(g)) for g, c in zip(groups, weights) if c != 0]
    se2 = sum(term for term, _ in terms)
    if se2 == 0:
        return Interval(estimate, estimate, estimate, n)
    dof = se2 * se2 / sum(term * term / (size - 1) for term, size in terms if term > 0)
    half = float(student_t.ppf((1 + confidence) / 2, dof)) * math.sqrt(se2)
    return Interval(estimate, estimate - half, estimate + half, n)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The t interval of the mean of `values`."""
    return contrast_interval([values], [1.0], confidence)


def difference_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """Welch's t interval of mean(a) − mean(b)."""
    return contrast_interval([a, b], [1.0, -1.0], confidence)


def versus_margin(interval: Interval, margin: float) -> str:
    """ABOVE when interval.low > margin, BELOW when interval.high < margin, else UNCLEAR."""
    if interval.low > margin:
        return ABOVE
    if interval.high < margin:
        return BELOW
    return UNCLEAR


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) with linear interpolation; one value gives it thrice."""
    if not values:
        raise ValueError("quartiles of no values")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3
