"""Confidence intervals and significance over seeds (Student's t: seeds are few)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

# The fewest seeds the report draws an interval or a verdict from (why: WHY_MIN_SEEDS).
MIN_SEEDS = 3
WHY_MIN_SEEDS = (
    f"with fewer than {MIN_SEEDS} seeds a Student-t interval has at most 1 degree of freedom "
    "(2 seeds: t = 12.71, so the interval spans ±6.4 times the gap between the two values) and a "
    "Welch test almost never rejects, so “≈ best” would only mean “too few seeds”"
)


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are numbers (a missing or NaN seed result is left out)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


UNBOUNDED = (-math.inf, math.inf)


def mean_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    min_n: int = 2,
    bounds: tuple[float, float] = UNBOUNDED,
) -> tuple[float, float, float]:
    """(mean, low, high) of a two-sided Student-t interval, cut to ``bounds`` (the values the
    metric can take: from 3 seeds a t-interval of an F1 near 1 easily reaches past it); NaN bounds
    for fewer than ``min_n`` values (the report asks for :data:`MIN_SEEDS`)."""
    vals = finite(values)
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(vals) / n
    if n < max(min_n, 2):
        return mean, math.nan, math.nan
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, max(mean - half, bounds[0]), min(mean + half, bounds[1])


def welch_p_value(a: Sequence[float], b: Sequence[float], min_n: int = 2) -> float:
    """Two-sided Welch t-test p-value (unequal variances); NaN when either side has fewer than
    ``min_n`` values (the report asks for :data:`MIN_SEEDS`)."""
    if len(a) < max(min_n, 2) or len(b) < max(min_n, 2):
        return math.nan
    from scipy import stats

    with warnings.catch_warnings():  # near-identical seeds: scipy warns, the p-value below handles it
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(list(a), list(b), equal_var=False)
    return float(result.pvalue) if math.isfinite(result.pvalue) else (1.0 if list(a) == list(b) else 0.0)
