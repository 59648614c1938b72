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


def contrast_p_value(groups: Sequence[Sequence[float]], weights: Sequence[float], null: float = 0.0) -> float:
    """Two-sided p-value of H0: Σ weights[i]·mean(groups[i]) = `null`, from the Welch t statistic
    (estimate − null) / se with the Welch–Satterthwaite degrees of freedom of `contrast_interval`.
    1 when a group with non-zero weight has a single value; 0 or 1 when se = 0 (estimate ≠ or = null)."""
    interval = contrast_interval(groups, weights, 0.5)
    if math.isinf(interval.half_width):
        return 1.0
    terms = [(c * c * statistics.variance(g) / len(g), len(g)) for g, c in zip(groups, weights) if c != 0]
    se2 = sum(term for term, _ in terms)
    if se2 == 0:
        return 0.0 if interval.estimate != null else 1.0
    dof = se2 * se2 / sum(term * term / (size - 1) for term, size in terms if term > 0)
    tstat = (interval.estimate - null) / math.sqrt(se2)
    return float(2 * student_t.sf(abs(tstat), dof))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given: with the m p-values sorted
    ascending p_(1) ≤ … ≤ p_(m), adj_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j)). Rejecting every
    hypothesis whose adjusted p-value is below α controls the family-wise error rate at α."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def seeds_needed(groups: Sequence[Sequence[float]], weights: Sequence[float], half_width: float,
                 confidence: float = 0.95, limit: int = 100_000) -> int | None:
    """The smallest n ≥ 2 such that, with n values in every group and each group's sample variance as
    observed, the t interval of the contrast would have a half-width ≤ `half_width`:
    t_{(1+confidence)/2, ν(n)}·√(Σ c_i²·s_i² / n) ≤ half_width, ν(n) the Welch–Satterthwaite degrees of
    freedom (= (n − 1)·(Σ c_i² s_i²)² / Σ c_i⁴ s_i⁴). None when a group has fewer than 2 values (no
    variance to plan from) or more than `limit` seeds would be needed."""
    if not half_width > 0:
        raise ValueError(f"half_width must be positive, got {half_width}")
    if any(len(g) < 2 for g, c in zip(groups, weights) if c != 0):
        return None
    parts = [c * c * statistics.variance(g) for g, c in zip(groups, weights) if c != 0]
    total = sum(parts)
    if total == 0:
        return 2
    ratio = total * total / sum(p * p for p in parts if p > 0)

    def half(n: int) -> float:
        return float(student_t.ppf((1 + confidence) / 2, (n - 1) * ratio)) * math.sqrt(total / n)

    if half(limit) > half_width:
        return None
    low, high = 1, limit  # half(low) > half_width ≥ half(high); half falls with n
    if half(2) <= half_width:
        return 2
    low = 2
    while high - low > 1:
        mid = (low + high) // 2
        if half(mid) <= half_width:
            high = mid
        else:
            low = mid
    return high
